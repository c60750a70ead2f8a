"""Two processes (torchrun, gloo on CPU) train exactly what one process trains on the same batches."""
from __future__ import annotations

import json
import os

import pytest
import torch

from components.common.model_catalog import resolve_model
from components.tune.launch import cli_arguments, tune_on_local_devices
from components.tune.trainer import TuneConfig

STEPS = 3


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, tiny_model_dir, token_data):
    """The reference: one process, float32 (tight tolerances), batch 6 of uneven lengths."""
    output = tmp_path_factory.mktemp("single")
    train, evaluation = token_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes: the same summation orders, mostly
    try:
        tune_on_local_devices(resolve_model(str(tiny_model_dir)).to_dict(), train, evaluation,
                              output, _config(), processes=1)
    finally:
        torch.set_num_threads(threads)
    return output


def _config(sharding: str = "ddp") -> TuneConfig:
    # A global batch of 6 with micro-batches of at most 64 tokens: the two processes split it
    # 3 + 3, each into a different number of micro-batches, while one process has its own.
    return TuneConfig(train_steps=STEPS, learning_rate=3e-3, batch_size=6, evaluation_interval=STEPS,
                      enable_early_stopping=False, precision="fp32", sharding=sharding,
                      max_tokens_per_micro_batch=64)


def _adapter(output) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output / f"checkpoints/step-{STEPS:06d}/adapter/adapter_model.safetensors"))


def _records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, tiny_model_dir, token_data, single_process_run,
                                         sharding, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train, evaluation = token_data
    result = tune_on_local_devices(resolve_model(str(tiny_model_dir)).to_dict(), train, evaluation,
                                   tmp_path, _config(sharding), processes=2)
    assert result.world_size == 2 and result.final_step == STEPS

    # The gradient of every step is the single-process one: the gradient norm (before clipping)
    # checks its scale, which Adam's updates would hide (they do not change when the gradient is
    # multiplied by a constant, e.g. a wrong loss normalisation).
    for want, have in zip(_records(single_process_run), _records(tmp_path), strict=True):
        assert have["step"] == want["step"]
        for name, value in want.items():
            if name.startswith(("train_", "eval_")) or name == "grad_norm":
                assert have[name] == pytest.approx(value, rel=1e-5), (want["step"], name)
    # And so are the final weights. Adam turns the float32 rounding of near-zero gradient entries
    # into whole-size updates, so the tolerance is 1e-5 absolute: 0.3% of one step's update at
    # this learning rate (3e-3), far below what any real difference would produce.
    expected, got = _adapter(single_process_run), _adapter(tmp_path)
    assert expected.keys() == got.keys()
    assert any(float(t.abs().max()) > 0 for n, t in got.items() if "lora_B" in n)  # it trained
    for name, tensor in expected.items():
        difference = float((got[name] - tensor).abs().max())
        assert torch.allclose(got[name], tensor, rtol=1e-4, atol=1e-5), (name, difference)
    # Rank 0 alone wrote the log and the checkpoints, once.
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    metadata = json.loads((tmp_path / f"checkpoints/step-{STEPS:06d}/tunepipe_model.json").read_text())
    assert metadata["world_size"] == 2 and metadata["base_model"]["reference"] == str(tiny_model_dir)


def test_command_line_arguments_reproduce_the_config(tiny_model_dir):
    from components.tune.cli import build_parser

    config = _config("fsdp")
    arguments = build_parser().parse_args(cli_arguments(str(tiny_model_dir), "train", "eval", "out", config))
    assert (arguments.steps, arguments.learning_rate, arguments.batch_size, arguments.sharding,
            arguments.precision, arguments.max_tokens_per_micro_batch, arguments.no_early_stopping) == \
        (STEPS, config.learning_rate, 6, "fsdp", "fp32", 64, True)
    assert os.environ.get("WORLD_SIZE") is None  # the tests themselves run in one process
