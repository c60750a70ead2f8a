"""Runs a compiled pipeline template on this machine with the KFP local runner.

The runner executes the compiled YAML, not the Python function, so the file users publish is
the file that ran. Every component runs as a subprocess in this Python environment
(``SubprocessRunner(use_venv=False)``); outputs land under ``pipeline_root``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import warnings
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.templates import ParameterError, bind_parameters, read_template, template_path

DEFAULT_PIPELINE_ROOT = "runs"


@dataclass
class RunRequest:
    """What to run: a template, its parameter values, where outputs go."""

    template: Path
    parameters: dict[str, Any]
    pipeline_root: str = DEFAULT_PIPELINE_ROOT
    display_name: str = ""
    notes: tuple[str, ...] = ()


REQUEST_FIELDS = {"displayName", "runtimeConfig", "templateUri", "encryptionSpec",
                  "serviceAccount", "labels", "network", "reservedIpRanges", "pipelineSpec"}
RUNTIME_CONFIG_FIELDS = {"parameterValues", "gcsOutputDirectory", "parameters",
                         "failurePolicy", "inputArtifacts"}


def request_from_file(path: str | Path, template_override: str | None = None) -> RunRequest:
    """A RunRequest from a Vertex ``pipelineJobs.create`` request body (JSON)."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ParameterError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    if not isinstance(body, dict):
        raise ParameterError(f"{path}: the request body must be a JSON object")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise ParameterError(f"{path}: unknown request fields {unknown}; a pipelineJobs request "
                             f"has {sorted(REQUEST_FIELDS)}")
    runtime = body.get("runtimeConfig", {})
    unknown = sorted(set(runtime) - RUNTIME_CONFIG_FIELDS)
    if unknown:
        raise ParameterError(f"{path}: unknown runtimeConfig fields {unknown}")
    template = template_override or body.get("templateUri")
    if not template:
        raise ParameterError(f"{path}: no templateUri; name the pipeline on the command line")
    notes = []
    output_dir = runtime.get("gcsOutputDirectory", "")
    pipeline_root = DEFAULT_PIPELINE_ROOT
    if output_dir.startswith("gs://"):
        notes.append(f"gcsOutputDirectory {output_dir} is for cloud runs; the local runner "
                     f"writes its outputs under {DEFAULT_PIPELINE_ROOT}/")
    elif output_dir:
        pipeline_root = output_dir
    kms = body.get("encryptionSpec", {}).get("kmsKeyName")
    if kms:
        notes.append(f"encryptionSpec.kmsKeyName {kms} is recorded; local files are not encrypted")
    return RunRequest(template_path(template), dict(runtime.get("parameterValues", {})),
                      pipeline_root, body.get("displayName", ""), tuple(notes))


def prepare(request: RunRequest) -> tuple[str, dict[str, Any]]:
    """The pipeline name and the checked, typed parameter values of a request."""
    from components.common.parameters import check_parameters, refused_parameters
    from components.common.precision import requested_precision

    requested_precision()  # a bad TUNEPIPE_PRECISION is refused before any task starts
    pipeline_name, template = read_template(request.template)
    values = bind_parameters(template, request.parameters, refused_parameters(pipeline_name))
    problems = check_parameters(pipeline_name, values)
    if problems:
        raise ParameterError("\n".join(f"  - {p}" for p in problems))
    return pipeline_name, values


_TASK_EVENT = re.compile(r"^(Executing task|Task) '(?P<task>[\w-]+)'( finished with status)?")
_ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")


class _RunnerLog(io.TextIOBase):
    """Passes the runner's log through (less, unless ``verbose``, the executor-input JSON each
    task dumps) and times every task from its "Executing task" line to its "finished" line."""

    def __init__(self, target, verbose: bool):
        self._target, self._verbose = target, verbose
        self._pending, self._skipping = "", False
        self._started: dict[str, float] = {}
        self.task_seconds: dict[str, float] = {}

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._time_task(line)
            if self._verbose:
                self._target.write(line + "\n")
            elif "Got executor_input:" in line:
                self._skipping = True
            elif self._skipping:
                self._skipping = line.rstrip() != "    }"
            else:
                self._target.write(line + "\n")
        self._target.flush()
        return len(text)

    def _time_task(self, line: str) -> None:
        if " - INFO - " not in line:
            return
        event = _TASK_EVENT.search(_ANSI_COLOR.sub("", line).split(" - INFO - ", 1)[1])
        if not event:
            return
        if event.group(1) == "Executing task":
            self._started[event["task"]] = time.perf_counter()
        elif event.group(3) and event["task"] in self._started:
            self.task_seconds[event["task"]] = time.perf_counter() - self._started[event["task"]]

    def flush(self) -> None:
        self._target.flush()


@dataclass
class LocalRun:
    """A finished local run: its pipeline, output folder and the wall time of each task."""

    pipeline_name: str
    run_dir: Path
    task_seconds: dict[str, float]  # task name (validate-dataset, tune, ...) -> seconds
    seconds: float


def run_locally(request: RunRequest, verbose: bool = False) -> LocalRun:
    """Runs the request's template with the KFP local runner; returns the run's output folder
    and task times.

    Unless ``verbose``, the JSON executor input that KFP logs for every task is left out.
    """
    import kfp.local
    from kfp import components

    pipeline_name, values = prepare(request)
    pipeline_root = Path(request.pipeline_root).expanduser().resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The runner deletes its workspace after each run: give it a fresh temporary one.
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(pipeline_root),
                   workspace_root=tempfile.mkdtemp(prefix="tunepipe-workspace-"))
    pipeline = components.load_component_from_file(str(request.template))
    before = set(pipeline_root.iterdir())
    started = time.perf_counter()
    log = _RunnerLog(sys.stdout, verbose)
    with contextlib.redirect_stdout(log), \
            warnings.catch_warnings():
        # Display names, accelerators and the container image matter on Vertex and KFP; the
        # local runner says at every task that it ignores them.
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner")
        warnings.filterwarnings("ignore", message=".*non-Python base image")
        pipeline(**values)
    seconds = time.perf_counter() - started
    print(f"{pipeline_name} finished in {seconds:.0f} s")
    new = sorted(set(pipeline_root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    return LocalRun(pipeline_name, new[-1] if new else pipeline_root, log.task_seconds, seconds)

