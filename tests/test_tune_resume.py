"""A tuner killed with SIGKILL mid-run and started again ends exactly where an uninterrupted run does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent
STEPS, INTERVAL = 8, 2
VERTEX_METRICS = ["train_total_loss", "train_fraction_of_correct_next_step_preds",
                  "train_num_predictions", "eval_total_loss",
                  "eval_fraction_of_correct_next_step_preds", "eval_num_predictions"]


def _tuner(tiny_model_dir, token_data, output: Path, *extra: str) -> subprocess.Popen:
    train, evaluation = token_data
    command = [sys.executable, "-m", "components.tune.cli", "--base", str(tiny_model_dir),
               "--train", str(train), "--eval", str(evaluation), "--output", str(output),
               "--steps", str(STEPS), "--evaluation-interval", str(INTERVAL), "--batch-size", "4",
               "--learning-rate", "3e-3", "--no-early-stopping", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _adapter(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output / f"checkpoints/step-{STEPS:06d}/adapter/adapter_model.safetensors"))


def _scalars(output: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    return {name: [(e.step, e.value) for e in events.Scalars("/" + name)] for name in VERTEX_METRICS}


def test_sigkilled_run_resumes_to_the_same_weights_and_metrics(tmp_path, tiny_model_dir, token_data):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = _tuner(tiny_model_dir, token_data, whole)
    # The same run, slowed down so that it can be killed between two checkpoints.
    victim = _tuner(tiny_model_dir, token_data, killed, "--step-delay", "0.5")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        index = killed / "checkpoints.json"
        records = _records(killed) if (killed / "metrics.jsonl").exists() else []
        # Kill once a checkpoint is complete and the run has logged a step past it.
        if index.exists() and records and records[-1]["step"] > json.loads(index.read_text())["final_step"]:
            os.kill(victim.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run was not killed mid-run"
    index = json.loads((killed / "checkpoints.json").read_text())
    assert index["final_step"] < STEPS and not index["finished"]
    assert max(r["step"] for r in _records(killed)) > index["final_step"]  # stale records to drop

    _finish(_tuner(tiny_model_dir, token_data, killed, "--resume"))
    _finish(uninterrupted)

    # The same final weights...
    expected, resumed = _adapter(whole), _adapter(killed)
    assert expected.keys() == resumed.keys()
    # The same code on the same data in the same order, in one thread each, from the restored
    # weights, optimizer state and random generators: the same bits, metrics included.
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    # ...the same checkpoints...
    for output in (whole, killed):
        index = json.loads((output / "checkpoints.json").read_text())
        assert [c["step"] for c in index["checkpoints"]] == list(range(INTERVAL, STEPS + 1, INTERVAL))
        assert index["finished"] and index["final_step"] == STEPS
    # ...and the same metrics, once each, in metrics.jsonl and TensorBoard.
    expected_records, resumed_records = _records(whole), _records(killed)
    assert [(r["step"], sorted(r)) for r in resumed_records] == [(r["step"], sorted(r)) for r in expected_records]
    for want, got in zip(expected_records, resumed_records):
        for name in VERTEX_METRICS:
            if name in want:
                assert got[name] == want[name], (want["step"], name)
    expected_scalars, resumed_scalars = _scalars(whole), _scalars(killed)
    for name in VERTEX_METRICS:
        steps = [step for step, _ in resumed_scalars[name]]
        assert steps == sorted(set(steps)), f"{name}: duplicate or unordered steps {steps}"
        assert steps == [step for step, _ in expected_scalars[name]]
        assert [v for _, v in resumed_scalars[name]] == [v for _, v in expected_scalars[name]]
    assert len(resumed_scalars["train_total_loss"]) == STEPS


def test_command_line_reports_bad_input_in_one_line(tmp_path, tiny_model_dir, token_data, capsys):
    from components.tune.cli import main

    base = ["--base", str(tiny_model_dir), "--output", str(tmp_path / "out"), "--steps", "1"]
    assert main([*base, "--train", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} is not a token dataset" in capsys.readouterr().err
    assert main([*base, "--train", str(token_data[0]), "--adapter-size", "3"]) == 2
    assert "adapter size must be one of (1, 4, 8, 16)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written
