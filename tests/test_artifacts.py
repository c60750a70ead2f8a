"""The artifact contracts of components/common/artifacts/: each names its files, writes and reads
them, and no other module spells those names."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from components.common.artifacts import (evaluation_results, token_dataset, tokenized_dataset,
                                         tuned_model, validated_dataset)
from components.common.artifacts.validated_dataset import ValidatedDatasetError
from components.common.dataset_formats import parse_example
from components.validate_dataset.validator import run_validation

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT / "components" / "common" / "artifacts"

# A valid example of each format, as a user writes it (extra fields included).
VALID = {
    "text": [{"input_text": "2 + 2?", "output_text": "4", "context": "ignored"}],
    "distillation": [{"input_text": "a", "output_text": "b", "rationale": "because"},
                     {"input_text": "unlabeled"}, {"input_text": "c", "output_text": None}],
    "chat": [{"messages": [{"author": "user", "content": "hi"},
                           {"author": "assistant", "content": "hello"}]},
             {"context": "Be brief.",
              "messages": [{"author": "user", "content": "q1"},
                           {"author": "assistant", "content": "a1"},
                           {"author": "user", "content": "q2"},
                           {"author": "assistant", "content": "a2"}]}],
    "gemini": [{"contents": [{"role": "user", "parts": [{"text": "x"}, {"text": "y"}]},
                             {"role": "model", "parts": [{"text": "z"}]}]},
               {"systemInstruction": {"parts": [{"text": "sys"}, {"text": "tem"}]},
                "contents": [{"role": "user", "parts": [{"text": "u"}]},
                             {"role": "model", "parts": [{"text": "m"}]}]}],
}


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", sorted(VALID))
def test_validated_examples_read_as_the_validator_parses_them(tmp_path, fmt):
    path = _write_jsonl(tmp_path / validated_dataset.TRAIN_FILE, VALID[fmt])
    read = list(validated_dataset.read_examples(path, fmt))
    assert [line for line, _, _ in read] == list(range(1, len(VALID[fmt]) + 1))
    assert [record for _, record, _ in read] == VALID[fmt]
    for (_, _, example), record in zip(read, VALID[fmt]):
        assert example == parse_example(record, fmt)[0]


def test_a_validated_folder_is_read_through_the_contract(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", VALID["text"] * 10)
    evaluation = _write_jsonl(tmp_path / "eval.jsonl", VALID["text"] * 10)
    folder = tmp_path / "validated"
    run_validation(str(train), str(evaluation), "text", output_dir=folder,
                   count_tokens=False).raise_if_invalid()
    for role in (validated_dataset.TRAIN, validated_dataset.EVAL):
        path = validated_dataset.examples_file(folder, role)
        assert path == folder / validated_dataset.ROLE_FILES[role]
        assert [r for _, r, _ in validated_dataset.read_examples(path, "text")] == \
            VALID["text"] * 10
    assert validated_dataset.token_cache(folder, "eval") == folder / "tokens" / "eval"
    (folder / validated_dataset.EVAL_FILE).unlink()
    assert validated_dataset.examples_file(folder, validated_dataset.EVAL) is None


@pytest.mark.parametrize("content, fmt, message", [
    ('{"input_text": "a", "output_text": "b"}\nnot json\n', "text", r"x.jsonl:2: not a validated"),
    ('[1, 2]\n', "text", r"x.jsonl:1: not a JSON object"),
    ('{"messages": [{"author": "user", "content": "a"}]}\n', "chat",
     r"x.jsonl:1: not a validated chat example"),
    ('{"messages": [1]}\n', "chat", r"x.jsonl:1: not a validated chat example"),
    ('{"input_text": "a", "output_text": "b"}\n', "gemini",
     r"x.jsonl:1: not a validated gemini example"),
])
def test_a_file_of_another_shape_fails_naming_file_and_line(tmp_path, content, fmt, message):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(ValidatedDatasetError, match=message):
        list(validated_dataset.read_examples(path, fmt))


def test_written_records_read_back(tmp_path):
    records = [{"input_text": "é", "output_text": "b", "rationale": None}, {"input_text": "c"}]
    path = tmp_path / validated_dataset.TRAIN_FILE
    validated_dataset.write_records(path, records)
    assert path.read_text(encoding="utf-8").count("\n") == 2 and "é" in path.read_text()
    assert [r for _, r in validated_dataset.read_records(path)] == records


def test_tokenized_dataset_splits(tmp_path):
    with token_dataset.TokenDatasetWriter(tokenized_dataset.train_dir(tmp_path), {"k": 1}) as w:
        w.add([1, 2, 3], [0, 1, 1])
    assert tokenized_dataset.train_dir(tmp_path) == tmp_path / "train"
    assert tokenized_dataset.eval_dir(tmp_path) is None
    assert token_dataset.read_meta(tmp_path / "train")["k"] == 1
    assert token_dataset.read_meta(tmp_path) is None
    assert len(token_dataset.TokenDataset(tokenized_dataset.train_dir(tmp_path))) == 1
    tokenized_dataset.split_dir(tmp_path, "eval").mkdir()
    assert tokenized_dataset.eval_dir(tmp_path) == tmp_path / "eval"


def test_tuned_model_index_and_training_log(tmp_path):
    assert tuned_model.read_index(tmp_path) is None
    step = tuned_model.checkpoint_dir_name(20)
    index = {"checkpoints": [{"step": 20, "dir": step, "eval": None}], "final_step": 20}
    tuned_model.write_index(tmp_path, index)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tuned_model.CHECKPOINTS_INDEX]
    assert tuned_model.read_index(tmp_path) == tuned_model.read_checkpoints(tmp_path) == index
    assert tuned_model.final_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000020"
    (tmp_path / tuned_model.METRICS_FILE).write_text('{"step": 1, "loss": 2}\nbad\n[]\n')
    assert tuned_model.read_training_metrics(tmp_path) == [{"step": 1, "loss": 2}]
    tuned_model.write_index(tmp_path, {"checkpoints": []})
    with pytest.raises(ValueError, match="lists no checkpoints"):
        tuned_model.read_checkpoints(tmp_path)


def test_a_lone_tuned_model_folder_is_one_checkpoint(tmp_path):
    from components.common.model_loading import TUNED_MODEL_METADATA

    (tmp_path / TUNED_MODEL_METADATA).write_text(json.dumps(
        {"step": 7, "eval_metrics": {"eval_total_loss": 1.5}, "base_model": {"reference": "m"}}))
    index = tuned_model.read_checkpoints(tmp_path)
    assert index["checkpoints"] == [{"step": 7, "dir": ".", "eval": {"eval_total_loss": 1.5}}]
    assert index["final_step"] == 7 and index["base_model"] == {"reference": "m"}
    assert tuned_model.final_checkpoint(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="not a tuned model folder"):
        tuned_model.read_checkpoints(tmp_path / "missing")


def test_evaluation_results_round_trip(tmp_path):
    target = tmp_path / "results"
    assert evaluation_results.read_results(target) is None
    evaluation_results.write_results(target, {"evaluated": False, "reason": "none"}, [])
    assert [p.name for p in target.iterdir()] == [evaluation_results.RESULTS_FILE]
    results = {"evaluated": True, "steps": np.int64(3), "loss": np.float32(0.5)}
    evaluation_results.write_results(target, results, [{"index": 0}])
    assert evaluation_results.read_results(target) == {"evaluated": True, "steps": 3, "loss": 0.5}
    rows = (target / evaluation_results.PREDICTIONS_FILE).read_text().splitlines()
    assert [json.loads(row) for row in rows] == [{"index": 0}]


def _contract_file_names() -> set[str]:
    """The file names the contracts declare (folder names like ``train`` are also JSON keys)."""
    names = set()
    for module in (evaluation_results, token_dataset, tuned_model, validated_dataset):
        names |= {value for name, value in vars(module).items()
                  if name.isupper() and isinstance(value, str) and "." in value}
    return names


def test_no_module_outside_the_contracts_spells_an_artifact_file_name():
    names = _contract_file_names()
    assert {"checkpoints.json", "results.json", "train.jsonl", "meta.json"} <= names
    found = []
    for layer in ("components", "pipelines", "service", "command"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            if path.is_relative_to(CONTRACTS):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                               ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and id(node) not in docstrings):
                    found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}"
                              for name in names if name in node.value]
    assert not found, "use the constants of components/common/artifacts/:\n" + "\n".join(found)
