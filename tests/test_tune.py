"""The tuner on a tiny model: semantics, checkpoints, metrics, early stopping."""
from __future__ import annotations

import json

import pytest

import numpy as np
import torch

from components.common.dataset_formats import Example, Limits
from components.common.model_loading import load_base_model
from components.common.packing import row_groups
from components.common.model_catalog import resolve_model
from components.common.model_loading import load_tokenizer, load_tuned_model
from components.common.artifacts.token_dataset import TokenDataset, TokenDatasetWriter
from components.tune import settings
from components.tune.settings import batch_size_for, steps_for_epochs
from components.common.distillation_tasks import WeightedTask
from components.common.token_metrics import TokenScores
from components.tune.trainer import (EARLY_STOPPING_MIN_DELTA, EARLY_STOPPING_PATIENCE, BatchSampler,
                                     TrainingObjective, TuneConfig, learning_rate_at,
                                     stale_evaluations_after, tune)
from tests.tokenized import write_distillation_tokens
from tests.tolerances import (gradient_norm_bound, loss_sum_bound,
                              training_record_bounds)

VERTEX_TRAIN_METRICS = ["/train_total_loss", "/train_fraction_of_correct_next_step_preds",
                        "/train_num_predictions"]
VERTEX_EVAL_METRICS = ["/eval_total_loss", "/eval_fraction_of_correct_next_step_preds",
                       "/eval_num_predictions"]


def test_batch_sampler_sees_steps_times_batch_size_examples_epoch_by_epoch():
    sampler = BatchSampler(num_examples=10, batch_size=4, seed=3)
    seen = [i for step in range(5) for i in sampler.indices(step)]  # 20 examples = 2 epochs
    assert len(seen) == 20
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a fresh order each epoch
    assert BatchSampler(10, 4, seed=3).indices(3) == sampler.indices(3)  # depends on step only


def test_learning_rate_warms_up_then_decays():
    config = TuneConfig(train_steps=100, learning_rate=1e-3)
    rates = [learning_rate_at(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4)
    assert max(rates) == pytest.approx(1e-3)
    assert rates[-1] < rates[50] < rates[10]
    assert min(rates) >= 1e-4 * 0.999


@pytest.mark.parametrize("context_class, accelerator, expected",
                         [("8k", "GPU", 8), ("8k", "TPU", 24), ("32k", "GPU", 8), ("32k", "TPU", 8)])
def test_batch_size_follows_vertex_rules(context_class, accelerator, expected):
    assert batch_size_for(context_class, accelerator) == expected


def test_bad_settings_are_refused_with_the_parameter_named():
    with pytest.raises(ValueError, match="accelerator_type 'CPU' is not 'GPU' or 'TPU'"):
        batch_size_for("8k", "CPU")
    with pytest.raises(ValueError, match="train_steps"):
        TuneConfig(train_steps=0, learning_rate=1e-3)
    with pytest.raises(ValueError, match="adapter_size"):
        TuneConfig(train_steps=1, learning_rate=1e-3, adapter_size=3)


def test_tune_writes_checkpoints_metrics_and_tensorboard(tmp_path, tiny_model_dir, token_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, evaluation = token_data
    base = resolve_model(str(tiny_model_dir)).to_dict()
    config = TuneConfig(train_steps=6, learning_rate=3e-3, batch_size=4, evaluation_interval=3,
                        enable_early_stopping=False)
    result = tune(base, train, evaluation, tmp_path, config)

    assert result.final_step == 6 and not result.stopped_early
    assert [c["step"] for c in result.checkpoints] == [3, 6]
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    assert index["final_step"] == 6 and index["base_model"]["checkpoint"] == str(tiny_model_dir)
    for checkpoint in index["checkpoints"]:
        folder = tmp_path / checkpoint["dir"]
        assert (folder / "adapter" / "adapter_model.safetensors").exists()
        assert (folder / "training_state.pt").exists()
        assert set(checkpoint["eval"]) == {m.lstrip("/") for m in VERTEX_EVAL_METRICS}
    assert not list(tmp_path.glob("checkpoints/*.partial"))

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train_total_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert train_records[0]["train_num_predictions"] > 0
    assert train_records[-1]["train_total_loss"] < train_records[0]["train_total_loss"]
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in VERTEX_TRAIN_METRICS + VERTEX_EVAL_METRICS + ["/learning_rate", "/tokens_per_second",
                                                               "/memory_bytes"]:
        assert name in tags, name
    assert [e.step for e in events.Scalars("/eval_total_loss")] == [3, 6]

    model, tokenizer, metadata = load_tuned_model(tmp_path / index["checkpoints"][-1]["dir"])
    assert metadata["step"] == 6 and metadata["base_model"]["reference"] == str(tiny_model_dir)
    assert metadata["input_prefix"] == ""  # single-task data: prompts as they are


def test_loss_is_only_on_target_tokens(token_data):
    train, _ = token_data
    dataset = TokenDataset(train)
    tokens, mask = dataset[0]
    assert 0 < mask.sum() < len(mask)
    assert mask[0] == 0 and mask[-1] == 1  # the prompt is masked, the answer's end is a target


def test_early_stopping_stops_when_accuracy_stalls(tmp_path, tiny_model_dir, token_data):
    train, evaluation = token_data
    base = resolve_model(str(tiny_model_dir)).to_dict()
    # A learning rate this small leaves the eval accuracy where it is: no progress.
    config = TuneConfig(train_steps=20, learning_rate=1e-12, batch_size=2, evaluation_interval=2,
                        enable_early_stopping=True)
    result = tune(base, train, evaluation, tmp_path, config)
    # Evaluations at 2, 4, 6: the ones at 4 and 6 show no gain (patience 2), so it stops at 6.
    assert result.stopped_early and result.final_step == 6
    assert [c["step"] for c in result.checkpoints] == [2, 4, 6]


# --- semantics: batch size, learning rate, steps from epochs, adapter sizes -----------------------

def test_batch_size_can_be_overridden_by_the_environment(monkeypatch):
    monkeypatch.delenv(settings.BATCH_SIZE_ENV, raising=False)
    assert settings.batch_size("8k", "TPU") == 24
    monkeypatch.setenv(settings.BATCH_SIZE_ENV, "3")
    assert settings.batch_size("8k", "TPU") == 3 and settings.batch_size("32k", "GPU") == 3
    monkeypatch.setenv(settings.BATCH_SIZE_ENV, "zero")
    with pytest.raises(ValueError, match="TUNEPIPE_BATCH_SIZE"):
        settings.batch_size("8k", "GPU")


def test_learning_rate_is_the_recommended_one_times_the_multiplier():
    model = resolve_model("text-bison@002")
    assert model.recommended_learning_rate == 1e-3
    assert settings.learning_rate(model, 1.0) == pytest.approx(1e-3)
    assert settings.learning_rate(model, 0.5) == pytest.approx(5e-4)
    assert settings.learning_rate(model, 2.0, "full") == pytest.approx(2 * 1e-3 * settings.FULL_FINE_TUNING_LR_SCALE)
    with pytest.raises(ValueError, match="learning_rate_multiplier"):
        settings.learning_rate(model, 0.0)


@pytest.mark.parametrize("epochs, examples, batch, steps", [
    (2, 240, 24, 20),  # docs/parameters.md: 240 examples, TPU, 20 steps = 2 epochs
    (0.5, 240, 8, 15),  # docs/parameters.md: GPU, 15 steps = 0.5 epoch
    (1, 10, 8, 2),  # ceil: the second step starts the next epoch
    (0.1, 30, 3, 1),  # exact decimal arithmetic: not ceil(1.0000000000000002)
    (0.01, 10, 8, 1),  # at least one step
])
def test_steps_for_epochs_is_the_ceiling_of_examples_over_batch_size(epochs, examples, batch, steps):
    assert steps_for_epochs(epochs, examples, batch) == steps


def test_adapter_sizes_are_lora_ranks():
    assert [settings.adapter_size(v) for v in (1, "4", "ADAPTER_SIZE_EIGHT", "adapter_size_sixteen",
                                                None, "ADAPTER_SIZE_UNSPECIFIED")] == [1, 4, 8, 16, 8, 8]
    with pytest.raises(ValueError, match="adapter size"):
        settings.adapter_size(32)
    with pytest.raises(ValueError, match="method"):
        TuneConfig(train_steps=1, learning_rate=1e-3, method="qlora")


# --- early stopping ----------------------------------------------------------------------------

def _stop_evaluation(accuracies: list[float]) -> int | None:
    """The 1-based evaluation after which the documented rule stops, or None."""
    stale, previous = 0, None
    for number, accuracy in enumerate(accuracies, start=1):
        stale = stale_evaluations_after(stale, previous, accuracy)
        previous = accuracy
        if stale >= EARLY_STOPPING_PATIENCE:
            return number
    return None


def test_early_stopping_rule_never_stops_before_the_second_evaluation():
    assert EARLY_STOPPING_PATIENCE == 2 and EARLY_STOPPING_MIN_DELTA == 0.001
    flat = [0.5] * 6
    assert _stop_evaluation(flat[:1]) is None  # the first evaluation is never stale
    assert _stop_evaluation(flat[:2]) is None  # one stale evaluation is not enough
    assert _stop_evaluation(flat) == 3  # the earliest stop
    assert _stop_evaluation([0.5, 0.4, 0.3]) == 3  # getting worse is stale too
    # A gain of at least the minimum resets the count; smaller gains do not.
    assert _stop_evaluation([0.5, 0.5, 0.502, 0.502, 0.5025]) == 5
    assert _stop_evaluation([0.1, 0.2, 0.3, 0.4]) is None


# --- loss mask: chat ------------------------------------------------------------------------------

def test_chat_examples_train_only_on_assistant_turns(tmp_path, tiny_model_dir):
    from components.common.encoding import ExampleEncoder

    tokenizer = load_tokenizer(tiny_model_dir)
    encoder = ExampleEncoder(tokenizer, "chat", Limits(8192, 1024))
    conversations = [Example(context="Be brief.", turns=(("Hi there", "Hello!"),
                                                         ("What is 2+2?", "Four."))),
                     Example(context=None, turns=(("Name a colour", "Blue"),
                                                  ("Another one", "Green, then red.")))]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with TokenDatasetWriter(tmp_path / "train") as writer:
        for conversation in conversations:
            encoded = encoder.encode(conversation)
            ids, mask = np.asarray(encoded.ids), encoded.mask
            # Two assistant turns, each ending with its end-of-turn token, are the only targets.
            starts = np.flatnonzero(np.diff(np.r_[0, mask]) == 1)
            ends = np.flatnonzero(np.diff(np.r_[mask, 0]) == -1)
            assert len(starts) == 2 and all(ids[end] == end_of_turn for end in ends)
            writer.add(ids, mask)
    expected_targets = sum(int(m[1:].sum()) for _, m in TokenDataset(tmp_path / "train"))

    config = TuneConfig(train_steps=1, learning_rate=1e-3, batch_size=2, precision="fp32")
    tune(resolve_model(str(tiny_model_dir)).to_dict(), tmp_path / "train", None, tmp_path / "out", config)
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert record["train_num_predictions"] == expected_targets


# --- multi-task (distillation) loss --------------------------------------------------------------

def test_objective_scales_and_metrics():
    single = TrainingObjective()
    assert single.mask_values == () and single.loss_scale([13], 2, "cpu") == 2 / 13
    assert single.metrics([26.0], 5, [13]) == TokenScores(26.0, 5, 13).metrics("train")
    tasks = TrainingObjective((WeightedTask("label", 1, 0.3), WeightedTask("rationale", 2, 0.7)))
    assert tasks.mask_values == (1, 2)
    torch.testing.assert_close(tasks.loss_scale([3, 10], 2, "cpu"),
                               torch.tensor([2 * 0.3 / 3, 2 * 0.7 / 10]))
    metrics = tasks.metrics([6.0, 30.0], 5, [3, 10])
    assert metrics["train_total_loss"] == pytest.approx(0.3 * 2.0 + 0.7 * 3.0)
    assert (metrics["train_label_loss"], metrics["train_rationale_loss"]) == (2.0, 3.0)
    assert metrics["train_num_predictions"] == 13 and metrics[
        "train_fraction_of_correct_next_step_preds"] == pytest.approx(5 / 13)
    # A batch without rationale targets: the label term alone, no rationale loss to log.
    metrics = tasks.metrics([6.0, 0.0], 1, [3, 0])
    assert metrics["train_total_loss"] == pytest.approx(0.6)
    assert "train_rationale_loss" not in metrics


def _objective_by_hand(model, examples, weights: dict[int, float]):
    """sum_t weight_t x (summed cross-entropy of task t's targets) / (task t's targets), from
    each example's own forward (no packing) and per-token cross-entropy; each task's mean and
    its number of targets."""
    sums, counts = dict.fromkeys(weights, 0.0), dict.fromkeys(weights, 0)
    for ids, mask in examples:
        ids = torch.from_numpy(ids.astype(np.int64))
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
        per_token = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
        tasks = torch.from_numpy(mask[1:].astype(np.int64))
        for task in weights:
            sums[task] = sums[task] + per_token[tasks == task].sum()
            counts[task] += int((tasks == task).sum())
    means = {task: sums[task] / counts[task] for task in weights}
    return sum(weights[task] * means[task] for task in weights), means, counts


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_multi_task_step_minimizes_the_weighted_task_means(tmp_path, tiny_model_dir, alpha):
    tokens = write_distillation_tokens(tiny_model_dir, tmp_path / "data", examples=8,
                                       label_loss_weight=alpha)
    train = TokenDataset(tokens / "train")
    examples = list(train)
    assert {int(v) for _, m in examples for v in np.unique(m)} == {0, 1, 2}
    # One step over the whole dataset, in several micro-batches: full fine-tuning, so the
    # gradient is the base model's and its norm (logged before clipping) checks its scale.
    max_tokens = 200
    assert len(row_groups([len(ids) for ids, _ in examples], max_tokens)) > 2
    config = TuneConfig(train_steps=1, learning_rate=1e-3, batch_size=len(examples),
                        method="full", precision="fp32", max_tokens_per_micro_batch=max_tokens)
    result = tune(resolve_model(str(tiny_model_dir)).to_dict(), tokens / "train", None,
                  tmp_path / "out", config)
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]

    model = load_base_model(tiny_model_dir)
    objective, means, counts = _objective_by_hand(model, examples, {1: alpha, 2: 1 - alpha})
    objective.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    # Packed rows against one forward per example: the same sums in other orders. Each task's
    # mean within the forward's float32 bound of its summed loss (tests/tolerances.py) over its
    # targets, the objective within their weighted sum; the gradient norm within the norm of the
    # gradients' bounds.
    tokens, positions = max(len(ids) for ids, _ in examples), sum(len(ids) for ids, _ in examples)
    bounds = {task: loss_sum_bound(model, tokens, counts[task], means[task].item() * counts[task])
              / counts[task] for task in means}
    for name, task in (("train_label_loss", 1), ("train_rationale_loss", 2)):
        assert abs(record[name] - means[task].item()) <= bounds[task], name
    assert (abs(record["train_total_loss"] - objective.item())
            <= alpha * bounds[1] + (1 - alpha) * bounds[2])
    assert record["train_num_predictions"] == sum(counts.values())
    norm_bound = gradient_norm_bound(model.config, tokens, positions, float(grad_norm))
    assert abs(record["grad_norm"] - float(grad_norm)) <= norm_bound
    if alpha == 1.0:  # the label task alone: 1 x label mean + 0 x rationale mean, exactly
        assert record["train_total_loss"] == record["train_label_loss"]
    metadata = json.loads((tmp_path / "out" / result.checkpoints[-1]["dir"] /
                           "tunepipe_model.json").read_text())
    assert metadata["input_prefix"] == "[label] "


# --- full fine-tuning and adapter sizes ------------------------------------------------------------

def test_full_fine_tuning_writes_a_loadable_model_and_resumes(tmp_path, tiny_model_dir, token_data):
    train, evaluation = token_data
    base = resolve_model(str(tiny_model_dir)).to_dict()
    config = TuneConfig(train_steps=4, learning_rate=1e-3, batch_size=4, method="full",
                        evaluation_interval=2, enable_early_stopping=False, precision="fp32")
    tune(base, train, evaluation, tmp_path / "whole", config)

    def crash_after_step_3(step):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tune(base, train, evaluation, tmp_path / "resumed", config, on_step_end=crash_after_step_3)
    tune(base, train, evaluation, tmp_path / "resumed", config, resume=True)

    tuned, _, metadata = load_tuned_model(tmp_path / "whole" / "checkpoints" / "step-000004")
    resumed, _, _ = load_tuned_model(tmp_path / "resumed" / "checkpoints" / "step-000004")
    original, _, _ = load_tuned_model(tmp_path / "whole" / "checkpoints" / "step-000002")
    assert metadata["tuning_method"] == "full" and metadata["adapter_size"] is None
    assert not (tmp_path / "whole" / "checkpoints" / "step-000004" / "adapter").exists()
    weights = dict(tuned.named_parameters())
    assert any(not torch.equal(p, weights[n]) for n, p in original.named_parameters())
    # the same code on the same data in the same order from the restored weights, optimizer
    # state and random generators: the same bits
    for name, parameter in resumed.named_parameters():
        assert torch.equal(parameter, weights[name]), name


@pytest.mark.parametrize("rank", [1, 16])
def test_adapter_size_is_the_saved_lora_rank(tmp_path, tiny_model_dir, token_data, rank):
    train, _ = token_data
    config = TuneConfig(train_steps=1, learning_rate=1e-3, batch_size=2, adapter_size=rank)
    result = tune(resolve_model(str(tiny_model_dir)).to_dict(), train, None, tmp_path, config)
    folder = tmp_path / result.checkpoints[-1]["dir"]
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == rank
    metadata = json.loads((folder / "tunepipe_model.json").read_text())
    assert metadata["adapter_size"] == rank and metadata["peak_memory_bytes"] > 0
    assert metadata["examples_seen"] == 2


def test_a_folder_holding_a_run_is_not_overwritten_without_resume(tmp_path, tiny_model_dir, token_data):
    train, _ = token_data
    base = resolve_model(str(tiny_model_dir)).to_dict()
    config = TuneConfig(train_steps=1, learning_rate=1e-3, batch_size=2)
    tune(base, train, None, tmp_path, config)
    with pytest.raises(FileExistsError, match="resume"):
        tune(base, train, None, tmp_path, config)
    # Resuming a finished run does nothing and returns its result.
    again = tune(base, train, None, tmp_path, config, resume=True)
    assert again.final_step == 1 and [c["step"] for c in again.checkpoints] == [1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def _adapter_tensors(output) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    checkpoint = json.loads((output / "checkpoints.json").read_text())["checkpoints"][-1]
    return load_file(str(output / checkpoint["dir"] / "adapter" / "adapter_model.safetensors"))


def test_compile_warm_up_is_its_own_phase_and_changes_no_result(tmp_path, tiny_model_dir, token_data,
                                                               capsys):
    train, evaluation = token_data
    base = resolve_model(str(tiny_model_dir)).to_dict()
    results = {}
    for mode in ("off", "on"):
        capsys.readouterr()
        config = TuneConfig(train_steps=3, learning_rate=3e-3, batch_size=4, compile=mode)
        results[mode] = tune(base, train, None, tmp_path / mode, config)
    assert results["off"].compile_seconds == 0.0
    assert results["on"].compile_seconds > 0.0
    output = capsys.readouterr().out
    assert "tune: compile warm-up done in" in output
    assert output.index("compile warm-up done") < output.index("tune 0/3")  # bar starts after it
    metrics = {mode: [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").open()]
               for mode in results}
    # compiled graphs add in other orders: tests/tolerances.py's bounds of two training runs
    examples = list(TokenDataset(train))
    parameters = sum(t.numel() for t in _adapter_tensors(tmp_path / "off").values())
    for eager, compiled in zip(metrics["off"], metrics["on"], strict=True):
        bounds = training_record_bounds(
            load_base_model(tiny_model_dir), max(len(ids) for ids, _ in examples),
            sum(len(ids) for ids, _ in examples), parameters, 3e-3, eager)
        for name, bound in bounds.items():
            assert abs(compiled[name] - eager[name]) <= bound, (eager["step"], name)
    # The warm-up compiled every graph: no training step compiles (the first one included).
    warm_up = results["on"].compile_seconds
    assert all(record["step_seconds"] < warm_up / 4 for record in metrics["on"])


def test_compile_auto_only_where_it_was_measured_to_pay():
    from components.tune.acceleration import COMPILE_MIN_STEPS, wants_compile

    class Runtime:
        def __init__(self, device, dtype):
            self.device, self.dtype = torch.device(device), dtype

    big = torch.nn.Linear(8000, 8000)  # 64M parameters: above COMPILE_MIN_PARAMETERS
    small = torch.nn.Linear(10, 10)
    bf16_cpu, fp32_cpu = Runtime("cpu", torch.bfloat16), Runtime("cpu", torch.float32)
    assert wants_compile("auto", big, bf16_cpu, True, COMPILE_MIN_STEPS)
    assert not wants_compile("auto", big, bf16_cpu, True, COMPILE_MIN_STEPS - 1)
    assert wants_compile("auto", big, fp32_cpu, True, COMPILE_MIN_STEPS)
    assert not wants_compile("auto", big, fp32_cpu, True, COMPILE_MIN_STEPS - 1)
    assert not wants_compile("auto", big, Runtime("cuda", torch.bfloat16), True,
                             10 * COMPILE_MIN_STEPS)
    assert not wants_compile("auto", small, bf16_cpu, True, 10 * COMPILE_MIN_STEPS)
    assert not wants_compile("auto", big, bf16_cpu, False, 10 * COMPILE_MIN_STEPS)
    assert wants_compile("on", small, fp32_cpu, False, 1)
    assert not wants_compile("off", big, bf16_cpu, True, 10 * COMPILE_MIN_STEPS)
