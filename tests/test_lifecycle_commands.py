"""Lifecycle commands: registered models' versions, deploying and stopping endpoints, the local
runs' folders (list, show, rm), and reports written for Markdown viewers."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from command.main import main
from components.common.markdown import write_report
from components.deploy_endpoint import endpoints
from pipelines.templates import COMPILED_DIR, pipeline_spec

RUN_NAME = "tune-large-model-2026-01-02-03-04-05-123456"
OLDER_RUN = "tune-large-model-2025-12-31-23-59-59-000001"


def test_models_list_shows_versions(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))
    for name, version in (("intents", 1), ("intents", 2), ("chat", 1)):
        (tmp_path / "registry" / name / str(version)).mkdir(parents=True)
    registry = tmp_path / "registry"
    assert main(["models", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"chat@1\t{registry}/chat/1\t1 version",
        f"intents@2\t{registry}/intents/2\t2 versions (--all lists them)"]
    assert main(["models", "list", "--all"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"chat@1\t{registry}/chat/1", f"intents@1\t{registry}/intents/1",
        f"intents@2\t{registry}/intents/2"]


# --- endpoints ------------------------------------------------------------------------------

def test_deploy_a_registered_version_list_its_log_and_stop_all(tuned_checkpoint, capsys):
    from components.common.model_registry import register_model

    first = register_model(tuned_checkpoint, "lifecycle", {})
    register_model(tuned_checkpoint, "lifecycle", {})
    try:
        assert main(["endpoints", "deploy", "lifecycle@1"]) == 0
        deployed = capsys.readouterr().out.strip().split("\t")
        assert deployed[0] == "lifecycle" and deployed[3] == str(first.path)
        assert main(["endpoints", "list"]) == 0
        (line,) = [entry for entry in capsys.readouterr().out.splitlines()
                   if entry.startswith("lifecycle\t")]
        name, url, pid, model_dir, log = line.split("\t")
        assert url.startswith("http://127.0.0.1:") and model_dir == str(first.path)
        assert Path(log.removeprefix("log ")).is_file()
        reply = endpoints.predict("lifecycle", ["Classify: where is my parcel?"],
                                  {"maxOutputTokens": 2})
        assert len(reply["predictions"]) == 1
        # A second endpoint under another name, from a model folder.
        assert main(["endpoints", "deploy", str(first.path), "--name", "lifecycle-copy"]) == 0
        capsys.readouterr()
    finally:
        assert main(["endpoints", "stop", "--all"]) == 0
    assert capsys.readouterr().out.strip() == "stopped lifecycle-copy, lifecycle"
    assert endpoints.list_endpoints() == []
    assert main(["endpoints", "stop", "--all"]) == 0
    assert capsys.readouterr().out.strip() == "no running endpoints"


def test_deploy_and_stop_explain_mistakes(capsys):
    assert main(["endpoints", "deploy", "no-such-model@3"]) == 1
    assert "No registered model named 'no-such-model'" in capsys.readouterr().err
    assert main(["endpoints", "stop"]) == 2
    assert capsys.readouterr().err.strip() == ("tunepipe endpoints stop: name an endpoint or "
                                               "give --all")


def test_stop_all_ends_starting_and_dead_endpoints_records(tmp_path, monkeypatch):
    """A record whose server is still starting (no URL) is stopped; a dead one's is removed."""
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))
    (tmp_path / "endpoints").mkdir()
    starting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("starting", starting.pid), ("dead", dead.pid)):
        endpoints._write_record(endpoints.Endpoint(name, "", pid, "/m", "/m.log"))
    assert endpoints.stop_all_endpoints() == ["starting"]
    with pytest.raises(ProcessLookupError):  # ended (and reaped)
        os.kill(starting.pid, 0)
    assert list((tmp_path / "endpoints").glob("*.json")) == []


# --- runs -----------------------------------------------------------------------------------

def _tasks() -> dict[str, dict]:
    spec = pipeline_spec(COMPILED_DIR / "tune-large-model.yaml")
    return {name.removeprefix("comp-"): component.get("outputDefinitions", {})
            for name, component in spec["components"].items()}


def make_run(root: Path, name: str, unfinished: tuple[str, ...] = ()) -> Path:
    """A run folder as the KFP local runner leaves it: a folder per task, with its outputs and,
    once it succeeded, its executor output (the artifacts' URIs where the run was made)."""
    run = root / name
    for task, outputs in _tasks().items():
        folder = run / task
        folder.mkdir(parents=True)
        artifacts = {}
        for output in outputs.get("artifacts", {}):
            (folder / output).write_text("x" * 1000)
            metadata = {"eval_total_loss": 1.23456, "steps": 4} if output.endswith(
                "metrics") else {}
            artifacts[output] = {"artifacts": [{"name": output, "metadata": metadata,
                                                "uri": f"/elsewhere/{name}/{task}/{output}"}]}
        if task not in unfinished:
            (folder / "executor_output.json").write_text(json.dumps({"artifacts": artifacts}))
    return run


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    make_run(root, RUN_NAME)
    make_run(root, OLDER_RUN, unfinished=("tune",))
    (root / "notes").mkdir()  # not a run: never listed nor removed
    return root


def test_runs_list_newest_first_with_state_and_size(runs_root, capsys):
    assert main(["runs", "list", "--pipeline-root", str(runs_root)]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [line[:3] for line in lines] == [
        [RUN_NAME, "tune-large-model", "succeeded"],
        [OLDER_RUN, "tune-large-model", "failed (tune)"]]
    assert all(line[3].endswith(" kB") and line[4].endswith(" ago") for line in lines)


def test_runs_show_prints_outputs_metrics_and_reports(runs_root, capsys):
    run = runs_root / RUN_NAME
    write_report(run / "evaluate" / "report", "# Evaluation\n")
    assert main(["runs", "show", RUN_NAME, "--pipeline-root", str(runs_root)]) == 0
    out = capsys.readouterr().out
    assert f"run:      {run}\n" in out and "state:    succeeded\n" in out
    assert f"  tuned_model: {run}/tune/tuned_model\n" in out  # where the run is now
    assert "  training_metrics: eval_total_loss 1.235, steps 4\n" in out
    reports = out.split("reports:\n")[1].splitlines()
    assert sorted(reports) == [f"  {run}/evaluate/report.md", f"  {run}/tune/loss_curve",
                               f"  {run}/validate-dataset/report"]


def test_runs_rm_refuses_a_running_run_and_removes_the_others(runs_root, capsys):
    running = runs_root / RUN_NAME
    # A task process: the executor input on its command line names the run's folder.
    task = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "--executor_input", json.dumps({"outputs": {
                                 "outputFile": f"{running}/tune/executor_output.json"}})])
    try:
        assert main(["runs", "list", "--pipeline-root", str(runs_root)]) == 0
        assert f"\trunning (pid {task.pid})\t" in capsys.readouterr().out
        assert main(["runs", "rm", RUN_NAME, "--pipeline-root", str(runs_root)]) == 1
        assert capsys.readouterr().err.strip() == (
            f"tunepipe runs rm: kept {RUN_NAME} is still running (pid {task.pid}): stop its "
            "`tunepipe run` first")
        assert running.is_dir()
        assert main(["runs", "rm", "--all", "--pipeline-root", str(runs_root)]) == 1
        assert capsys.readouterr().out == f"removed {runs_root / OLDER_RUN}\n"
    finally:
        task.kill()
        task.wait()
    assert main(["runs", "rm", str(running)]) == 0  # by path
    assert sorted(os.listdir(runs_root)) == ["notes"]
    assert main(["runs", "rm", RUN_NAME, "--pipeline-root", str(runs_root)]) == 1
    assert f"no run {RUN_NAME!r} in {runs_root}" in capsys.readouterr().err
    assert main(["runs", "rm", "--pipeline-root", str(runs_root)]) == 2


# --- reports --------------------------------------------------------------------------------

def test_reports_are_written_for_viewers_with_their_images_beside(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    inline = base64.b64encode(png).decode()
    markdown = (f"# Evaluation\n\n![loss per step](data:image/png;base64,{inline})\n\n"
                f"![again](data:image/png;base64,{inline})\n")
    artifact = tmp_path / "evaluate" / "report"
    written = write_report(artifact, markdown)
    assert written == [str(artifact) + suffix for suffix in ("-1.png", "-2.png", ".md")]
    assert artifact.read_text() == markdown  # the KFP UIs show this file alone
    assert (tmp_path / "evaluate" / "report-1.png").read_bytes() == png
    assert (tmp_path / "evaluate" / "report.md").read_text() == (
        "# Evaluation\n\n![loss per step](report-1.png)\n\n![again](report-2.png)\n")
