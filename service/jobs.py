"""Running jobs: one at a time, in the order they were created, each in its own process.

A job is a record (:mod:`service.records`) whose folder holds ``request.json``, what its kind's
job process reads. The runner starts ``python -m MODULE FOLDER SERVER_PID`` for it (the kind's
module, :class:`JobKind`) in a new process group; that process (:func:`job_main`) does the work,
writes ``result.json`` (what the work returns, or ``error``) and its log to ``log.txt``, and ends
when the server dies. A succeeded job's record takes the result fields its kind names.
Cancelling a running job ends its process group (SIGTERM, then SIGKILL); the endpoint a finished
job deployed lives in its own session and stays up. A job that is cancelled, or ended because the
server stops or stopped, leaves no endpoint: once its process group has ended, the endpoints its
processes started (``$TUNEPIPE_JOB``, the job's folder, names them in their records; see
:mod:`components.deploy_endpoint.endpoints`), ready or still starting, are stopped.

This module is the pipelineJobs' job process: it runs ``request.json``, a pipelineJobs request
body that ``tunepipe run --request-file`` would accept, through the KFP local runner
(:func:`pipelines.local_run.run_locally`); its result is ``runDir`` and ``taskSeconds``.

States (a collection writes them with its own prefix, e.g. ``PIPELINE_STATE_``):
PENDING -> RUNNING -> SUCCEEDED | FAILED, and CANCELLING -> CANCELLED on request. A failed or
cancelled job has ``error`` {code (google.rpc.Code), message}.

The restart rule: when the server starts, a job it finds RUNNING or CANCELLING was running when
the previous server died: it is marked FAILED with that reason (its process, which watches its
parent, has ended itself). PENDING jobs are queued again.

A job's records are the server's alone: run one server per ``TUNEPIPE_HOME``
(:mod:`service.home_lock`).
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from components.deploy_endpoint.endpoints import JOB_ENV, stop_job_endpoints
from service.records import RecordStore, timestamp

REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
LOG_FILE = "log.txt"
KILL_GRACE_SECONDS = 10.0
GROUP_END_SECONDS = KILL_GRACE_SECONDS + 5.0  # how long an ended job's processes may linger
PARENT_POLL_SECONDS = 1.0

# google.rpc.Code values of a job's error
CANCELLED_CODE, INVALID_ARGUMENT_CODE, ABORTED_CODE, INTERNAL_CODE = 1, 3, 10, 13
ACTIVE = ("RUNNING", "CANCELLING")


@dataclass(frozen=True)
class JobKind:
    """A collection of jobs: its records, the prefix of its states, the module whose
    ``python -m MODULE FOLDER SERVER_PID`` runs one job, and the fields of a succeeded job's
    result that go into its record."""

    store: RecordStore
    state_prefix: str
    module: str = "service.jobs"
    result_fields: tuple[str, ...] = ()

    def state(self, record: dict) -> str:
        """The record's state without the prefix: PENDING, RUNNING, ..."""
        return record["state"].removeprefix(self.state_prefix)


class JobRunner:
    """Runs the jobs of several kinds one at a time on a worker thread."""

    def __init__(self):
        self._queue: queue.Queue[tuple[JobKind, str] | None] = queue.Queue()
        self._lock = threading.RLock()
        self._running: tuple[str, subprocess.Popen] | None = None
        self._cancelled: set[str] = set()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="tunepipe-jobs", daemon=True)

    def start(self, kinds: list[JobKind]) -> None:
        """Applies the restart rule to the records of ``kinds`` a previous server left, then
        starts running jobs."""
        pending = []
        for kind in kinds:
            for record in kind.store.list():
                if kind.state(record) in ACTIVE:
                    stop_job_endpoints(str(kind.store.folder(record["name"])))
                    self._finish(kind, record["name"], "FAILED", {
                        "code": ABORTED_CODE,
                        "message": "the server stopped while the job ran (found when tunepipe "
                                   "serve restarted); create the job again"})
                elif kind.state(record) == "PENDING":
                    pending.append((record["createTime"], kind, record["name"]))
        for _, kind, name in sorted(pending, key=lambda item: item[0]):
            self._queue.put((kind, name))
        self._worker.start()

    def enqueue(self, kind: JobKind, name: str) -> None:
        """Queues a PENDING job."""
        self._queue.put((kind, name))

    def cancel(self, kind: JobKind, name: str) -> dict | None:
        """Cancels a pending or running job; its record, or None when it had already ended."""
        with self._lock:
            record = kind.store.get(name)
            state = kind.state(record)
            if state == "PENDING":
                return self._finish(kind, name, "CANCELLED", {
                    "code": CANCELLED_CODE, "message": "cancelled before it started"})
            if state == "RUNNING" and self._running and self._running[0] == name:
                self._cancelled.add(name)
                _end_process_group(self._running[1])
                return kind.store.update(name, lambda r: r.update(
                    state=kind.state_prefix + "CANCELLING"))
            return record if state == "CANCELLING" else None

    def stop(self) -> None:
        """Stops the worker; a running job is ended and marked FAILED (the server stopped)."""
        with self._lock:
            self._stopping = True
            if self._running:
                _end_process_group(self._running[1])
        self._queue.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout=GROUP_END_SECONDS + 15)  # + stopping its endpoints

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run(*item)

    def _run(self, kind: JobKind, name: str) -> None:
        folder = kind.store.folder(name)
        with self._lock:
            if self._stopping or kind.state(kind.store.get(name)) != "PENDING":
                return  # cancelled while queued, or the server is stopping (it stays PENDING)
            (folder / RESULT_FILE).unlink(missing_ok=True)
            with open(folder / LOG_FILE, "a") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", kind.module, str(folder), str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, JOB_ENV: str(folder)}, start_new_session=True)
            self._running = (name, process)
            kind.store.update(name, lambda r: r.update(state=kind.state_prefix + "RUNNING",
                                                       startTime=timestamp()))
        exit_code = process.wait()
        if name in self._cancelled or self._stopping:  # its processes were told to end
            _wait_for_group(process.pid)
            stop_job_endpoints(str(folder))
        with self._lock:
            self._running = None
            result_path = folder / RESULT_FILE
            result = json.loads(result_path.read_text()) if result_path.exists() else {}
            if name in self._cancelled:
                self._cancelled.discard(name)
                self._finish(kind, name, "CANCELLED", {"code": CANCELLED_CODE,
                                                       "message": "cancelled while it ran"})
            elif self._stopping:
                self._finish(kind, name, "FAILED", {
                    "code": ABORTED_CODE, "message": "tunepipe serve was stopped while the job "
                                                     "ran; create the job again"})
            elif exit_code == 0 and "error" not in result:
                self._finish(kind, name, "SUCCEEDED", None,
                             {field: result[field] for field in kind.result_fields
                              if field in result})
            else:
                self._finish(kind, name, "FAILED", result.get("error") or {
                    "code": INTERNAL_CODE,
                    "message": f"the job's process exited with status {exit_code}; its log: "
                               f"{folder / LOG_FILE}"})

    @staticmethod
    def _finish(kind: JobKind, name: str, state: str, error: dict | None,
                fields: dict | None = None) -> dict:
        def change(record: dict) -> None:
            record.update(state=kind.state_prefix + state, endTime=timestamp(), **(fields or {}))
            if error:
                record["error"] = error
        return kind.store.update(name, change)


def _end_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the job's process group, SIGKILL to what is left of it after
    :data:`KILL_GRACE_SECONDS`."""
    def signal_group(number: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, number)

    signal_group(signal.SIGTERM)

    timer = threading.Timer(KILL_GRACE_SECONDS, signal_group, (signal.SIGKILL,))
    timer.daemon = True
    timer.start()


def _wait_for_group(group: int) -> None:
    """Waits (at most :data:`GROUP_END_SECONDS`) until no process of the group is left: its
    leader may end before its children (a pipeline's tasks)."""
    deadline = time.monotonic() + GROUP_END_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _end_with_parent(parent: int) -> None:
    """Ends this process group when ``parent``, the server that started it, dies (this process
    is re-parented; it may have been before this process got here)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.killpg(os.getpgid(0), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


def run_job(folder: Path) -> dict:
    """Runs ``folder/request.json`` with the KFP local runner: ``{"runDir", "taskSeconds"}``, or
    ``{"error": {"code", "message"}}``."""
    from pipelines.local_run import TaskFailedError, prepare, request_from_file, run_locally
    from pipelines.templates import ParameterError

    try:
        request = request_from_file(folder / REQUEST_FILE)
        pipeline_name, values = prepare(request)
        run = run_locally(request, pipeline_name, values)
        return {"runDir": str(run.run_dir), "taskSeconds": run.task_seconds}
    except TaskFailedError as failure:
        return {"error": {"code": INTERNAL_CODE,
                          "message": f"task {failure.task} failed: {failure.message}"}}
    except (ParameterError, ValueError, FileNotFoundError) as error:
        return {"error": {"code": INVALID_ARGUMENT_CODE, "message": str(error).strip()}}


def job_main(work: Callable[[Path], dict]) -> int:
    """A job process (``python -m MODULE FOLDER SERVER_PID``): ends itself when the server dies,
    runs ``work(FOLDER)`` and writes what it returns to ``result.json`` (atomically); the exit
    status, 1 when the result is an ``error``."""
    _end_with_parent(int(sys.argv[2]))
    folder = Path(sys.argv[1])
    result = work(folder)
    staging = folder / (RESULT_FILE + ".partial")
    staging.write_text(json.dumps(result, indent=2))
    os.replace(staging, folder / RESULT_FILE)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(job_main(run_job))
