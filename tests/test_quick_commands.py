"""Quick commands stay quick: what they import, and validation's structure-first order.

``tunepipe validate`` checks structure (JSON, fields, types, counts) before it loads a tokenizer,
so a file that fails on structure is answered without torch, transformers or numpy;
``tunepipe --help``, ``tunepipe models list`` and ``tunepipe runs list`` never import them. The
import checks run the command in a fresh interpreter and look at ``sys.modules`` afterwards (no
timings are asserted).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from components.validate_dataset import validator  # noqa: E402
from components.validate_dataset.cli import main as validate_main  # noqa: E402

MODEL = "text-bison@002"
ROOT = Path(__file__).resolve().parent.parent
# What a quick command must not import: the model stack, numpy, KFP, the Cloud Storage client.
HEAVY = ("torch", "transformers", "tokenizers", "numpy", "kfp", "google.cloud", "google.api_core",
         "matplotlib")

# Runs `tunepipe ARGS...` in this interpreter, then prints the modules the command imported.
PROBE = """
import json, sys
before = set(sys.modules)
from command.main import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit_:
    status = exit_.code
sys.stdout.flush()
print("\\nPROBE " + json.dumps({"status": status, "modules": sorted(set(sys.modules) - before)}))
"""


def run_tunepipe(tmp_path: Path, *args: str) -> tuple[int, list[str], str]:
    """``tunepipe ARGS`` in a fresh interpreter: (exit status, heavy modules imported, stdout)."""
    env = dict(os.environ, TUNEPIPE_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    output, _, probe = done.stdout.rpartition("\nPROBE ")
    assert probe, f"the probe did not finish:\n{done.stdout}\n{done.stderr}"
    result = json.loads(probe)
    heavy = sorted({name for name in result["modules"] for prefix in HEAVY
                    if name == prefix or name.startswith(prefix + ".")})
    return result["status"], heavy, output


def text_line(i: int) -> str:
    return json.dumps({"input_text": f"Classify message {i}: where is my parcel?",
                       "output_text": "shipping"})


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def with_line(number: int, bad: str, total: int = 10) -> list[str]:
    lines = [text_line(i) for i in range(total)]
    lines[number - 1] = bad
    return lines


STRUCTURE_ERRORS = [
    # (id, lines, extra arguments, an error the report must show)
    ("invalid-json-line-7", with_line(7, '{"input_text": "broken", "output_text": '), [],
     "bad.jsonl:7: (line): invalid JSON: Expecting value"),
    ("missing-field", with_line(3, '{"input_text": "no output"}'), ["--format", "text"],
     "bad.jsonl:3: output_text: missing"),
    ("wrong-type", with_line(5, '{"input_text": 5, "output_text": "b"}'), ["--json"],
     "bad.jsonl:5: input_text: expected a string, got a number"),
    ("too-few-examples", [text_line(i) for i in range(9)], ["--report-dir", "REPORT_DIR"],
     "bad.jsonl: (dataset): 9 examples; at least 10 are required"),
    ("too-few-eval-examples", [text_line(i) for i in range(5)], ["--eval"],
     "bad.jsonl: (dataset): 5 examples; evaluation data needs 10 to 250 examples"),
    ("another-format", [json.dumps({"messages": [{"author": "user", "content": "hi"}]})] * 10,
     ["--format", "text"], "the file looks like the chat format, not the text format"),
]


@pytest.mark.parametrize("lines,extra,expected", [case[1:] for case in STRUCTURE_ERRORS],
                         ids=[case[0] for case in STRUCTURE_ERRORS])
def test_structure_errors_are_reported_without_loading_a_model(tmp_path, lines, extra,
                                                               expected):
    bad = write(tmp_path / "bad.jsonl", lines)
    extra = [str(tmp_path / "report") if arg == "REPORT_DIR" else arg for arg in extra]
    status, heavy, output = run_tunepipe(tmp_path, "validate", str(bad), *extra)
    assert status == 1, output
    assert expected in output
    assert heavy == [], f"validating a structurally invalid file imported {heavy}"


def test_a_valid_file_is_tokenized(tmp_path):
    """The control: the probe does see the tokenizer libraries when tokens are counted."""
    good = write(tmp_path / "good.jsonl", [text_line(i) for i in range(10)])
    status, heavy, output = run_tunepipe(tmp_path, "validate", str(good))
    assert status == 0, output
    assert "| input (prompt) |" in output  # token lengths in the report
    assert "transformers" in heavy


@pytest.mark.parametrize("args", [["--help"], ["models", "list"], ["validate", "--help"],
                                  ["runs", "list", "--pipeline-root", "RUNS"]],
                         ids=["help", "models-list", "validate-help", "runs-list"])
def test_quick_commands_import_no_model_stack(tmp_path, args):
    model_folder = tmp_path / "home" / "registry" / "my-model" / "1"
    model_folder.mkdir(parents=True)
    run = tmp_path / "runs" / "tune-large-model-2026-01-02-03-04-05-123456"
    (run / "tune").mkdir(parents=True)
    args = [str(tmp_path / "runs") if arg == "RUNS" else arg for arg in args]
    status, heavy, output = run_tunepipe(tmp_path, *args)
    assert status == 0, output
    if args == ["models", "list"]:
        assert f"my-model@1\t{model_folder}\t1 version" in output
    elif args[0] == "runs":
        assert output.startswith(f"{run.name}\ttune-large-model\tfailed (tune)\t")
    else:
        assert "usage:" in output
    assert heavy == [], f"tunepipe {' '.join(args)} imported {heavy}"


# --- the structure-first order, in process -------------------------------------------------

@pytest.fixture
def no_tokenizer(monkeypatch):
    """Loading a tokenizer fails the test."""
    from components.common import model_loading

    def refuse(reference):
        raise AssertionError(f"the tokenizer of {reference} was loaded")
    monkeypatch.setattr(model_loading, "load_model_tokenizer", refuse)


def test_invalid_datasets_never_load_the_tokenizer(tmp_path, no_tokenizer):
    train = write(tmp_path / "train.jsonl", with_line(2, "not json", total=20))
    evaluation = write(tmp_path / "eval.jsonl", [text_line(i) for i in range(10)])
    report = validator.run_validation(str(train), str(evaluation), "text", MODEL, "",
                                      tmp_path / "out")
    assert report.first_errors() == [f"{train}:2: (line): invalid JSON: Expecting value "
                                     "(column 1)"]
    assert "checkpoint" not in report.model
    assert all(not f.input_lengths for f in report.files)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    # A valid training set with an invalid evaluation set: no tokens either.
    train = write(tmp_path / "train.jsonl", [text_line(i) for i in range(20)])
    evaluation = write(tmp_path / "eval.jsonl", [text_line(i) for i in range(3)])
    report = validator.run_validation(str(train), str(evaluation), "text", MODEL)
    assert report.num_errors == 1 and not report.valid
    # And chat evaluation data (a dataset-wide error) with valid chat training data.
    chat = json.dumps({"messages": [{"author": "user", "content": "hi"},
                                    {"author": "assistant", "content": "hello"}]})
    train = write(tmp_path / "chat.jsonl", [chat] * 10)
    report = validator.run_validation(str(train), str(evaluation), "chat", "chat-bison@002")
    assert not report.valid


def test_a_valid_dataset_does_load_the_tokenizer(tmp_path, no_tokenizer):
    """The control for the test above: the monkeypatched loader is the one validation uses."""
    train = write(tmp_path / "train.jsonl", [text_line(i) for i in range(10)])
    with pytest.raises(AssertionError, match="tokenizer of text-bison@002 was loaded"):
        validator.run_validation(str(train), "", "text", MODEL)


def test_unknown_model_is_a_usage_error_before_the_data_is_read(tmp_path, capsys):
    bad = write(tmp_path / "bad.jsonl", with_line(7, "{oops"))
    assert validate_main([str(bad), "--model", "no-such-model@001"]) == 2
    assert "Unknown model reference 'no-such-model@001'" in capsys.readouterr().err
    # Structure only: the model is not needed, so it is not checked.
    assert validate_main([str(bad), "--model", "no-such-model@001", "--no-tokens"]) == 1


@pytest.fixture(scope="module")
def tokenizer():
    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer

    return load_tokenizer(resolve_model(MODEL).checkpoint)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_file_too_large_to_keep_is_read_again_with_the_same_result(tmp_path, tokenizer,
                                                                    monkeypatch):
    long_input = " ".join(["word"] * 9000)  # one truncated example
    lines = [text_line(i) for i in range(25)] + [
        json.dumps({"input_text": long_input, "output_text": "shipping"})]
    train = write(tmp_path / "train.jsonl", lines)
    evaluation = write(tmp_path / "eval.jsonl", [text_line(i) for i in range(100, 112)])
    kept = validator.run_validation(str(train), str(evaluation), "text", MODEL, "",
                                    tmp_path / "kept", tokenizer=tokenizer, batch_size=8)
    reads = []
    original = validator._read_file

    def counting(check, uri, *args):
        reads.append(uri)
        return original(check, uri, *args)

    monkeypatch.setattr(validator, "_read_file", counting)
    kept_again = validator.run_validation(str(train), str(evaluation), "text", MODEL, "",
                                          tmp_path / "kept-again", tokenizer=tokenizer,
                                          batch_size=8)
    assert reads == [str(train), str(evaluation)]  # one pass per file
    reads.clear()
    monkeypatch.setattr(validator, "KEPT_EXAMPLES_BYTES", 100)
    read_again = validator.run_validation(str(train), str(evaluation), "text", MODEL, "",
                                          tmp_path / "read-again", tokenizer=tokenizer,
                                          batch_size=8)
    assert reads == [str(train), str(evaluation)] * 2  # structure, then tokens
    assert kept.valid and read_again.valid
    assert kept.to_dict()["files"]["train"]["truncated"]["examples"] == 1
    assert kept.to_dict() == kept_again.to_dict() == read_again.to_dict()
    assert _tree(tmp_path / "kept") == _tree(tmp_path / "read-again")
    assert set(_tree(tmp_path / "kept")) >= {"tokens/train/tokens.bin", "tokens/eval/tokens.bin"}


def test_a_file_changed_between_the_passes_is_refused(tmp_path, tokenizer, monkeypatch):
    train = write(tmp_path / "train.jsonl", [text_line(i) for i in range(10)])
    original = validator._read_file

    def append_after_first_pass(check, uri, *args):
        original(check, uri, *args)
        with open(train, "a", encoding="utf-8") as handle:
            handle.write(text_line(99) + "\n")

    monkeypatch.setattr(validator, "KEPT_EXAMPLES_BYTES", 0)
    monkeypatch.setattr(validator, "_read_file", append_after_first_pass)
    report = validator.run_validation(str(train), "", "text", MODEL, "", tmp_path / "out",
                                      tokenizer=tokenizer)
    assert report.first_errors() == [f"{train}: (file): changed while it was being validated; "
                                     "validate it again"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
