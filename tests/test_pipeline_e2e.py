"""tune-large-model end to end: the compiled template through the KFP local runner.

Runs ``tunepipe run`` on a tiny model and checks every artifact, down to the endpoint
answering over HTTP.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from components.deploy_endpoint import endpoints
from command.main import main


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, tiny_model_dir, sample_dir):
    """The run's output folder and what ``tunepipe run`` printed."""
    root = tmp_path_factory.mktemp("pipeline-root")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["run", "tune-large-model", "--pipeline-root", str(root),
                     "--param", "project=test-project",
                     "--param", "model_display_name=tiny-intents",
                     "--param", f"dataset_uri={sample_dir / 'support_intents_train.jsonl'}",
                     "--param", f"evaluation_data_uri={sample_dir / 'support_intents_eval.jsonl'}",
                     "--param", f"large_model_reference={tiny_model_dir}",
                     "--param", "train_steps=4", "--param", "evaluation_interval=2",
                     "--param", "enable_checkpoint_selection=true"])
    assert code == 0, printed.getvalue()[-3000:]
    (run_dir,) = root.iterdir()
    yield run_dir, printed.getvalue()
    endpoints.stop_endpoint("tiny-intents", missing_ok=True)


@pytest.fixture(scope="module")
def pipeline_run(run_output):
    return run_output[0]


def test_summary_names_the_precision_and_the_time_of_each_phase(run_output):
    summary = run_output[1].split("Outputs of this run:", 1)[1]
    assert "Precision:            cpu float32: forced by TUNEPIPE_PRECISION=fp32" in summary
    phases = summary.split("Time by phase (", 1)[1].splitlines()[1]
    names = [part.strip().split()[0] for part in phases.split(",")]
    assert names == ["compile", "validate", "transform", "tune", "evaluate", "deploy"]


def test_validated_and_tokenized_data(pipeline_run):
    validated = pipeline_run / "validate-dataset" / "validated_dataset"
    assert len((validated / "train.jsonl").read_text().splitlines()) == 320
    assert len((validated / "eval.jsonl").read_text().splitlines()) == 60
    for split, count in (("train", 320), ("eval", 60)):
        meta = json.loads((pipeline_run / "transform" / "tokenized_dataset" / split / "meta.json").read_text())
        assert meta["num_examples"] == count and 0 < meta["num_target_tokens"] < meta["num_tokens"]


def test_checkpoints_and_tensorboard_metrics(pipeline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tuned = pipeline_run / "tune" / "tuned_model"
    index = json.loads((tuned / "checkpoints.json").read_text())
    assert [c["step"] for c in index["checkpoints"]] == [2, 4]
    for checkpoint in index["checkpoints"]:
        assert (tuned / checkpoint["dir"] / "adapter" / "adapter_model.safetensors").exists()
    events = EventAccumulator(str(tuned / "tensorboard"))
    events.Reload()
    for name in ("/train_total_loss", "/train_fraction_of_correct_next_step_preds",
                 "/train_num_predictions", "/eval_total_loss"):
        assert name in events.Tags()["scalars"]


def test_evaluation_covers_base_and_checkpoints(pipeline_run):
    results = json.loads((pipeline_run / "evaluate" / "evaluation_results" / "results.json").read_text())
    assert "eval_total_loss" in json.dumps(results["base"])
    assert [c["step"] for c in results["checkpoints"]] == [2, 4]
    assert (pipeline_run / "evaluate" / "report").read_text().strip()


def test_selected_checkpoint_is_registered_and_served(pipeline_run):
    selected = json.loads((pipeline_run / "select-checkpoint" / "selected_model" / "tunepipe_model.json").read_text())
    assert selected["step"] in (2, 4) and selected["selection"]

    from components.common.model_registry import get_model
    registered = get_model("tiny-intents")
    metadata = json.loads((registered.path / "tunepipe_model.json").read_text())
    assert metadata["step"] == selected["step"] and metadata["project"] == "test-project"
    assert len(metadata["dataset_sha256"]) == 64 and metadata["evaluation"]["checkpoints"]
    assert metadata["peak_memory_bytes"] > 0 and metadata["examples_seen"] == metadata["step"] * 8
    assert (registered.path / "adapter" / "adapter_model.safetensors").exists()

    record = json.loads((pipeline_run / "deploy-endpoint" / "endpoint").read_text())
    assert record["model_dir"] == str(registered.path)
    reply = endpoints.predict("tiny-intents", ["Where is my parcel?"], {"maxOutputTokens": 4})
    assert len(reply["predictions"]) == 1 and isinstance(reply["predictions"][0]["content"], str)


def test_run_refuses_unknown_parameters_before_any_work(tmp_path, capsys, sample_dir):
    code = main(["run", "tune-large-model", "--pipeline-root", str(tmp_path),
                 "--param", "project=p", "--param", "model_display_name=m",
                 "--param", f"dataset_uri={sample_dir / 'support_intents_train.jsonl'}",
                 "--param", "accelerator_type:=GPU"])
    assert code == 2
    assert "unknown parameter 'accelerator_type:' (did you mean 'accelerator_type'?)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_a_bad_precision_setting_before_any_work(tmp_path, capsys, sample_dir,
                                                             monkeypatch):
    monkeypatch.setenv("TUNEPIPE_PRECISION", "half")
    code = main(["run", "tune-large-model", "--pipeline-root", str(tmp_path),
                 "--param", "project=p", "--param", "model_display_name=m",
                 "--param", f"dataset_uri={sample_dir / 'support_intents_train.jsonl'}"])
    assert code == 2
    assert "TUNEPIPE_PRECISION must be one of auto, bf16, fp32, got 'half'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
