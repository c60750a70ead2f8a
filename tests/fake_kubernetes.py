"""A fake Kubernetes API server for KServe InferenceServices, on 127.0.0.1.

It answers ``/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices[/{name}]`` as the
API server does: GET (a Status 404 naming the object when there is none), POST (create) and PUT
(replace; the resourceVersion must be the stored one), bumping ``metadata.generation`` on every
write. A service's status stays what it was before the write (nothing, or the old revision's
Ready) for ``ready_after`` reads, then becomes Ready for the new generation. It records every
request with its Authorization header. ``forbidden`` answers everything 403 as RBAC does,
``kserve_installed=False`` 404 as for an unknown resource kind; ``tls`` serves https.
"""
from __future__ import annotations

import http.server
import json
import ssl
import threading
from dataclasses import dataclass, field

COLLECTION = "/apis/serving.kserve.io/v1beta1/namespaces/{namespace}/inferenceservices"
SERVICE_ACCOUNT_USER = "system:serviceaccount:kubeflow:pipeline-runner"
NOT_READY = [  # what KServe reports while no node has a free GPU
    {"type": "PredictorReady", "status": "False", "reason": "RevisionMissing",
     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."},
    {"type": "Ready", "status": "False", "reason": "RevisionMissing"},
]


@dataclass
class Request:
    method: str
    path: str
    body: dict | None
    authorization: str


@dataclass
class FakeKubernetes:
    ready_after: int = 1
    forbidden: bool = False
    kserve_installed: bool = True
    tls: ssl.SSLContext | None = None
    services: dict[str, dict] = field(default_factory=dict)  # by "namespace/name"
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _reads: dict[str, int] = field(default_factory=dict)
    _server: http.server.ThreadingHTTPServer | None = None

    def add_ready_service(self, namespace: str, name: str, spec: dict) -> None:
        """An InferenceService already serving (generation 1, Ready)."""
        self.services[f"{namespace}/{name}"] = {
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace, "generation": 1,
                         "resourceVersion": "7"},
            "spec": spec, "status": self._ready_status(namespace, name, 1)}
        self._reads[f"{namespace}/{name}"] = self.ready_after

    def answer(self, method: str, path: str, body: dict | None) -> tuple[int, dict | str]:
        if self.forbidden:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            return 403, _status(403, "Forbidden", {"name": name}, (
                f'inferenceservices.serving.kserve.io "{name}" is forbidden: User '
                f'"{SERVICE_ACCOUNT_USER}" cannot {method.lower()} resource "inferenceservices" '
                'in API group "serving.kserve.io" in the namespace "kubeflow"'))
        if not self.kserve_installed:
            return 404, "404 page not found\n"
        prefix, _, rest = path.partition("/namespaces/")
        namespace, _, rest = rest.partition("/inferenceservices")
        if prefix != "/apis/serving.kserve.io/v1beta1" or not namespace:
            return 404, "404 page not found\n"
        name = rest.strip("/")
        if method == "POST" and not name:
            return self._create(namespace, body)
        key = f"{namespace}/{name}"
        if key not in self.services:
            return 404, _status(404, "NotFound", {"name": name, "kind": "inferenceservices"},
                                f'inferenceservices.serving.kserve.io "{name}" not found')
        if method == "GET":
            return 200, self._read(key)
        if method == "PUT":
            return self._replace(key, body)
        return 405, _status(405, "MethodNotAllowed", {}, f"{method} is not served by the fake")

    def _create(self, namespace: str, body: dict) -> tuple[int, dict]:
        name = body["metadata"]["name"]
        key = f"{namespace}/{name}"
        if key in self.services:
            return 409, _status(409, "AlreadyExists", {"name": name}, f'"{name}" already exists')
        stored = json.loads(json.dumps(body))
        stored["metadata"].update(generation=1, resourceVersion="1")
        stored["status"] = {"conditions": NOT_READY}
        self.services[key], self._reads[key] = stored, 0
        return 201, stored

    def _replace(self, key: str, body: dict) -> tuple[int, dict]:
        current = self.services[key]
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return 409, _status(409, "Conflict", {"name": body["metadata"]["name"]},
                                "the object has been modified")
        stored = json.loads(json.dumps(body))
        stored["metadata"].update(generation=current["metadata"]["generation"] + 1,
                                  resourceVersion=str(int(body["metadata"]["resourceVersion"]) + 1))
        stored["status"] = current["status"]  # the old revision keeps serving meanwhile
        self.services[key], self._reads[key] = stored, 0
        return 200, stored

    def _read(self, key: str) -> dict:
        service = self.services[key]
        self._reads[key] += 1
        if self._reads[key] > self.ready_after:
            metadata = service["metadata"]
            service["status"] = self._ready_status(metadata["namespace"], metadata["name"],
                                                   metadata["generation"])
        return service

    @staticmethod
    def _ready_status(namespace: str, name: str, generation: int) -> dict:
        return {"observedGeneration": generation,
                "url": f"http://{name}.{namespace}.example.com",
                "address": {"url": f"http://{name}.{namespace}.svc.cluster.local"},
                "conditions": [{"type": "PredictorReady", "status": "True"},
                               {"type": "Ready", "status": "True"}]}

    def __enter__(self) -> FakeKubernetes:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append(Request(self.command, self.path, body,
                                             self.headers.get("Authorization", "")))
                status, answer = fake.answer(self.command, self.path, body)
                payload = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(answer, str)
                                 else "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _status(code: int, reason: str, details: dict, message: str) -> dict:
    """A Kubernetes Status object, as the API server answers errors."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": code}
