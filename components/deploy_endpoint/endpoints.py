"""Local endpoints: start, list, call and stop endpoint server processes by name.

Each endpoint is a detached server process (its own session: it outlives the pipeline run that
deployed it) with a record ``$TUNEPIPE_HOME/endpoints/<name>.json`` holding its URL, process
id, model and the job that started it, and a log beside it. The record is written as soon as
the process exists (with no URL while it starts; SIGTERM and SIGINT wait until it is written),
so no endpoint process is ever unrecorded: a deployer that is cancelled or killed while its
endpoint starts leaves it listed, and ``stop`` (or :func:`stop_job_endpoints`, which the
service calls for a cancelled job) ends it. The server writes ``<name>.ready`` (its port)
once it serves; whoever reads the record next fills in the URL.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from components.common.paths import endpoints_dir

STARTUP_TIMEOUT_SECONDS = 300
# The job (its folder) whose process deploys: the service's job runner sets it, and the
# endpoint's record keeps it, so a cancelled job's endpoints can be stopped.
JOB_ENV = "TUNEPIPE_JOB"


@dataclass(frozen=True)
class Endpoint:
    """A running (or recorded) local endpoint; ``url`` is '' while it starts."""

    name: str
    url: str
    pid: int
    model_dir: str
    log: str
    job: str = ""

    @property
    def predict_url(self) -> str:
        return self.url + "/predict"


def _record_path(name: str) -> Path:
    return endpoints_dir() / f"{name}.json"


def _ready_path(name: str) -> Path:
    return endpoints_dir() / f"{name}.ready"


def _write_record(endpoint: Endpoint) -> None:
    """Writes the endpoint's record atomically (its writers may race: each has its own
    temporary file)."""
    descriptor, staging = tempfile.mkstemp(prefix=f".{endpoint.name}-", suffix=".partial",
                                           dir=endpoints_dir())
    with os.fdopen(descriptor, "w") as file:
        json.dump(asdict(endpoint), file, indent=2)
    os.replace(staging, _record_path(endpoint.name))


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


@contextlib.contextmanager
def _termination_deferred():
    """Holds SIGTERM and SIGINT until the block ends, then acts on them as before (on the main
    thread; Python handles signals only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in received:
            signal.raise_signal(number)


def _with_url(endpoint: Endpoint) -> Endpoint:
    """The endpoint with its URL, recorded, once its server has written its ready file."""
    if endpoint.url:
        return endpoint
    try:
        ready = json.loads(_ready_path(endpoint.name).read_text())
    except (OSError, ValueError):
        return endpoint  # still starting (or another reader just took the file)
    if ready.get("pid") != endpoint.pid:
        return endpoint
    endpoint = replace(endpoint, url=f"http://127.0.0.1:{ready['port']}")
    _write_record(endpoint)
    _ready_path(endpoint.name).unlink(missing_ok=True)
    return endpoint


def start_endpoint(name: str, model_dir: str | Path, server_args: Sequence[str] = ()) -> Endpoint:
    """Starts a server for ``model_dir`` named ``name``, replacing a running one of that name;
    ``server_args``: more of the server's options (``--no-batching``, ``--max-batch-rows N``)."""
    stop_endpoint(name, missing_ok=True)
    directory = endpoints_dir()
    directory.mkdir(parents=True, exist_ok=True)
    ready_file = _ready_path(name)
    ready_file.unlink(missing_ok=True)
    log_path = directory / f"{name}.log"
    with open(log_path, "w") as log, _termination_deferred():
        process = subprocess.Popen(
            [sys.executable, "-m", "components.deploy_endpoint.server", "--name", name,
             "--model-dir", str(model_dir), "--ready-file", str(ready_file), *server_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
        endpoint = Endpoint(name, "", process.pid, str(model_dir), str(log_path),
                            os.environ.get(JOB_ENV, ""))
        _write_record(endpoint)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    try:
        while not endpoint.url:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
                raise RuntimeError(f"endpoint {name} did not start (log {log_path}):\n{tail}")
            time.sleep(0.2)
            recorded = _read_record(name)  # a reader may have filled in the URL already
            endpoint = _with_url(recorded) if recorded else endpoint
    except BaseException:  # not started, or interrupted: no endpoint is left behind
        process.kill()
        if (_read_record(name) or endpoint).pid == process.pid:
            _record_path(name).unlink(missing_ok=True)
        raise
    return endpoint


def _read_record(name: str) -> Endpoint | None:
    """The recorded endpoint ``name``, or None."""
    try:
        return Endpoint(**json.loads(_record_path(name).read_text()))
    except FileNotFoundError:
        return None


def _records() -> list[Endpoint]:
    """Every recorded endpoint, running, starting or dead, by name."""
    directory = endpoints_dir()
    records = sorted(directory.glob("*.json")) if directory.exists() else []
    return [Endpoint(**json.loads(path.read_text())) for path in records]


def stop_job_endpoints(job: str) -> list[str]:
    """Stops every endpoint the job ``job`` (:data:`JOB_ENV`) started, started or starting;
    their names."""
    names = [endpoint.name for endpoint in _records() if endpoint.job == job]
    for name in names:
        stop_endpoint(name, missing_ok=True)
    return names


def stop_all_endpoints() -> list[str]:
    """Stops every recorded endpoint, started or starting, and removes every record (a dead
    server's too); the names of those that were running."""
    return [endpoint.name for endpoint in _records()
            if stop_endpoint(endpoint.name, missing_ok=True)]


def list_endpoints() -> list[Endpoint]:
    """Every recorded endpoint whose server process is still running."""
    return [_with_url(e) for e in _records() if _alive(e.pid)]


def get_endpoint(name: str) -> Endpoint:
    """A running endpoint by name."""
    for endpoint in list_endpoints():
        if endpoint.name == name:
            return endpoint
    running = ", ".join(e.name for e in list_endpoints()) or "none"
    raise LookupError(f"No running endpoint named {name!r} (running: {running}). "
                      "Deploy a registered model with `tunepipe endpoints deploy MODEL`, or list "
                      "them with `tunepipe endpoints list`.")


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
    _ready_path(name).unlink(missing_ok=True)
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
    if not endpoint.url:
        raise RuntimeError(f"endpoint {name} is still starting; its log: {endpoint.log}")
    body = json.dumps({"instances": instances, "parameters": parameters or {}}).encode()
    request = urllib.request.Request(endpoint.predict_url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        raise RuntimeError(f"endpoint {name} answered {error.code}: {detail}") from None
