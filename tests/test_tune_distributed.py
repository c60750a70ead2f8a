"""Two processes (torchrun, gloo on CPU) train exactly what one process trains on the same batches."""
from __future__ import annotations

import json
import os

import pytest
import torch

from components.common.model_catalog import resolve_model
from components.common.model_loading import load_base_model
from components.common.artifacts.token_dataset import TokenDataset
from components.tune.launch import cli_arguments, tune_on_local_devices
from components.tune.trainer import TuneConfig
from tests.tolerances import (adam_drift_bound, assert_within, drifted_loss_bound,
                              loss_sum_bound, training_record_bounds)

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


def _eval_grad_norm(tiny_model_dir, evaluation, output) -> float:
    """The norm of the evaluation loss's gradient in the trained weights at ``output``'s last
    checkpoint."""
    from components.common.model_loading import load_tuned_model
    from components.common.packing import num_targets, pack_examples, packed_loss

    model, _, _ = load_tuned_model(output / f"checkpoints/step-{STEPS:06d}", merge=False)
    trained = [p.requires_grad_() for n, p in model.named_parameters() if "lora_" in n]
    examples = list(TokenDataset(evaluation))
    targets = sum(num_targets(e) for e in examples)
    for batch in pack_examples(examples, 10_000):
        (packed_loss(model, batch)[0] / targets).backward()
    trained = [p.grad for p in trained]
    return float(torch.sqrt(sum((g ** 2).sum() for g in trained)))


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

    # The loss and gradient of every step are the single-process ones, their sums in other
    # orders (processes, micro-batches): tests/tolerances.py's bounds of two training runs. The
    # gradient norm (before clipping) checks the gradient's scale at step 1, which Adam's
    # updates would hide (a wrong loss normalisation multiplies it by a constant).
    expected, got = _adapter(single_process_run), _adapter(tmp_path)
    model = load_base_model(tiny_model_dir)
    examples = list(TokenDataset(train))
    tokens, positions = max(len(i) for i, _ in examples), sum(len(i) for i, _ in examples)
    parameters = sum(t.numel() for t in expected.values())
    records = _records(single_process_run)
    for want, have in zip(records, _records(tmp_path), strict=True):
        assert have["step"] == want["step"] and have.keys() == want.keys()
        if "train_total_loss" in want:
            bounds = training_record_bounds(model, tokens, positions, parameters,
                                            _config().learning_rate, want)
            for name, bound in bounds.items():
                assert abs(have[name] - want[name]) <= bound, (want["step"], name)
    # The evaluation after the last step: its count exactly, its loss to first order of the
    # weights' drift, with the gradient of the evaluation loss at the reference's weights.
    final = records[-1]
    assert have["eval_num_predictions"] == final["eval_num_predictions"]
    eval_bound = (loss_sum_bound(model, tokens, final["eval_num_predictions"],
                                 final["eval_total_loss"] * final["eval_num_predictions"])
                  / final["eval_num_predictions"]
                  + drifted_loss_bound(adam_drift_bound(_config().learning_rate, STEPS),
                                       parameters, _eval_grad_norm(tiny_model_dir, evaluation,
                                                                   single_process_run)))
    assert abs(have["eval_total_loss"] - final["eval_total_loss"]) <= eval_bound
    # And so are the final weights, within Adam's drift: rounding can flip the sign of a
    # gradient entry near zero, and Adam makes a whole update of it.
    assert expected.keys() == got.keys()
    assert any(float(t.abs().max()) > 0 for n, t in got.items() if "lora_B" in n)  # it trained
    drift = adam_drift_bound(_config().learning_rate, STEPS)
    for name, tensor in expected.items():
        assert_within(got[name], tensor, drift, name)
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
