"""Dataset validation: the rules, the report, the CLI and the component wrapper."""
from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from components.common.dataset_formats import token_limits  # noqa: E402
from components.common.encoding import ExampleEncoder  # noqa: E402
from components.validate_dataset.cli import main  # noqa: E402
from components.validate_dataset.validator import (DatasetValidationError,  # noqa: E402
                                                   check_file, run_validation,
                                                   validate_for_pipeline)

MODEL = "text-bison@002"


@pytest.fixture(scope="session")
def tokenizer():
    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer

    return load_tokenizer(resolve_model(MODEL).checkpoint)


def text_line(i: int) -> str:
    return json.dumps({"input_text": f"question {i}", "output_text": f"answer {i}"})


def chat_line(i: int) -> str:
    return json.dumps({"messages": [{"author": "user", "content": f"hi {i}"},
                                    {"author": "assistant", "content": f"hello {i}"}]})


def gemini_line(i: int) -> str:
    return json.dumps({"contents": [{"role": "user", "parts": [{"text": f"hi {i}"}]},
                                    {"role": "model", "parts": [{"text": f"hello {i}"}]}]})


VALID = {"text": text_line, "distillation": text_line, "chat": chat_line, "gemini": gemini_line}


def write(path: Path, lines, newline: bytes = b"\n") -> Path:
    data = b"".join((line.encode() if isinstance(line, str) else line) + newline
                    for line in lines)
    path.write_bytes(data)
    return path


def check_bad_line(tmp_path, fmt: str, bad: bytes | str, role: str = "train") -> list[str]:
    """Errors of a file whose line 2 is ``bad`` and whose 10 other lines are valid."""
    lines = [VALID[fmt](0), bad] + [VALID[fmt](i) for i in range(1, 10)]
    path = write(tmp_path / "data.jsonl", lines)
    check = check_file(str(path), fmt, role=role, name="data.jsonl")
    return [str(error) for error in check.all_errors()]


def msgs(*pairs) -> str:
    return json.dumps({"messages": [{"author": a, "content": c} for a, c in pairs]})


def contents(*pairs) -> str:
    return json.dumps({"contents": [{"role": r, "parts": [{"text": t}]} for r, t in pairs]})


BAD_LINES = [
    # (id, format, line 2, the errors it must produce)
    ("invalid-json", "text", '{"input_text": "a",}',
     ["data.jsonl:2: (line): invalid JSON: Expecting property name enclosed in double quotes "
      "(column 20)"]),
    ("truncated-json", "text", '{"input_text": "a"',
     ["data.jsonl:2: (line): invalid JSON: Expecting ',' delimiter (column 19)"]),
    ("array-line", "text", '["a", "b"]',
     ["data.jsonl:2: (line): expected a JSON object, got an array"]),
    ("string-line", "text", '"just text"',
     ["data.jsonl:2: (line): expected a JSON object, got a string"]),
    ("null-line", "text", "null", ["data.jsonl:2: (line): expected a JSON object, got null"]),
    ("invalid-utf8", "text", b'{"input_text": "\xff", "output_text": "b"}',
     ["data.jsonl:2: (line): invalid UTF-8 at byte 17 of the line (0xff)"]),
    ("bom-not-first-line", "text", "\ufeff" + text_line(99),
     ["data.jsonl:2: (line): invalid JSON: a byte order mark (U+FEFF) is only allowed at the "
      "start of the file (column 1)"]),
    ("missing-output", "text", '{"input_text": "a"}',
     ["data.jsonl:2: output_text: missing (required for the text format); unlabeled examples "
      "are only for the distillation format"]),
    ("missing-input", "text", '{"output_text": "a"}',
     ["data.jsonl:2: input_text: missing (required for the text format)"]),
    ("wrong-type", "text", '{"input_text": 5, "output_text": "b"}',
     ["data.jsonl:2: input_text: expected a string, got a number"]),
    ("null-text", "text", '{"input_text": "a", "output_text": null}',
     ["data.jsonl:2: output_text: expected a string, got null"]),
    ("list-text", "text", '{"input_text": ["a"], "output_text": {"b": 1}}',
     ["data.jsonl:2: input_text: expected a string, got an array",
      "data.jsonl:2: output_text: expected a string, got an object"]),
    ("empty-text", "text", '{"input_text": "", "output_text": "b"}',
     ["data.jsonl:2: input_text: empty"]),
    ("whitespace-text", "text", '{"input_text": "a", "output_text": " \\n\\t "}',
     ["data.jsonl:2: output_text: only whitespace"]),
    ("lone-surrogate", "text", '{"input_text": "a\\ud800", "output_text": "b"}',
     ["data.jsonl:2: input_text: contains an unpaired surrogate escape (such as \\ud800); not "
      "valid Unicode text"]),
    ("chat-line-in-text-file", "text", chat_line(99),
     ["data.jsonl:2: (line): this example looks like the chat format, not the text format "
      "(input_text is missing)"]),
    ("text-line-in-chat-file", "chat", text_line(99),
     ["data.jsonl:2: (line): this example looks like the text format, not the chat format "
      "(messages is missing)"]),
    ("unknown-author", "chat", msgs(("user", "a"), ("bot", "b")),
     ['data.jsonl:2: messages[1].author: unknown author "bot"; expected "user" or "assistant"']),
    ("author-case", "chat", msgs(("User", "a"), ("assistant", "b")),
     ['data.jsonl:2: messages[0].author: unknown author "User"; expected "user" or '
      '"assistant"']),
    ("starts-with-assistant", "chat", msgs(("assistant", "a"), ("user", "b"), ("assistant", "c")),
     ['data.jsonl:2: messages[0].author: the conversation must start with "user", not '
      '"assistant"']),
    ("not-alternating", "chat", msgs(("user", "a"), ("user", "b"), ("assistant", "c")),
     ['data.jsonl:2: messages[1].author: "user" follows "user"; "user" and "assistant" must '
      'alternate']),
    ("ends-with-user", "chat", msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
     ['data.jsonl:2: messages[2].author: the conversation must end with "assistant", not '
      '"user"']),
    ("empty-messages", "chat", '{"messages": []}',
     ["data.jsonl:2: messages: empty; at least one user and one assistant message are "
      "required"]),
    ("messages-not-array", "chat", '{"messages": "hi"}',
     ["data.jsonl:2: messages: expected an array, got a string"]),
    ("message-not-object", "chat", '{"messages": ["hi", {"author": "assistant", "content": "b"}]}',
     ["data.jsonl:2: messages[0]: expected an object, got a string"]),
    ("message-missing-fields", "chat", '{"messages": [{"author": "user"}, {"content": "b"}]}',
     ["data.jsonl:2: messages[0].content: missing (required)",
      "data.jsonl:2: messages[1].author: missing (required)"]),
    ("empty-content", "chat", msgs(("user", "a"), ("assistant", "")),
     ["data.jsonl:2: messages[1].content: empty"]),
    ("context-wrong-type", "chat",
     '{"context": 3, "messages": [{"author": "user", "content": "a"}, '
     '{"author": "assistant", "content": "b"}]}',
     ["data.jsonl:2: context: expected a string, got a number"]),
    ("context-empty", "chat",
     '{"context": "", "messages": [{"author": "user", "content": "a"}, '
     '{"author": "assistant", "content": "b"}]}',
     ["data.jsonl:2: context: empty; omit the field to use the default context"]),
    ("gemini-unknown-role", "gemini", contents(("USER", "a"), ("model", "b")),
     ['data.jsonl:2: contents[0].role: unknown role "USER"; expected "user" or "model"']),
    ("gemini-assistant-role", "gemini", contents(("user", "a"), ("assistant", "b")),
     ['data.jsonl:2: contents[1].role: unknown role "assistant"; expected "user" or "model"']),
    ("gemini-ends-with-user", "gemini", contents(("user", "a"), ("model", "b"), ("user", "c")),
     ['data.jsonl:2: contents[2].role: the conversation must end with "model", not "user"']),
    ("gemini-parts-object", "gemini",
     '{"contents": [{"role": "user", "parts": {"text": "a"}}, '
     '{"role": "model", "parts": [{"text": "b"}]}]}',
     ["data.jsonl:2: contents[0].parts: expected an array, got an object"]),
    ("gemini-non-text-part", "gemini",
     '{"contents": [{"role": "user", "parts": [{"inlineData": {}}]}, '
     '{"role": "model", "parts": [{"text": "b"}]}]}',
     ["data.jsonl:2: contents[0].parts[0].text: missing (only text parts are supported; this "
      "part has inlineData)"]),
    ("gemini-system-string", "gemini",
     '{"systemInstruction": "be nice", "contents": [{"role": "user", "parts": [{"text": "a"}]}, '
     '{"role": "model", "parts": [{"text": "b"}]}]}',
     ['data.jsonl:2: systemInstruction: expected an object {"parts": [{"text": ...}]}, got a '
      'string']),
    ("distillation-empty-output", "distillation", '{"input_text": "a", "output_text": ""}',
     ["data.jsonl:2: output_text: empty; omit the field (or make it null) for an unlabeled "
      "example"]),
    ("distillation-missing-input", "distillation", '{"output_text": "a"}',
     ["data.jsonl:2: input_text: missing (required for the distillation format)"]),
]


@pytest.mark.parametrize("fmt,bad,expected", [case[1:] for case in BAD_LINES],
                         ids=[case[0] for case in BAD_LINES])
def test_bad_line_gives_exact_error(tmp_path, fmt, bad, expected):
    assert check_bad_line(tmp_path, fmt, bad) == expected


def test_odd_values_in_ignored_fields_are_fine(tmp_path):
    odd = '{"input_text": "a", "output_text": "b", "extra": ["\\ud800", NaN, 1e999, {"k": null}]}'
    assert check_bad_line(tmp_path, "text", odd) == []


def test_distillation_evaluation_examples_need_output(tmp_path):
    errors = check_bad_line(tmp_path, "distillation", '{"input_text": "a"}', role="eval")
    assert errors == ["data.jsonl:2: output_text: missing (evaluation examples need the expected "
                      "output)"]


def test_unlabeled_distillation_examples_are_accepted_with_a_warning(tmp_path):
    lines = [json.dumps({"input_text": f"q{i}"}) for i in range(12)]
    check = check_file(str(write(tmp_path / "d.jsonl", lines)), "distillation", name="d.jsonl")
    assert check.num_errors == 0 and check.unlabeled == 12
    assert "d.jsonl: 12 unlabeled example(s); the teacher labels them; more than 1,000 are " \
           "recommended" in check.warnings


@pytest.mark.parametrize("count,role,expected", [
    (9, "train", "data.jsonl: (dataset): 9 examples; at least 10 are required"),
    (0, "train", "data.jsonl: (dataset): 0 examples; at least 10 are required"),
    (10_001, "train", "data.jsonl: (dataset): 10,001 examples; at most 10,000 are allowed"),
    (9, "eval", "data.jsonl: (dataset): 9 examples; evaluation data needs 10 to 250 examples"),
    (251, "eval", "data.jsonl: (dataset): 251 examples; evaluation data needs 10 to 250 "
                  "examples"),
])
def test_example_counts(tmp_path, count, role, expected):
    path = write(tmp_path / "data.jsonl", [text_line(i) for i in range(count)])
    check = check_file(str(path), "text", role=role, name="data.jsonl")
    assert [str(e) for e in check.all_errors()] == [expected]


@pytest.mark.parametrize("count", [10, 10_000])
def test_example_count_bounds_are_inclusive(tmp_path, count):
    path = write(tmp_path / "data.jsonl", [text_line(i) for i in range(count)])
    assert check_file(str(path), "text", name="data.jsonl").num_errors == 0


def test_at_most_10000_author_fields_over_the_dataset(tmp_path):
    def conversation(turns):
        return json.dumps({"messages": [{"author": "user" if k % 2 == 0 else "assistant",
                                         "content": "x"} for k in range(2 * turns)]})
    # 10 examples of 1000 author fields: exactly 10,000, allowed.
    ok = write(tmp_path / "ok.jsonl", [conversation(500)] * 10)
    assert check_file(str(ok), "chat", name="ok.jsonl").num_errors == 0
    bad = write(tmp_path / "bad.jsonl", [conversation(500)] * 10 + [conversation(1)])
    assert [str(e) for e in check_file(str(bad), "chat", name="bad.jsonl").all_errors()] == [
        "bad.jsonl: (dataset): 10,002 author fields; at most 10,000 are allowed over the dataset"]


def test_file_in_another_format_says_which_format_it_looks_like(tmp_path):
    path = write(tmp_path / "data.jsonl", [chat_line(i) for i in range(12)])
    errors = [str(e) for e in check_file(str(path), "text", name="data.jsonl").all_errors()]
    assert errors[0] == ("data.jsonl: (dataset): the file looks like the chat format, not the "
                         "text format; check dataset_format (--format)")
    assert errors[1] == ("data.jsonl:1: (line): this example looks like the chat format, not "
                         "the text format (input_text is missing)")
    assert len(errors) == 13


def test_chat_evaluation_data_is_refused(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", [chat_line(i) for i in range(10)])
    evaluation = write(tmp_path / "eval.jsonl", [chat_line(i) for i in range(10)])
    report = run_validation(str(train), str(evaluation), "chat", "chat-bison@002",
                            tokenizer=tokenizer)
    assert report.first_errors() == [f"{evaluation}: (dataset): evaluation data is not supported "
                                     "for chat models; leave evaluation_data_uri empty"]


def test_bom_crlf_blank_lines_and_duplicates_are_warnings(tmp_path, tokenizer):
    lines = [text_line(i) for i in range(12)]
    data = (b"\xef\xbb\xbf" + lines[0].encode() + b"\r\n" + b"\r\n" + b"  \t\n" +
            b"\r\n".join(line.encode() for line in lines[1:]) + b"\r\n" +
            lines[3].encode() + b"\n" + b'{"output_text": "answer 5", "input_text": "question 5"}')
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    out = tmp_path / "validated"
    report = run_validation(str(path), "", "text", MODEL, "", out, tokenizer=tokenizer)
    assert report.valid, report.first_errors()
    name = str(path)
    assert report.warnings == [
        f"{name}: 14 examples; 100 to 500 are recommended",
        f"{name}: the file starts with a UTF-8 byte order mark; accepted and removed",
        f"{name}: 13 line(s) end with CRLF (\\r\\n); accepted, written with LF",
        f"{name}: 2 blank line(s) skipped (lines 2, 3)",
        f"{name}: 2 exact duplicate example(s) (line 15 repeats line 6; line 16 repeats line 8)",
    ]
    train = (out / "train.jsonl").read_bytes()
    assert train == "".join(line + "\n" for line in lines + [lines[3]]).encode() + \
        b'{"output_text": "answer 5", "input_text": "question 5"}\n'
    summary = report.to_dict()["files"]["train"]
    assert (summary["blank_lines"], summary["crlf_lines"], summary["byte_order_mark"],
            summary["duplicates"], summary["examples"]) == (2, 13, True, 2, 14)


def test_normalized_lines_keep_content_byte_exact(tmp_path, tokenizer):
    # Escapes, non-ASCII, key order and spacing stay as they were written.
    line = '{"output_text":"def f():\\r\\n\\treturn `x` \\u00e9 é", "input_text" : "code?"}'
    path = write(tmp_path / "data.jsonl", [line] * 1 + [text_line(i) for i in range(10)])
    out = tmp_path / "v"
    assert run_validation(str(path), "", "text", MODEL, "", out, tokenizer=tokenizer).valid
    assert (out / "train.jsonl").read_text(encoding="utf-8").splitlines()[0] == line


def test_text_format_ignores_context_with_a_warning(tmp_path):
    lines = [json.dumps({"context": "c", "input_text": "a", "output_text": f"b{i}"})
             for i in range(10)]
    check = check_file(str(write(tmp_path / "d.jsonl", lines)), "text", name="d.jsonl")
    assert check.num_errors == 0
    assert "d.jsonl: 10 example(s) have a context field, which the text format ignores" in \
        check.warnings


def test_chat_truncation_is_counted_with_the_default_context(tmp_path, tokenizer):
    # Line 1 fits 8192 tokens on its own but not after a 400-word default context; line 2 has
    # an assistant turn over 1024 tokens.
    long_user = json.dumps({"messages": [{"author": "user", "content": " ".join(["word"] * 7900)},
                                         {"author": "assistant", "content": "ok"}]})
    long_answer = json.dumps({"messages": [{"author": "user", "content": "hi"},
                                           {"author": "assistant",
                                            "content": " ".join(["word"] * 1100)}]})
    path = write(tmp_path / "chat.jsonl", [long_user, long_answer] +
                 [chat_line(i) for i in range(10)])
    alone = run_validation(str(path), "", "chat", "chat-bison@002", "", tokenizer=tokenizer)
    assert alone.to_dict()["files"]["train"]["truncated"] == {"inputs": 0, "outputs": 1,
                                                              "examples": 1}
    report = run_validation(str(path), "", "chat", "chat-bison@002", "", tokenizer=tokenizer,
                            default_context=" ".join(["rule"] * 400))
    assert report.valid
    assert report.to_dict()["files"]["train"]["truncated"] == {"inputs": 1, "outputs": 1,
                                                               "examples": 2}
    assert (f"{path}: 2 example(s) will be truncated: 1 conversations longer than 8,192 tokens, "
            f"1 with assistant turns longer than 1,024 tokens") in report.warnings


def test_too_long_examples_are_truncated_warnings(tmp_path, tokenizer):
    long_input = " ".join(["word"] * 9000)
    long_output = " ".join(["word"] * 1100)
    lines = [json.dumps({"input_text": long_input, "output_text": long_output})] + \
        [text_line(i) for i in range(10)]
    path = write(tmp_path / "data.jsonl", lines)
    report = run_validation(str(path), "", "text", MODEL, "", tokenizer=tokenizer)
    assert report.valid
    truncated = report.to_dict()["files"]["train"]["truncated"]
    assert truncated == {"inputs": 1, "outputs": 1, "examples": 1}
    assert (f"{path}: 1 example(s) will be truncated: 1 inputs longer than 8,192 tokens, "
            f"1 with outputs longer than 1,024 tokens") in report.warnings
    stats = report.to_dict()["files"]["train"]["token_stats"]
    assert stats["input"]["max"] > 9000 and stats["output"]["max"] > 1100
    # The 32k class has larger limits: nothing to truncate.
    report_32k = run_validation(str(path), "", "text", "text-bison-32k@002", "",
                                tokenizer=tokenizer)
    assert report_32k.to_dict()["files"]["train"]["truncated"]["examples"] == 0
    assert report_32k.limits.to_dict() == {"input_tokens": 32768, "output_tokens": 8192}


def test_token_limits_per_format_and_class():
    assert token_limits("text", "8k").to_dict() == {"input_tokens": 8192, "output_tokens": 1024}
    assert token_limits("code", "32k").to_dict() == {"input_tokens": 32768,
                                                     "output_tokens": 8192}
    assert token_limits("distillation", "8k").to_dict() == {"input_tokens": 7168,
                                                            "output_tokens": 1024}
    assert token_limits("codechat", "8k").to_dict() == {"input_tokens": 8192,
                                                        "output_tokens": 1024}


def test_report_lists_first_20_errors_and_the_total(tmp_path, tokenizer):
    lines = ["not json"] * 25 + [text_line(i) for i in range(10)]
    path = write(tmp_path / "data.jsonl", lines)
    report = run_validation(str(path), "", "text", MODEL, "", tmp_path / "out",
                            tokenizer=tokenizer)
    assert not report.valid and report.num_errors == 25
    data = report.to_dict()
    assert len(data["errors"]) == 20 and data["num_errors"] == 25
    assert data["errors"][0] == f"{path}:1: (line): invalid JSON: Expecting value (column 1)"
    assert not (tmp_path / "out").exists()  # nothing written for invalid data
    assert not list(tmp_path.glob(".out.*"))  # and no staging left behind
    with pytest.raises(DatasetValidationError) as error:
        report.raise_if_invalid()
    message = str(error.value)
    assert message.startswith("Dataset validation failed with 25 errors:\n")
    assert f"  {path}:20: (line): invalid JSON" in message
    assert message.endswith("  ... and 5 more")


def test_valid_output_directory_and_reports(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", [text_line(i) for i in range(20)])
    evaluation = write(tmp_path / "eval.jsonl", [text_line(i) for i in range(100, 110)])
    out = tmp_path / "validated"
    report = run_validation(str(train), str(evaluation), "text", MODEL, "", out,
                            tokenizer=tokenizer)
    assert report.valid
    names = sorted(p.name for p in out.iterdir())
    assert names == ["eval.jsonl", "histogram.png", "report.json", "report.md", "tokens",
                     "train.jsonl"]
    assert sorted(p.name for p in (out / "tokens").iterdir()) == ["eval", "train"]
    data = json.loads((out / "report.json").read_text())
    assert data["valid"] and data["num_errors"] == 0
    assert data["files"]["train"]["examples"] == 20 and data["files"]["eval"]["examples"] == 10
    stats = data["files"]["train"]["token_stats"]["input"]
    assert set(stats) == {"count", "min", "mean", "p50", "p95", "max"} and stats["count"] == 20
    assert (out / "histogram.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (out / "report.md").read_text()
    assert "# Dataset validation: VALID" in markdown
    match = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match and base64.b64decode(match.group(1)) == (out / "histogram.png").read_bytes()
    assert (out / "eval.jsonl").read_text() == evaluation.read_text()


def test_gcs_style_missing_file_is_a_clean_error(tmp_path):
    check = check_file(str(tmp_path / "nope.jsonl"), "text", name="nope.jsonl")
    assert check.num_errors == 1
    assert str(check.all_errors()[0]).startswith("nope.jsonl: (file): ")


# --- properties: nothing crashes, every problem is a clean error ---------------------------

ERROR_RE = re.compile(r"^data\.jsonl(:\d+)?: \S[^:]*: .+$", re.S)
any_text = st.text(st.characters(exclude_categories=()))  # lone surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                       children, max_size=4),
    max_leaves=12)
field_names = st.sampled_from(["input_text", "output_text", "context", "messages", "author",
                               "content", "contents", "role", "parts", "text",
                               "systemInstruction"])
message = st.fixed_dictionaries({}, optional={
    "author": st.sampled_from(["user", "assistant", "bot"]) | json_values,
    "content": st.text() | any_text | json_values,
    "role": st.sampled_from(["user", "model"]), "parts": st.lists(
        st.fixed_dictionaries({"text": st.text()}) | json_values, max_size=3)})
example = st.dictionaries(field_names | any_text,
                          st.text() | json_values | st.lists(message, max_size=5),
                          max_size=5)


def _assert_clean(check, fmt):
    for error in check.all_errors():
        assert ERROR_RE.match(str(error)), str(error)
    assert check.num_errors >= len(check.all_errors())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), fmt=st.sampled_from(["text", "chat", "distillation",
                                                          "gemini"]))
def test_arbitrary_bytes_never_crash(data, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        check = check_file(str(path), fmt, name="data.jsonl")
        _assert_clean(check, fmt)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(example | json_values, min_size=0, max_size=12),
       fmt=st.sampled_from(["text", "chat", "distillation", "gemini"]))
def test_arbitrary_json_lines_never_crash_and_valid_ones_tokenize(tokenizer, lines, fmt):
    encoder = ExampleEncoder(tokenizer, fmt, token_limits(fmt, "8k"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        check = check_file(str(path), fmt, name="data.jsonl", encoder=encoder)
        _assert_clean(check, fmt)
        assert len(check.input_lengths) == check.examples


# --- the command line ---------------------------------------------------------------------

def test_cli_valid_invalid_and_usage_errors(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", [text_line(i) for i in range(10)])
    bad = write(tmp_path / "bad.jsonl", [text_line(i) for i in range(9)])
    assert main([str(good), "--format", "text"]) == 0
    out = capsys.readouterr().out
    assert "# Dataset validation: VALID" in out and "| input (prompt) |" in out
    assert main([str(bad), "--format", "text"]) == 1
    assert f"{bad}: (dataset): 9 examples; at least 10 are required" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(good), "--format", "yaml"]) == 2
    assert main([]) == 2
    assert main([str(good), "--model", "no-such-model@001"]) == 2
    capsys.readouterr()


def test_cli_json_eval_guess_and_report_dir(tmp_path, capsys):
    chat = write(tmp_path / "chat.jsonl", [chat_line(i) for i in range(10)])
    assert main([str(chat), "--json", "--report-dir", str(tmp_path / "r")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dataset_format"] == "chat" and data["format_guessed"] is True
    assert data["model"]["reference"] == "chat-bison@002"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["histogram.png",
                                                                 "report.json", "report.md"]
    evaluation = write(tmp_path / "eval.jsonl", [text_line(i) for i in range(5)])
    assert main([str(evaluation), "--eval", "--format", "text", "--no-tokens", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["errors"] == [f"{evaluation}: (dataset): 5 examples; evaluation data needs 10 "
                              "to 250 examples"]


# --- the component's work -----------------------------------------------------------------

def test_validate_for_pipeline_writes_report_and_raises_on_invalid(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [text_line(i) for i in range(10)] + ["{oops"])
    with pytest.raises(DatasetValidationError, match=r"bad\.jsonl:11: \(line\): invalid JSON"):
        validate_for_pipeline(str(bad), "", "text", MODEL, "", str(tmp_path / "v"),
                              str(tmp_path / "report.md"))
    assert "# Dataset validation: INVALID" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "v").exists()
    good = write(tmp_path / "good.jsonl", [text_line(i) for i in range(10)])
    metadata = validate_for_pipeline(f"file://{good}", "", "text", MODEL, "",
                                     str(tmp_path / "v"), str(tmp_path / "report.md"))
    assert metadata["num_examples"] == 10 and metadata["input_token_limit"] == 8192
    assert (tmp_path / "v" / "train.jsonl").read_text() == good.read_text()


def test_component_signature():
    from components.validate_dataset.component import validate_dataset

    spec = validate_dataset.component_spec
    assert list(spec.inputs) == ["dataset_uri", "evaluation_data_uri", "dataset_format",
                                 "large_model_reference", "max_context_length", "default_context"]
    assert list(spec.outputs) == ["report", "validated_dataset"] or \
        sorted(spec.outputs) == ["report", "validated_dataset"]
    assert spec.outputs["validated_dataset"].type == "system.Dataset@0.0.1"
    assert spec.outputs["report"].type == "system.Markdown@0.0.1"
