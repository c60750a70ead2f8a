"""Local fakes of the Vertex AI pipelineJobs REST API and the KFP v2beta1 API, on 127.0.0.1.

Each records the requests it receives (method, path, JSON body) and answers the calls the real
clients (google-cloud-aiplatform, ``kfp.Client``) make to create a run and read its state.
A job's state on each read comes from ``states`` (the last one repeats).
"""
from __future__ import annotations

import http.server
import json
import threading
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass
class Received:
    """One request a fake received."""

    method: str
    path: str  # with the query string
    body: dict


@dataclass
class FakeService:
    kind: str  # "vertex" or "kfp"
    states: list[str]
    error_message: str = ""
    refuse: tuple[int, str] | None = None  # answer every create with (HTTP status, message)
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _server: http.server.ThreadingHTTPServer | None = None

    def creates(self) -> list[Received]:
        return [r for r in self.received if r.method == "POST" and r.path.split("?")[0].endswith(
            ("/pipelineJobs", "/runs"))]

    def answer(self, method: str, path: str, body: dict) -> tuple[int, dict]:
        self.received.append(Received(method, path, body))
        route = urlparse(path).path
        if self.refuse and method == "POST":
            status, message = self.refuse
            return status, {"error": {"code": status, "message": message}} \
                if self.kind == "vertex" else {"code": status, "message": message}
        if self.kind == "vertex":
            return self._vertex(method, route, body)
        return self._kfp(method, route, body)

    def _state(self) -> str:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def _vertex(self, method: str, route: str, body: dict) -> tuple[int, dict]:
        parent = route.removeprefix("/v1/").removesuffix("/pipelineJobs")
        if method == "POST":
            return 200, {**body, "name": f"{parent}/pipelineJobs/job-1",
                         "state": "PIPELINE_STATE_PENDING"}
        job = {"name": route.removeprefix("/v1/"), "state": self._state()}
        if job["state"] == "PIPELINE_STATE_FAILED":
            job["error"] = {"code": 9, "message": self.error_message}
        return 200, job

    def _kfp(self, method: str, route: str, body: dict) -> tuple[int, dict]:
        if route.endswith("/healthz"):
            return 200, {"multi_user": False}
        if route.endswith("/experiments"):
            if method == "GET":
                return 200, {}
            return 200, {**body, "experiment_id": "experiment-1"}
        if method == "POST":
            return 200, {**body, "run_id": "run-1", "state": "PENDING"}
        run = {"run_id": "run-1", "state": self._state()}
        if run["state"] == "FAILED":
            run["error"] = {"code": 2, "message": self.error_message}
        return 200, run

    def __enter__(self) -> FakeService:
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, reply = service.answer(self.command, self.path,
                                               json.loads(raw) if raw else {})
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
