"""``tunepipe runs``: the local runner's run folders, listed, shown and removed.

``tunepipe run`` writes each run to ``<pipeline root>/<pipeline>-<start time>/`` (``runs/`` by
default), one folder per task; a task that succeeded has written its executor output there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from components.common.markdown import VIEWER_SUFFIX

# How the KFP local runner names a run's folder (kfp.local.executor_input_utils).
_RUN_FOLDER = re.compile(r"^(?P<pipeline>.+)-(?P<started>\d{4}(?:-\d\d){5}-\d{6})$")
_STARTED_FORMAT = "%Y-%m-%d-%H-%M-%S-%f"
EXECUTOR_OUTPUT = "executor_output.json"
REPORT_TYPES = ("system.Markdown", "system.HTML")
METRICS_TYPE = "system.Metrics"
SUCCEEDED = "succeeded"


@dataclass(frozen=True)
class Run:
    """One run folder."""

    path: Path
    pipeline: str
    started: datetime

    @property
    def name(self) -> str:
        return self.path.name


def _run(path: Path) -> Run | None:
    match = _RUN_FOLDER.match(path.name)
    if not (match and path.is_dir()):
        return None
    return Run(path, match["pipeline"], datetime.strptime(match["started"], _STARTED_FORMAT))


def list_runs(root: Path) -> list[Run]:
    """The runs under ``root``, newest first."""
    runs = [_run(path) for path in root.iterdir()] if root.is_dir() else []
    return sorted((run for run in runs if run), key=lambda run: run.started, reverse=True)


def find_run(root: Path, name_or_path: str) -> Run:
    """A run by folder name under ``root``, or by path; LookupError names the runs there."""
    for candidate in (Path(name_or_path), root / name_or_path):
        run = _run(candidate.resolve())
        if run:
            return run
    known = ", ".join(run.name for run in list_runs(root)[:5]) or "none"
    raise LookupError(f"no run {name_or_path!r} in {root} (newest: {known}); "
                      "list them with `tunepipe runs list`")


def running_pids(run: Run) -> list[int]:
    """The task processes still working on the run: those whose executor input names its
    folder. Read from /proc (Linux); elsewhere none are seen."""
    folder = os.fsencode(f"{run.path.resolve()}/")
    proc = Path("/proc")
    pids = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if b"executor_input" in command and folder in command:
            pids.append(int(entry.name))
    return pids


@lru_cache
def _template_tasks(pipeline: str) -> dict[str, dict]:
    """The output definitions of each task of the compiled template ``pipeline`` ({} when it
    is not compiled here)."""
    from pipelines.templates import COMPILED_DIR, pipeline_spec

    template = COMPILED_DIR / f"{pipeline}.yaml"
    if not template.is_file():
        return {}
    components = pipeline_spec(template)["components"]
    return {name.removeprefix("comp-"): spec.get("outputDefinitions", {})
            for name, spec in components.items()}


def _finished(task: Path) -> bool:
    return (task / EXECUTOR_OUTPUT).is_file()


def run_state(run: Run) -> str:
    """running (pids), succeeded, failed (the task), or how far it got."""
    pids = running_pids(run)
    if pids:
        return f"running (pid {', '.join(map(str, pids))})"
    tasks = [path for path in run.path.iterdir() if path.is_dir()]
    unfinished = sorted(task.name for task in tasks if not _finished(task))
    if unfinished:
        return f"failed ({', '.join(unfinished)})"
    expected = len(_template_tasks(run.pipeline))
    if not expected:
        return f"{len(tasks)} tasks finished"
    return SUCCEEDED if len(tasks) >= expected else f"stopped ({len(tasks)} of {expected} tasks)"


def folder_bytes(path: Path) -> int:
    """The size of the files under ``path`` (links not followed)."""
    return sum(os.lstat(os.path.join(folder, name)).st_size
               for folder, _, names in os.walk(path) for name in names)


def _size(count: float) -> str:
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB", "GB"):
        count /= 1000
        if count < 1000 or unit == "GB":
            break
    return f"{count:.1f} {unit}"


def _age(started: datetime) -> str:
    seconds = max(0, (datetime.now() - started).total_seconds())
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def list_lines(root: Path) -> list[str]:
    """``tunepipe runs list``: run, pipeline, state, size, age; newest first."""
    return [f"{run.name}\t{run.pipeline}\t{run_state(run)}\t{_size(folder_bytes(run.path))}\t"
            f"{_age(run.started)}" for run in list_runs(root)]


def _report_file(artifact: Path) -> Path:
    """A report artifact's file for viewers (:func:`components.common.markdown.write_report`)
    when written, else the artifact."""
    viewable = artifact.with_name(artifact.name + VIEWER_SUFFIX)
    return viewable if viewable.is_file() else artifact


def _metric(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show_lines(run: Run) -> list[str]:
    """``tunepipe runs show``: the run, then each task (in the order they finished) with its
    outputs, metrics and reports."""
    lines = [f"run:      {run.path}", f"pipeline: {run.pipeline}", f"state:    {run_state(run)}",
             f"started:  {run.started:%Y-%m-%d %H:%M:%S} ({_age(run.started)})",
             f"size:     {_size(folder_bytes(run.path))}"]
    tasks = sorted((path for path in run.path.iterdir() if path.is_dir()),
                   key=lambda task: (not _finished(task),
                                     (task / EXECUTOR_OUTPUT).stat().st_mtime
                                     if _finished(task) else 0, task.name))
    reports = []
    for task in tasks:
        lines.append(f"{task.name}: {SUCCEEDED if _finished(task) else 'not finished'}")
        if not _finished(task):
            continue
        output = json.loads((task / EXECUTOR_OUTPUT).read_text())
        types = {name: definition["artifactType"]["schemaTitle"] for name, definition in
                 _template_tasks(run.pipeline).get(task.name, {}).get("artifacts", {}).items()}
        for name, value in output.get("parameterValues", {}).items():
            lines.append(f"  {name} = {json.dumps(value)}")
        for name, artifacts in output.get("artifacts", {}).items():
            for artifact in artifacts["artifacts"]:
                kind = types.get(name, "")
                path = task / Path(artifact["uri"]).name  # where the run folder is now
                if kind == METRICS_TYPE:
                    lines.append(f"  {name}: " + ", ".join(
                        f"{key} {_metric(value)}" for key, value in artifact["metadata"].items()))
                elif kind in REPORT_TYPES:
                    reports.append(_report_file(path))
                    lines.append(f"  {name} (report): {reports[-1]}")
                else:
                    lines.append(f"  {name}: {path}")
    if reports:
        lines += ["reports:"] + [f"  {report}" for report in reports]
    return lines


def remove(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """Removes the runs no task process works on; (removed, why each other one was kept)."""
    removed, kept = [], []
    for run in runs:
        pids = running_pids(run)
        if pids:
            kept.append(f"{run.name} is still running (pid {', '.join(map(str, pids))}): stop "
                        "its `tunepipe run` first")
            continue
        shutil.rmtree(run.path)
        removed.append(run)
    return removed, kept
