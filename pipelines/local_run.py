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
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.templates import (ParameterError, bind_parameters, read_template,
                                 registry_template_note, template_path)

DEFAULT_PIPELINE_ROOT = "runs"


@dataclass
class RunRequest:
    """What to run: a template, its parameter values, where outputs go."""

    template: Path
    parameters: dict[str, Any]
    pipeline_root: str = DEFAULT_PIPELINE_ROOT
    display_name: str = ""
    notes: tuple[str, ...] = ()
    output_directory: str = ""  # the body's gcsOutputDirectory, as given (remote runs use it)
    service_account: str = ""
    kms_key_name: str = ""


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
    return request_from_body(body, str(path), template_override)


def request_from_body(body: Any, source: str, template_override: str | None = None,
                      local_root: str = DEFAULT_PIPELINE_ROOT) -> RunRequest:
    """A RunRequest from a decoded ``pipelineJobs.create`` request body; ``source`` names it in
    errors (a file, or the service's "request body"). ``template_override`` wins over the body's
    ``templateUri`` and ``pipelineSpec``; outputs go to ``local_root`` unless the body names a
    local ``gcsOutputDirectory``."""
    if not isinstance(body, dict):
        raise ParameterError(f"{source}: the request body must be a JSON object")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise ParameterError(f"{source}: unknown request fields {unknown}; a pipelineJobs request "
                             f"has {sorted(REQUEST_FIELDS)}")
    for field in ("runtimeConfig", "encryptionSpec", "pipelineSpec"):
        if not isinstance(body.get(field, {}), dict):
            raise ParameterError(f"{source}: {field} must be a JSON object")
    runtime = body.get("runtimeConfig", {})
    if not isinstance(runtime.get("parameterValues", {}), dict):
        raise ParameterError(f"{source}: runtimeConfig.parameterValues must be a JSON object")
    unknown = sorted(set(runtime) - RUNTIME_CONFIG_FIELDS)
    if unknown:
        raise ParameterError(f"{source}: unknown runtimeConfig fields {unknown}")
    problems = _text_problems(body)
    if problems:
        raise ParameterError(f"{source}: " + "; ".join(problems))
    template = template_override or body.get("templateUri")
    if not template and "pipelineSpec" in body:  # the Vertex SDK sends the template inline
        template = _inline_template(body["pipelineSpec"])
    if not template:
        raise ParameterError(f"{source}: no templateUri or pipelineSpec; name the pipeline on the "
                             "command line")
    notes = []
    output_dir = runtime.get("gcsOutputDirectory", "")
    if not isinstance(output_dir, str):
        raise ParameterError(f"{source}: runtimeConfig.gcsOutputDirectory must be a string")
    pipeline_root = local_root
    if output_dir.startswith("gs://"):
        notes.append(f"gcsOutputDirectory {output_dir} is for cloud runs; the local runner "
                     f"writes its outputs under {local_root}/")
    elif output_dir:
        pipeline_root = output_dir
    kms = body.get("encryptionSpec", {}).get("kmsKeyName")
    if kms:
        notes.append(f"encryptionSpec.kmsKeyName {kms} is recorded; local files are not encrypted")
    registry_note = registry_template_note(template)
    if registry_note:
        notes.append(registry_note)
    return RunRequest(template_path(template), dict(runtime.get("parameterValues", {})),
                      pipeline_root, body.get("displayName", ""), tuple(notes), output_dir,
                      body.get("serviceAccount", ""), kms or "")


def _text_problems(body: dict) -> list[str]:
    """The request's text beyond its limits (pipelines.parameters): displayName,
    labels, and every other string but the inline template's (it must equal a compiled one)
    and the parameter values' (check_parameters checks them)."""
    from pipelines.parameters import MAX_DISPLAY_NAME_LENGTH, labels_problems, text_problems

    problems = text_problems(body.get("displayName", ""), "displayName", MAX_DISPLAY_NAME_LENGTH)
    if "labels" in body:
        problems += labels_problems(body["labels"])
    runtime = {field: value for field, value in body.get("runtimeConfig", {}).items()
               if field != "parameterValues"}
    others = {field: value for field, value in body.items()
              if field not in ("displayName", "labels", "pipelineSpec", "runtimeConfig")}
    return problems + text_problems(runtime, "runtimeConfig") + \
        [problem for field, value in others.items() for problem in text_problems(value, field)]


def _inline_template(pipeline_spec: dict) -> str:
    """A request's inline ``pipelineSpec``, written to a temporary YAML file; its path."""
    name = pipeline_spec.get("pipelineInfo", {}).get("name", "pipeline")
    path = Path(tempfile.mkdtemp(prefix="tunepipe-spec-")) / f"{name}.yaml"
    path.write_text(json.dumps(pipeline_spec))  # JSON is YAML
    return str(path)


def request_body(request: RunRequest, pipeline_name: str, values: dict[str, Any]) -> dict:
    """The Vertex ``pipelineJobs.create`` body of a checked request (``values`` from
    :func:`prepare`); ``tunepipe run --request-file`` takes it back unchanged."""
    body = {"displayName": request.display_name or pipeline_name,
            "runtimeConfig": {"gcsOutputDirectory": request.output_directory
                              or request.pipeline_root, "parameterValues": values},
            "templateUri": str(request.template)}
    if request.service_account:
        body["serviceAccount"] = request.service_account
    if request.kms_key_name:
        body["encryptionSpec"] = {"kmsKeyName": request.kms_key_name}
    return body


def prepare(request: RunRequest, remote: bool = False,
            unchecked_gcs: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """The pipeline name and the checked, typed parameter values of a request: the names and
    values fit the template, the datasets exist and the base model resolves (``remote`` and
    ``unchecked_gcs``: see :func:`pipelines.parameters.input_problems`)."""
    from pipelines.parameters import check_parameters, input_problems, refused_parameters
    from components.common.precision import requested_precision
    from components.generate_rationales.teacher_reference import teacher_reference_problems

    requested_precision()  # a bad TUNEPIPE_PRECISION is refused before any task starts
    pipeline_name, template = read_template(request.template)
    values = bind_parameters(template, request.parameters, refused_parameters(pipeline_name))
    problems = check_parameters(pipeline_name, values) or \
        input_problems(values, remote, unchecked_gcs)
    if not problems and "teacher_model_reference" in values:
        problems = teacher_reference_problems(str(values["teacher_model_reference"]),
                                              str(values.get("project") or ""),
                                              str(values.get("location") or ""), remote)
    if problems:
        raise ParameterError("\n".join(f"  - {p}" for p in problems))
    return pipeline_name, values


_TASK_EVENT = re.compile(r"^(Executing task|Task) '(?P<task>[\w-]+)'"
                         r"( finished with status (?P<status>\w+))?")
_RUNNER_LINE = re.compile(r" - (?:INFO|WARNING|ERROR) - (?P<message>.*)$")
_ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?(?P<type>[A-Za-z_]\w*)(?:: (?P<message>.*))?$")


class TaskFailedError(RuntimeError):
    """A pipeline task failed; ``message`` is the component's own error message."""

    def __init__(self, task: str, message: str):
        super().__init__(f"task '{task}' failed: {message}")
        self.task, self.message = task, message


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


class _RunnerLog(io.TextIOBase):
    """Passes the runner's log through, times every task from its "Executing task" line to its
    "finished" line, and keeps the error message of the task that failed.

    Unless ``verbose``, the executor-input JSON each task dumps is left out, and so are the
    traceback and the exception of a failing task (its message is reported at the end).
    A task's own output is streamed indented: a traceback ends at the first line as indented
    as its "Traceback" line, the exception; the more indented lines after it continue its
    message.
    """

    def __init__(self, target, verbose: bool):
        self._target, self._verbose = target, verbose
        self._pending, self._skipping = "", False
        self._traceback_indent: int | None = None  # inside a traceback: its indentation
        self._message_indent: int | None = None  # inside an exception's message: its indentation
        self._error_lines: list[str] = []  # the message of the last exception a task printed
        self._started: dict[str, float] = {}
        self.task_seconds: dict[str, float] = {}
        self.failure: TaskFailedError | None = None

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            in_error = self._follow(_ANSI_COLOR.sub("", line))
            if self._verbose:
                self._target.write(line + "\n")
            elif "Got executor_input:" in line:
                self._skipping = True
            elif self._skipping:
                self._skipping = line.rstrip() != "    }"
            elif not in_error:
                self._target.write(line + "\n")
        self._target.flush()
        return len(text)

    def _follow(self, line: str) -> bool:
        """Times tasks and collects the message of the exception a task prints; whether the
        line belongs to a traceback or an exception."""
        if line.strip() == _TRACEBACK:
            self._traceback_indent, self._message_indent = _indent(line), None
            return True
        if self._traceback_indent is not None:
            if line.strip() and _indent(line) <= self._traceback_indent:
                exception = _EXCEPTION.match(line.strip())  # the traceback's last line
                message = exception["message"] or exception["type"] if exception else line.strip()
                self._error_lines = [message]
                self._message_indent, self._traceback_indent = _indent(line), None
            return True
        if self._message_indent is not None:
            if line.strip() and _indent(line) > self._message_indent:
                self._error_lines.append(line[self._message_indent:].rstrip())
                return True
            self._message_indent = None
        runner_line = _RUNNER_LINE.search(line)
        if runner_line:
            self._task_event(runner_line["message"])
        return False

    def _task_event(self, message: str) -> None:
        event = _TASK_EVENT.search(message)
        if not event:
            return
        task = event["task"]
        if event.group(1) == "Executing task":
            self._started[task], self._error_lines = time.perf_counter(), []
        elif event["status"] and task in self._started:
            self.task_seconds[task] = time.perf_counter() - self._started[task]
            if event["status"] == "FAILURE" and self.failure is None:
                message = "\n".join(self._error_lines) or "no error message (see the log above)"
                self.failure = TaskFailedError(task, message)

    def flush(self) -> None:
        self._target.flush()


@dataclass
class LocalRun:
    """A finished local run: its pipeline, output folder and the wall time of each task."""

    pipeline_name: str
    run_dir: Path
    task_seconds: dict[str, float]  # task name (validate-dataset, tune, ...) -> seconds
    seconds: float


def run_locally(request: RunRequest, pipeline_name: str, values: dict[str, Any],
                verbose: bool = False) -> LocalRun:
    """Runs the request's template with the KFP local runner on ``values`` (what
    :func:`prepare` returned for it); returns the run's output folder and task times.

    Unless ``verbose``, the JSON executor input that KFP logs for every task is left out, and a
    failing task raises :class:`TaskFailedError` with its own error message.
    """
    import kfp.local
    from kfp import components

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
        try:
            pipeline(**values)
        except RuntimeError as error:
            if verbose:
                raise
            raise log.failure or TaskFailedError(pipeline_name,
                                                 _ANSI_COLOR.sub("", str(error))) from None
    seconds = time.perf_counter() - started
    print(f"{pipeline_name} finished in {seconds:.0f} s")
    new = sorted(set(pipeline_root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    return LocalRun(pipeline_name, new[-1] if new else pipeline_root, log.task_seconds, seconds)

