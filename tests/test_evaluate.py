"""components.evaluate: metric values on hand-made cases, the report, the component end to end on
a tiny model with real LoRA checkpoints, and the ``tunepipe evaluate`` CLI."""
from __future__ import annotations

import copy
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from components.evaluate import metrics as m
from components.common.artifacts.evaluation_results import write_directory
from components.evaluate.evaluation import (GenerationSettings, default_max_output_tokens,
                                            generation_plan, read_eval_examples, scalar_metrics)
from components.common.markdown import table_cell as cell
from components.evaluate.report import loss_curve_png, render_report, worst_examples
from tests.test_generation import tiny_llama_dir  # noqa: F401  (session fixture: varied answers)
from tests.tolerances import loss_sum_bound

# ------------------------------------------------------------------------------ metric values


def test_exact_match_strips_surrounding_whitespace_only():
    assert m.exact_match("  positive\n", "positive") == 1.0
    assert m.exact_match("Positive", "positive") == 0.0
    assert m.exact_match("a  b", "a b") == 0.0


def test_corpus_bleu_known_values():
    assert m.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    # 1- to 4-gram precisions 3/4, 2/3, 1/2 and 0/1, the last smoothed ('exp') to 1/2 / 1; no
    # brevity penalty (equal lengths): 100 * (3/4 * 2/3 * 1/2 * 1/2) ** (1/4).
    assert m.corpus_bleu(["a b c d"], ["a b c e"]) == pytest.approx(100 * (0.75 * 2 / 3 * 0.5 * 0.5) ** 0.25)
    # All n-grams right but half the length: brevity penalty exp(1 - 8/4).
    assert m.corpus_bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(100 * math.exp(-1))
    # Corpus BLEU pools n-gram counts: two halves of the earlier cases.
    assert m.corpus_bleu(["a b c d", "a b c d"], ["a b c d", "a b c d"]) == pytest.approx(100)
    assert m.corpus_bleu([], []) == 0.0


def test_rouge_l_known_values():
    assert m.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert m.rouge_l("a x b y c", "a b c") == pytest.approx(0.75)  # LCS 3 (not contiguous): P 3/5, R 1
    assert m.rouge_l("The Cat!", "the cat") == pytest.approx(1.0)  # lower-cased, punctuation dropped
    assert m.rouge_l("", "") == 1.0
    assert m.rouge_l("", "something") == 0.0


def test_classification_known_values():
    references = ["pos", "pos", "neg", "neg", "neu", "pos"]
    predictions = ["pos", "neg", "neg", "garbage", " neu ", "pos"]
    labels = m.label_set(references)
    assert labels == ["neg", "neu", "pos"]
    result = m.classification_metrics(predictions, references, labels)
    assert result.categories == ["neg", "neu", "pos", "(other)"]
    assert result.matrix == [[1, 0, 0, 1],   # neg: one right, one outside the label set
                             [0, 1, 0, 0],   # neu
                             [1, 0, 2, 0],   # pos: one taken for neg
                             [0, 0, 0, 0]]   # nothing is expected to be (other)
    assert result.accuracy == pytest.approx(4 / 6)
    # F1: neg P 1/2 R 1/2 -> 1/2; neu 1; pos P 1 R 2/3 -> 4/5.
    assert result.per_label["neg"]["f1"] == pytest.approx(0.5)
    assert result.per_label["pos"]["f1"] == pytest.approx(0.8)
    assert result.macro_f1 == pytest.approx((0.5 + 1 + 0.8) / 3)
    aggregate, per_example, classification = m.generation_metrics(predictions, references, labels)
    assert aggregate["accuracy"] == aggregate["exact_match"] == pytest.approx(4 / 6)
    assert aggregate["macro_f1"] == pytest.approx(result.macro_f1)
    assert [s["exact_match"] for s in per_example] == [1, 0, 1, 0, 1, 1]
    assert classification.matrix == result.matrix


def test_a_label_never_predicted_has_f1_zero():
    result = m.classification_metrics(["a", "a", "a", "a"], ["a", "a", "b", "b"], ["a", "b"])
    assert result.per_label["b"]["f1"] == 0.0
    assert result.per_label["a"]["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert result.macro_f1 == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.parametrize("references, expected", [
    (["yes", "no", "yes", "no"], ["no", "yes"]),
    (["Paris", "Rome", "Oslo", "Lima"], None),  # every answer different: short-answer QA
    (["yes"] * 4, None),  # one label: nothing to classify
    ([f"label {i}" for i in range(21)] * 3, None),  # more than 20 labels
    (["a long answer with many words in it", "no"] * 3, None),  # not short
    (["", "x", "", "x"], None),  # an empty label
])
def test_label_set_detection(references, expected):
    assert m.label_set(references) == expected


def test_default_max_output_tokens():
    assert default_max_output_tokens([3, 10, 1]) == 26
    assert default_max_output_tokens([5000]) == 1024
    assert default_max_output_tokens([]) == 16


def test_generation_settings_are_validated_early():
    with pytest.raises(ValueError, match="maxOutputTokens"):
        GenerationSettings(max_output_tokens=-1)
    with pytest.raises(ValueError, match="topP"):
        GenerationSettings(top_p=0)
    assert GenerationSettings().sampling_params([4]).max_output_tokens == 20
    assert GenerationSettings(max_output_tokens=7).sampling_params([400]).max_output_tokens == 7


def test_generation_plan():
    checkpoints = [{"step": s, "dir": f"c{s}", "eval": {"eval_total_loss": loss}}
                   for s, loss in ((20, 1.0), (40, 0.5), (60, 0.7))]
    everything = {"base", "step 20", "step 40", "step 60"}
    assert generation_plan(checkpoints, 250, "cpu", budget=1000)[0] == everything
    assert generation_plan(checkpoints, 250, "cuda", budget=10)[0] == everything
    chosen, reason = generation_plan(checkpoints, 250, "cpu", budget=999)
    assert chosen == {"base", "step 40", "step 60"}  # base, lowest recorded loss, final
    assert "exceed" in reason


# ------------------------------------------------------------------------------ report pieces


def test_cell_escapes_markdown():
    assert cell("a|b\nc") == "a\\|b⏎ c"
    assert cell("   ") == "(empty)"
    assert cell("x" * 400).endswith("…")
    assert cell("<script>") == "&lt;script&gt;"


def test_loss_curve_png():
    records = [{"step": 1, "train_total_loss": 2.0}, {"step": 2, "train_total_loss": 1.5,
                                                       "eval_total_loss": 1.7}]
    assert loss_curve_png(records).startswith(b"\x89PNG")
    assert loss_curve_png([]) is None


def test_worst_examples_order():
    rows = [{"index": i, "tuned_scores": {"exact_match": em, "rouge_l": r, "bleu": b}}
            for i, (em, r, b) in enumerate([(1, 1, 100), (0, 0.5, 10), (0, 0.1, 5), (0, 0.1, 1)])]
    assert [r["index"] for r in worst_examples(rows, 2)] == [3, 2]


def test_not_evaluated_report():
    text = render_report({"evaluated": False, "reason": "no evaluation data"}, [])
    assert "Not evaluated: no evaluation data" in text
    assert scalar_metrics({"evaluated": False}) == {"evaluated": 0.0}


def test_write_directory_replaces_atomically(tmp_path):
    target = tmp_path / "out"
    write_directory(target, {"a.json": "1", "sub/b.txt": b"2"})
    write_directory(target, {"c.json": "3"})
    assert sorted(p.name for p in target.rglob("*")) == ["c.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


# ------------------------------------------------------------------------------ end to end

LABELED = [
    ("I loved this film, the acting was wonderful.", "positive"),
    ("Terrible plot and wooden dialogue.", "negative"),
    ("A joy from start to finish!", "positive"),
    ("I want my two hours back.", "negative"),
    ("Beautifully shot and deeply moving; I cried twice and would watch it again tomorrow.", "positive"),
    ("Boring.", "negative"),
    ("The soundtrack alone is worth the ticket.", "positive"),
    ("Predictable, loud and far too long.", "negative"),
    ("My kids adored it.", "positive"),
    ("The worst sequel in years.", "negative"),
    ("Clever, funny and warm.", "positive"),
    ("I fell asleep halfway through.", "negative"),
]


@pytest.fixture(scope="module")
def tuning_run(tiny_llama_dir, tmp_path_factory):  # noqa: F811
    """A tune output in the real format: two LoRA checkpoints of the tiny model, checkpoints.json,
    metrics.jsonl; a validated dataset with eval.jsonl; a tokenized dataset with eval/."""
    from peft import LoraConfig, get_peft_model

    from components.common.model_loading import load_base_model, load_tokenizer
    from components.common.artifacts.token_dataset import TokenDatasetWriter
    from components.evaluate.evaluation import EvalExample, tokenize_examples

    root = tmp_path_factory.mktemp("run")
    tuned = root / "tuned_model"
    tokenizer = load_tokenizer(tiny_llama_dir)
    base = load_base_model(tiny_llama_dir)
    base_model = {"reference": str(tiny_llama_dir), "checkpoint": str(tiny_llama_dir),
                  "context_class": "8k"}
    checkpoints = []
    for seed, (step, loss) in enumerate(((2, 10.5), (4, 10.7))):
        torch.manual_seed(100 + seed)  # random (not zero) B matrices: checkpoints differ from base
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        relative = f"checkpoints/step-{step:06d}"
        folder = tuned / relative
        peft_model.save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder)
        (folder / "tunepipe_model.json").write_text(json.dumps({"base_model": base_model, "step": step}))
        checkpoints.append({"step": step, "dir": relative, "eval": {
            "eval_total_loss": loss, "eval_fraction_of_correct_next_step_preds": 0.1,
            "eval_num_predictions": 36.0}})
    (tuned / "checkpoints.json").write_text(json.dumps({
        "checkpoints": checkpoints, "final_step": 4, "stopped_early": False, "base_model": base_model}))
    (tuned / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "train_total_loss": 11.0, "learning_rate": 1e-3},
        {"step": 2, "train_total_loss": 10.8, "eval_total_loss": 10.5},
        {"step": 3, "train_total_loss": 10.6},
        {"step": 4, "train_total_loss": 10.4, "eval_total_loss": 10.7}]))
    validated = root / "validated_dataset"
    validated.mkdir()
    lines = [json.dumps({"input_text": i, "output_text": o}) for i, o in LABELED]
    (validated / "eval.jsonl").write_text("\n".join(lines) + "\n")
    (validated / "train.jsonl").write_text("\n".join(lines) + "\n")
    tokenized = root / "tokenized_dataset"
    examples = [EvalExample(i, o, n) for n, (i, o) in enumerate(LABELED, 1)]
    with TokenDatasetWriter(tokenized / "eval") as writer:
        for ids, mask in tokenize_examples(tokenizer, examples):
            writer.add(ids.tolist(), mask.tolist())
    return {"root": root, "tuned": tuned, "validated": validated, "tokenized": tokenized,
            "base": tiny_llama_dir, "checkpoints": checkpoints}


def _artifacts(root, names):
    from kfp import dsl

    kinds = {"tuned_model": dsl.Model, "validated_dataset": dsl.Dataset,
             "tokenized_dataset": dsl.Dataset, "evaluation_metrics": dsl.Metrics,
             "classification_metrics": dsl.ClassificationMetrics, "evaluation_results": dsl.Artifact,
             "report": dsl.Markdown}
    return {name: kinds[name](name=name, uri=str(path)) for name, path in names.items()}


@pytest.fixture(scope="module")
def component_run(tuning_run):
    """The KFP component's function, run once on the tuning run (every check reads its outputs)."""
    from components.evaluate.component import evaluate

    out = tuning_run["root"] / "outputs"
    artifacts = _artifacts(out, {
        "tuned_model": tuning_run["tuned"], "validated_dataset": tuning_run["validated"],
        "tokenized_dataset": tuning_run["tokenized"],
        "evaluation_metrics": out / "evaluation_metrics",
        "classification_metrics": out / "classification_metrics",
        "evaluation_results": out / "evaluation_results", "report": out / "report.md"})
    evaluate.python_func(**artifacts, large_model_reference="text-bison@002",
                         max_context_length="")
    results = json.loads((out / "evaluation_results" / "results.json").read_text())
    predictions = [json.loads(line) for line in
                   (out / "evaluation_results" / "predictions.jsonl").read_text().splitlines()]
    return {"artifacts": artifacts, "results": results, "predictions": predictions,
            "report": (out / "report.md").read_text(), "out": out}


def test_component_evaluates_base_and_every_checkpoint(component_run, tuning_run):
    results = component_run["results"]
    assert results["evaluated"] is True
    assert results["num_examples"] == len(LABELED)
    assert results["task"] == "classification" and results["labels"] == ["negative", "positive"]
    assert results["base_model"]["checkpoint"] == str(tuning_run["base"])
    assert [c["step"] for c in results["checkpoints"]] == [2, 4]
    assert results["tuned"]["step"] == 4
    assert results["generation_models"] == "base model and every kept checkpoint"
    # "negative" and "positive" are one token each in this tokenizer: 1 + 16.
    assert results["generation"]["maxOutputTokens_resolved"] == 17
    for model in [results["base"], *results["checkpoints"]]:
        assert model["generated"] is True
        metrics = model["metrics"]
        for name in ("eval_total_loss", "eval_fraction_of_correct_next_step_preds",
                     "eval_num_predictions", "exact_match", "bleu", "rouge_l", "accuracy", "macro_f1"):
            assert math.isfinite(metrics[name]), name
        assert sum(map(sum, model["classification"]["confusion_matrix"])) == len(LABELED)
    # The checkpoints' LoRA weights are random, so each model scores differently.
    losses = [c["metrics"]["eval_total_loss"] for c in results["checkpoints"]]
    assert len({results["base"]["metrics"]["eval_total_loss"], *losses}) == 3
    best = min(zip(losses, [2, 4]))
    assert results["best_by_eval_loss"] == {"step": best[1], "eval_total_loss": best[0]}


def test_token_metrics_are_token_metrics_definitions(component_run, tuning_run):
    from components.common.model_loading import load_base_model
    from components.common.artifacts.token_dataset import TokenDataset
    from tests.reference_scoring import score_dataset

    base = load_base_model(tuning_run["base"])
    examples = list(TokenDataset(tuning_run["tokenized"] / "eval"))
    expected = score_dataset(base, examples, 2).metrics("eval")
    got = component_run["results"]["base"]["metrics"]
    # Packed rows against padded batches: the same sums in other orders. The mean loss within
    # the forward's float32 bound over the longest example (tests/tolerances.py); the fraction
    # of correct targets by one argmax flipped between two logits within rounding.
    targets = expected["eval_num_predictions"]
    bounds = {"eval_total_loss": loss_sum_bound(base, max(len(ids) for ids, _ in examples),
                                                targets, expected["eval_total_loss"] * targets)
              / targets,
              "eval_fraction_of_correct_next_step_preds": 1 / targets, "eval_num_predictions": 0}
    assert bounds.keys() == expected.keys()
    for name, value in expected.items():
        assert abs(got[name] - value) <= bounds[name], name


def test_predictions_are_the_models_greedy_answers(component_run, tuning_run):
    from components.common.generation import generate
    from components.common.model_loading import load_tuned_model
    from components.common.prompts import format_prompt

    predictions = component_run["predictions"]
    assert [p["expected"] for p in predictions] == [o for _, o in LABELED]
    model, tokenizer, _ = load_tuned_model(tuning_run["tuned"] / "checkpoints/step-000004")
    answers = generate(model, tokenizer, [format_prompt(tokenizer, i) for i, _ in LABELED], 17)
    assert [p["tuned_output"] for p in predictions] == answers
    for row in predictions:
        assert row["tuned_output"] == row["checkpoint_outputs"]["4"]
        assert row["tuned_model"] == "step 4 (final checkpoint)"
        assert set(row["base_scores"]) == {"exact_match", "bleu", "rouge_l"}
        assert "base_output" in row and "2" in row["checkpoint_outputs"]


def test_metrics_classification_and_report_artifacts(component_run):
    artifacts, results = component_run["artifacts"], component_run["results"]
    scalars = artifacts["evaluation_metrics"].metadata
    assert scalars["evaluated"] == 1.0 and scalars["tuned_step"] == 4.0
    for name in ("eval_total_loss", "exact_match", "bleu", "rouge_l", "accuracy", "macro_f1"):
        assert scalars[f"base_{name}"] == pytest.approx(results["base"]["metrics"][name])
        assert scalars[f"tuned_{name}"] == pytest.approx(results["checkpoints"][-1]["metrics"][name])
    matrix = artifacts["classification_metrics"].metadata["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == ["negative", "positive", "(other)"]
    assert [row["row"] for row in matrix["rows"]] == \
        results["checkpoints"][-1]["classification"]["confusion_matrix"]
    report = component_run["report"]
    assert "## Base vs tuned" in report and "| tuned (step 4) |" in report
    assert "data:image/png;base64," in report
    assert "## Confusion matrix" in report
    assert "most wrong" in report
    leftovers = [p.name for p in component_run["out"].iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_component_without_evaluation_data(tuning_run, tmp_path):
    from components.evaluate.component import evaluate

    validated = tmp_path / "validated"
    validated.mkdir()
    (validated / "train.jsonl").write_text('{"input_text": "a", "output_text": "b"}\n')
    tokenized = tmp_path / "tokenized"
    (tokenized / "train").mkdir(parents=True)
    artifacts = _artifacts(tmp_path, {
        "tuned_model": tuning_run["tuned"], "validated_dataset": validated,
        "tokenized_dataset": tokenized, "evaluation_metrics": tmp_path / "m",
        "classification_metrics": tmp_path / "c", "evaluation_results": tmp_path / "results",
        "report": tmp_path / "report.md"})
    evaluate.python_func(**artifacts, large_model_reference="text-bison@002",
                         max_context_length="")
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["evaluated"] is False and results["reason"] == "no evaluation data"
    assert "Not evaluated: no evaluation data" in (tmp_path / "report.md").read_text()
    assert artifacts["evaluation_metrics"].metadata == {"evaluated": 0.0}


def test_components_compile(tmp_path):
    from kfp import compiler

    from components.evaluate.component import evaluate
    from components.select_checkpoint.component import select_checkpoint

    for component in (evaluate, select_checkpoint):
        path = tmp_path / f"{component.name}.yaml"
        compiler.Compiler().compile(component, str(path))
        assert path.stat().st_size > 0
    inputs = evaluate.component_spec.inputs
    assert {"temperature", "maxOutputTokens", "topP", "topK", "large_model_reference"} <= set(inputs)
    assert inputs["maxOutputTokens"].default == 0 and inputs["temperature"].default == 0.0


# ------------------------------------------------------------------------------ CLI


def test_cli_registered_model_with_compare(tuning_run, component_run, tmp_path, monkeypatch, capsys):
    from components.common.model_registry import register_model
    from components.evaluate.cli import main

    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path / "home"))
    register_model(tuning_run["tuned"] / "checkpoints/step-000002", "sentiment", {})
    code = main(["--model", "sentiment@1", "--data", str(tuning_run["validated"] / "eval.jsonl"),
                 "--compare", str(tuning_run["base"]), "--output", str(tmp_path / "out")])
    assert code == 0
    table = capsys.readouterr().out
    assert "sentiment@1" in table and "eval_total_loss" in table and "macro_f1" in table
    cli_results = json.loads((tmp_path / "out" / "results.json").read_text())
    base, tuned = cli_results["models"]
    assert (base["kind"], tuned["kind"]) == ("base", "tuned")
    # The CLI tokenizes the JSONL itself: the same tokens, hence the same numbers, as transform's.
    component = component_run["results"]
    # the same code on the same tokens in the same order: the same bits
    for name in ("eval_total_loss", "eval_num_predictions", "exact_match", "rouge_l"):
        assert tuned["metrics"][name] == component["checkpoints"][0]["metrics"][name], name
        assert base["metrics"][name] == component["base"]["metrics"][name], name


def test_cli_errors_exit_2(tuning_run, tmp_path, monkeypatch, capsys):
    from components.evaluate.cli import main

    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path / "home"))
    data = str(tuning_run["validated"] / "eval.jsonl")
    assert main(["--model", str(tmp_path / "nowhere"), "--data", data]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", "no-such-model@3", "--data", data]) == 2
    assert "no-such-model" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_text": "a", "output_text": "b"}\n{"input_text": "a"}\n')
    assert main(["--model", str(tuning_run["tuned"]), "--data", str(bad)]) == 2
    assert f"{bad}:2: output_text" in capsys.readouterr().err
    assert main(["--model", str(tuning_run["tuned"]), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["--data", data]) == 2  # argparse: --model is required
    assert main(["--model", str(tuning_run["tuned"]), "--data", data, "--top-p", "2"]) == 2


def test_read_eval_examples_reports_file_and_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"input_text": "a", "output_text": "b"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"eval.jsonl:3: \(line\)"):
        read_eval_examples(path)


def test_limited_generation_still_scores_every_checkpoint(tuning_run, monkeypatch):
    from components.evaluate import evaluation

    # Over the budget, only base, best recorded loss and final generate; with no recorded loss
    # that is base and the final step 4, so step 2 gets token metrics only.
    monkeypatch.setattr(evaluation, "best_by_recorded_loss", lambda checkpoints: None)
    results, predictions = evaluation.evaluate_tuning_run(
        tuning_run["tuned"], tuning_run["validated"], tuning_run["tokenized"], "text-bison@002",
        GenerationSettings(max_output_tokens=3), generation_budget=1, progress=lambda _: None)
    assert "exceed" in results["generation_models"]
    step2, step4 = results["checkpoints"]
    assert (results["base"]["generated"], step2["generated"], step4["generated"]) == (True, False, True)
    assert math.isfinite(step2["metrics"]["eval_total_loss"]) and "exact_match" not in step2["metrics"]
    assert all(set(row["checkpoint_outputs"]) == {"4"} for row in predictions)
    text = render_report(results, predictions)
    assert "| step 2 |" in text and "maxOutputTokens=3" in text and "–" in text


def test_a_distillation_run_is_asked_for_labels_only(tuning_run, tmp_path, monkeypatch):
    import shutil

    from components.common.model_loading import load_tokenizer
    from components.common.prompts import format_prompt
    from components.common.artifacts.token_dataset import TokenDatasetWriter
    from components.evaluate import evaluation

    # The eval set as transform tokenizes a distillation run's: the label task's prefix on every
    # input, recorded in the meta.
    tokenizer = load_tokenizer(tuning_run["base"])
    examples = [evaluation.EvalExample(i, o, n) for n, (i, o) in enumerate(LABELED, 1)]
    tokenized = tmp_path / "tokenized"
    with TokenDatasetWriter(tokenized / "eval", {"input_prefix": "[label] "}) as writer:
        for ids, mask in evaluation.tokenize_examples(tokenizer, examples, prefix="[label] "):
            writer.add(ids.tolist(), mask.tolist())
    prompts, generate = [], evaluation.generate_detailed

    def spy(model, tokenizer, texts, *args, **kwargs):
        prompts.extend(texts)
        return generate(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(evaluation, "generate_detailed", spy)
    settings = GenerationSettings(max_output_tokens=1)
    results, _ = evaluation.evaluate_tuning_run(
        tuning_run["tuned"], tuning_run["validated"], tokenized, "text-bison@002", settings,
        progress=lambda _: None)
    labelled = [format_prompt(tokenizer, "[label] " + i) for i, _ in LABELED]
    assert results["input_prefix"] == "[label] "
    assert prompts == labelled * 3  # the base model and both checkpoints alike

    # Without a tokenized eval set the final checkpoint's metadata gives the prefix, and the
    # examples are tokenized here with it: the same token metrics.
    tuned = tmp_path / "tuned"
    shutil.copytree(tuning_run["tuned"], tuned)
    metadata_path = tuned / "checkpoints/step-000004/tunepipe_model.json"
    metadata_path.write_text(json.dumps({**json.loads(metadata_path.read_text()),
                                         "input_prefix": "[label] "}))
    prompts.clear()
    again, _ = evaluation.evaluate_tuning_run(tuned, tuning_run["validated"], None,
                                              "text-bison@002", settings, progress=lambda _: None)
    assert prompts == labelled * 3
    for name in ("eval_total_loss", "eval_num_predictions"):  # the same tokens: the same bits
        assert again["base"]["metrics"][name] == results["base"]["metrics"][name], name
