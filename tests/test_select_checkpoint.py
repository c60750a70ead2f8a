"""components.select_checkpoint: the selection rules as a table, and the component's copy."""
from __future__ import annotations

import json

import pytest

from components.select_checkpoint.selection import (choose_checkpoint, default_selection_enabled,
                                                    normalize_mode, select_and_copy)


def _checkpoints(*recorded):
    """Checkpoint entries at steps 20, 40, ... with the tuner's recorded eval loss (None: no eval)."""
    return [{"step": 20 * (i + 1), "dir": f"checkpoints/step-{20 * (i + 1):06d}",
             "eval": None if loss is None else {"eval_total_loss": loss,
                                                "eval_fraction_of_correct_next_step_preds": 0.5,
                                                "eval_num_predictions": 100.0}}
            for i, loss in enumerate(recorded)]


def _results(*losses):
    """evaluate's results.json with recomputed eval losses for steps 20, 40, ..."""
    return {"evaluated": True, "checkpoints": [
        {"step": 20 * (i + 1), "metrics": {} if loss is None else {"eval_total_loss": loss}}
        for i, loss in enumerate(losses)]}


NOT_EVALUATED = {"evaluated": False, "reason": "no evaluation data"}

# (checkpoints, results, mode, model reference, expected step, words in the reason)
CASES = [
    # true: lowest eval loss from evaluate's results
    (_checkpoints(1.0, 0.8, 0.9), _results(1.0, 0.8, 0.9), "true", "text-bison@002", 40, "lowest"),
    # true: ties go to the earlier step
    (_checkpoints(0.5, 0.5, 0.7), _results(0.5, 0.5, 0.7), "true", "text-bison@002", 20, "earlier"),
    # true: evaluate's recomputed losses win over the tuner's recorded ones
    (_checkpoints(0.1, 0.9, 0.9), _results(0.9, 0.9, 0.2), "true", "text-bison@002", 60, "final"),
    # true: without evaluate's results, the tuner's recorded losses
    (_checkpoints(0.7, 0.6, 0.9), None, "true", "text-bison@002", 40, "0.6000"),
    (_checkpoints(0.7, 0.6, 0.9), NOT_EVALUATED, "true", "text-bison@002", 40, "lowest"),
    # true: NaN and missing losses are not candidates
    (_checkpoints(float("nan"), 0.9, 0.8), _results(float("nan"), None, 0.8), "true", "x", 60, "lowest"),
    # true: the final checkpoint can be the best
    (_checkpoints(1.0, 0.9, 0.3), _results(1.0, 0.9, 0.3), "TRUE ", "text-bison@002", 60, "final"),
    # true without evaluation data: the final checkpoint
    (_checkpoints(None), NOT_EVALUATED, "true", "text-bison@002", 20, "no evaluation data"),
    (_checkpoints(None), None, "true", "text-bison@002", 20, "no evaluation data"),
    # false: the final checkpoint, even when an earlier one is better
    (_checkpoints(0.1, 0.9), _results(0.1, 0.9), "false", "text-bison@002", 40, "false"),
    # default: off for text-bison@002 (and every non-@001 model) ...
    (_checkpoints(0.1, 0.9), _results(0.1, 0.9), "default", "text-bison@002", 40, "off"),
    (_checkpoints(0.1, 0.9), _results(0.1, 0.9), "default", "text-unicorn@001", 40, "off"),
    (_checkpoints(0.1, 0.9), _results(0.1, 0.9), "default", "/models/my-llama", 40, "off"),
    # ... on for the *-bison@001 models
    (_checkpoints(0.1, 0.9), _results(0.1, 0.9), "default", "text-bison@001", 20, "on"),
    (_checkpoints(0.1, 0.9), _results(0.1, 0.9), "default", "code-bison@001", 20, "on"),
    (_checkpoints(None), None, "default", "chat-bison@001", 20, "no evaluation data"),
]


@pytest.mark.parametrize("checkpoints, results, mode, reference, step, words", CASES)
def test_choose_checkpoint(checkpoints, results, mode, reference, step, words):
    chosen, reason = choose_checkpoint(checkpoints, results, mode, reference)
    assert chosen["step"] == step
    assert words in reason


def test_modes_and_defaults():
    assert [normalize_mode(m) for m in ("true", " False", "DEFAULT", True, False)] == \
        ["true", "false", "default", "true", "false"]
    with pytest.raises(ValueError, match="enable_checkpoint_selection"):
        normalize_mode("yes")
    with pytest.raises(ValueError, match="no checkpoints"):
        choose_checkpoint([], None, "true", "text-bison@002")
    assert default_selection_enabled("text-bison@001")
    assert default_selection_enabled("codechat-bison@001")
    assert not default_selection_enabled("text-bison@002")
    assert not default_selection_enabled("text-bison-32k@002")


def _tuned_model(root, losses):
    """A tune output whose checkpoint folders carry marker files (selection copies folders)."""
    checkpoints = _checkpoints(*losses)
    for entry in checkpoints:
        folder = root / entry["dir"]
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter_model.safetensors").write_text(f"weights {entry['step']}")
        (folder / "tokenizer.json").write_text("{}")
        (folder / "training_state.pt").write_text("optimizer state")
        (folder / "tunepipe_model.json").write_text(json.dumps({"step": entry["step"],
                                                                "base_model": {"reference": "x"}}))
    (root / "checkpoints.json").write_text(json.dumps({"checkpoints": checkpoints,
                                                       "final_step": checkpoints[-1]["step"]}))
    return checkpoints


def test_component_copies_the_chosen_checkpoint(tmp_path):
    from kfp import dsl

    from components.select_checkpoint.component import select_checkpoint

    _tuned_model(tmp_path / "tuned", [0.9, 0.4, 0.6])
    results_dir = tmp_path / "evaluation_results"
    results_dir.mkdir()
    (results_dir / "results.json").write_text(json.dumps(_results(0.9, 0.5, 0.45)))
    selected = dsl.Model(name="selected_model", uri=str(tmp_path / "selected"))
    select_checkpoint.python_func(
        tuned_model=dsl.Model(name="tuned_model", uri=str(tmp_path / "tuned")),
        evaluation_results=dsl.Artifact(name="evaluation_results", uri=str(results_dir)),
        enable_checkpoint_selection="true", large_model_reference="text-bison@002",
        selected_model=selected)
    folder = tmp_path / "selected"
    assert (folder / "adapter" / "adapter_model.safetensors").read_text() == "weights 60"
    assert not (folder / "training_state.pt").exists()
    metadata = json.loads((folder / "tunepipe_model.json").read_text())
    assert metadata["step"] == 60
    selection = metadata["selection"]
    assert selection["selected_step"] == 60 and selection["final_step"] == 60
    assert selection["metric"] == "eval_total_loss"
    assert selection["metric_source"] == "evaluate (results.json)"
    assert [c["eval_total_loss"] for c in selection["candidates"]] == [0.9, 0.5, 0.45]
    assert selected.metadata["selected_step"] == 60
    assert selected.metadata["selection_mode"] == "true"
    assert "lowest eval_total_loss" in selected.metadata["selection_reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation_results", "selected", "tuned"]


def test_select_and_copy_default_and_missing_results(tmp_path):
    _tuned_model(tmp_path / "tuned", [0.2, 0.8])
    # default for text-bison@002: the final checkpoint; no results.json at all.
    selection = select_and_copy(tmp_path / "tuned", tmp_path / "absent", "default",
                                "text-bison@002", tmp_path / "out")
    assert selection["selected_step"] == 40
    # default for text-bison@001: the tuner's recorded losses; replacing an existing output.
    selection = select_and_copy(tmp_path / "tuned", None, "default", "text-bison@001", tmp_path / "out")
    assert selection["selected_step"] == 20
    assert selection["metric_source"] == "tuner (checkpoints.json)"
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_text() == "weights 20"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_lone_tuned_model_folder_is_its_only_checkpoint(tmp_path):
    folder = tmp_path / "model"
    (folder / "adapter").mkdir(parents=True)
    (folder / "tunepipe_model.json").write_text(json.dumps({"step": 7, "eval_metrics": None}))
    selection = select_and_copy(folder, None, "true", "text-bison@002", tmp_path / "out")
    assert selection["selected_step"] == 7
    assert "no evaluation data" in selection["reason"]
    assert json.loads((tmp_path / "out" / "tunepipe_model.json").read_text())["selection"]["selected_step"] == 7
