"""Local endpoints: start, list, call and stop endpoint server processes by name.

Each endpoint is a detached server process (it outlives the pipeline run that deployed it)
with a record ``$TUNEPIPE_HOME/endpoints/<name>.json`` holding its URL, process id and model,
and a log beside it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from components.common.paths import endpoints_dir

STARTUP_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Endpoint:
    """A running (or recorded) local endpoint."""

    name: str
    url: str
    pid: int
    model_dir: str
    log: str

    @property
    def predict_url(self) -> str:
        return self.url + "/predict"


def _record_path(name: str) -> Path:
    return endpoints_dir() / f"{name}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def start_endpoint(name: str, model_dir: str | Path, server_args: Sequence[str] = ()) -> Endpoint:
    """Starts a server for ``model_dir`` named ``name``, replacing a running one of that name;
    ``server_args``: more of the server's options (``--no-batching``, ``--max-batch-rows N``)."""
    stop_endpoint(name, missing_ok=True)
    directory = endpoints_dir()
    directory.mkdir(parents=True, exist_ok=True)
    ready_file = directory / f"{name}.ready"
    ready_file.unlink(missing_ok=True)
    log_path = directory / f"{name}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "components.deploy_endpoint.server", "--name", name,
             "--model-dir", str(model_dir), "--ready-file", str(ready_file), *server_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
            raise RuntimeError(f"endpoint {name} did not start (log {log_path}):\n{tail}")
        time.sleep(0.2)
    port = json.loads(ready_file.read_text())["port"]
    ready_file.unlink()
    endpoint = Endpoint(name, f"http://127.0.0.1:{port}", process.pid, str(model_dir), str(log_path))
    staging = _record_path(name).with_suffix(".partial")
    staging.write_text(json.dumps(asdict(endpoint), indent=2))
    os.replace(staging, _record_path(name))
    return endpoint


def list_endpoints() -> list[Endpoint]:
    """Every recorded endpoint whose server process is still running."""
    directory = endpoints_dir()
    if not directory.exists():
        return []
    endpoints = [Endpoint(**json.loads(p.read_text())) for p in sorted(directory.glob("*.json"))]
    return [e for e in endpoints if _alive(e.pid)]


def get_endpoint(name: str) -> Endpoint:
    """A running endpoint by name."""
    for endpoint in list_endpoints():
        if endpoint.name == name:
            return endpoint
    running = ", ".join(e.name for e in list_endpoints()) or "none"
    raise LookupError(f"No running endpoint named {name!r} (running: {running}). "
                      "Deploy one with a pipeline run, or list them with `tunepipe endpoints list`.")


def stop_endpoint(name: str, missing_ok: bool = False) -> bool:
    """Stops the named endpoint's server and removes its record; True if one was running."""
    record = _record_path(name)
    if not record.exists():
        if missing_ok:
            return False
        raise LookupError(f"No endpoint named {name!r}")
    endpoint = Endpoint(**json.loads(record.read_text()))
    was_running = _alive(endpoint.pid)
    if was_running:
        os.kill(endpoint.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(endpoint.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(endpoint.pid):
            os.kill(endpoint.pid, signal.SIGKILL)
    record.unlink(missing_ok=True)
    return was_running


def predict(name: str, prompts: list[str], parameters: dict | None = None,
            timeout: float = 300) -> dict:
    """Sends a Vertex-style text predict request to the named endpoint; returns its JSON reply."""
    return _post_predict(name, [{"prompt": p} for p in prompts], parameters, timeout)


def predict_chat(name: str, messages: list[str], context: str = "",
                 parameters: dict | None = None, timeout: float = 300) -> dict:
    """Sends a Vertex-style chat predict request and returns its JSON reply.

    ``messages`` are the conversation's turns in order, alternating user and assistant and
    starting (and ending) with the user's; ``context`` is the optional system context.
    """
    instance: dict = {"messages": [{"author": ("user", "assistant")[index % 2], "content": text}
                                   for index, text in enumerate(messages)]}
    if context:
        instance["context"] = context
    return _post_predict(name, [instance], parameters, timeout)


def _post_predict(name: str, instances: list[dict], parameters: dict | None,
                  timeout: float) -> dict:
    endpoint = get_endpoint(name)
    body = json.dumps({"instances": instances, "parameters": parameters or {}}).encode()
    request = urllib.request.Request(endpoint.predict_url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        raise RuntimeError(f"endpoint {name} answered {error.code}: {detail}") from None
