"""The tuner on a tiny model: semantics, checkpoints, metrics, early stopping."""
from __future__ import annotations

import json

import pytest

from components.common.model_catalog import resolve_model
from components.common.model_loading import load_tokenizer, load_tuned_model
from components.common.token_dataset import TokenDataset
from components.tune.settings import batch_size_for
from components.tune.trainer import BatchSampler, TuneConfig, learning_rate_at, tune
from tests.tokenized import write_token_dataset

VERTEX_TRAIN_METRICS = ["/train_total_loss", "/train_fraction_of_correct_next_step_preds",
                        "/train_num_predictions"]
VERTEX_EVAL_METRICS = ["/eval_total_loss", "/eval_fraction_of_correct_next_step_preds",
                       "/eval_num_predictions"]


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, tiny_model_dir, sample_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    root = tmp_path_factory.mktemp("tokens")
    train = write_token_dataset(tokenizer, sample_dir / "support_intents_train.jsonl", root / "train", 40)
    evaluation = write_token_dataset(tokenizer, sample_dir / "support_intents_eval.jsonl", root / "eval", 12)
    return train, evaluation


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
    with pytest.raises(ValueError, match="accelerator_type must be GPU or TPU"):
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
