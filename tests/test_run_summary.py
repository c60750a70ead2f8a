"""The run summary's time by phase and the runner-log filter that times each task."""
from __future__ import annotations

import io

from command.run_summary import phase_times, tunepipe_command
from pipelines.local_run import _RunnerLog

LOG = ("01:03:39.372 - INFO - Executing task \x1b[96m'transform'\x1b[0m\n"
       "01:03:39.373 - INFO - Streamed logs:\n"
       "    Got executor_input:\n"
       "    {\n"
       "      \"inputs\": {}\n"
       "    }\n"
       "    tokenized 320 examples\n"
       "01:03:43.863 - INFO - Task \x1b[96m'transform'\x1b[0m finished with status "
       "\x1b[92mSUCCESS\x1b[0m\n"
       "01:03:43.864 - INFO - Task \x1b[96m'transform'\x1b[0m outputs:\n")


def test_runner_log_times_tasks_and_drops_executor_input(monkeypatch):
    clock = iter([10.0, 14.5])
    monkeypatch.setattr("pipelines.local_run.time.perf_counter", lambda: next(clock))
    shown = io.StringIO()
    log = _RunnerLog(shown, verbose=False)
    for piece in (LOG[:50], LOG[50:]):  # lines may arrive cut anywhere
        log.write(piece)
    assert log.task_seconds == {"transform": 4.5}
    assert "executor_input" not in shown.getvalue() and "\"inputs\"" not in shown.getvalue()
    assert "tokenized 320 examples" in shown.getvalue()


def test_runner_log_verbose_keeps_everything(monkeypatch):
    clock = iter([1.0, 2.0])
    monkeypatch.setattr("pipelines.local_run.time.perf_counter", lambda: next(clock))
    shown = io.StringIO()
    _RunnerLog(shown, verbose=True).write(LOG)
    assert shown.getvalue() == LOG


def test_phases_group_tasks_and_take_the_compile_warm_up_out_of_tune():
    tasks = {"validate-dataset": 41.0, "transform": 5.0, "tune": 160.0, "evaluate": 70.0,
             "select-checkpoint": 3.0, "upload-model": 4.0, "deploy-endpoint": 8.0,
             "generate-rationales": 30.0, "notify-owner": 2.0}
    assert phase_times(tasks, compile_seconds=50.0, setup_seconds=120.0) == [
        ("setup", 120.0), ("compile", 50.0), ("validate", 41.0), ("teacher", 30.0),
        ("transform", 5.0), ("tune", 110.0), ("evaluate", 73.0), ("deploy", 12.0),
        ("notify-owner", 2.0)]  # a task of no phase: under its own name


def test_phases_without_setup_time_start_at_compile():
    phases = phase_times({"tune": 10.0}, compile_seconds=0.0, setup_seconds=None)
    assert [name for name, _ in phases] == ["compile", "validate", "transform", "tune",
                                            "evaluate", "deploy"]


def test_printed_commands_name_a_tunepipe_that_runs_from_here(monkeypatch, tmp_path):
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "tunepipe").write_text("#!/bin/sh\n")
    (venv_bin / "tunepipe").chmod(0o755)
    monkeypatch.setattr("sys.argv", [str(venv_bin / "tunepipe")])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the environment is not active
    assert tunepipe_command() == ".venv/bin/tunepipe"
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")  # it is
    assert tunepipe_command() == "tunepipe"
