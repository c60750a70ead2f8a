"""Dataset validation: every documented rule, checked line by line, with a report.

The validator streams a JSONL file (local path, ``file://`` or ``gs://``) line by line, checks
every example against its format (:mod:`components.common.dataset_formats`), counts tokens with
the same batched encoder transform uses (:mod:`components.common.encoding`), and writes the
validated examples and their tokens (:mod:`components.common.artifacts.validated_dataset`, the
folder transform and evaluate read) so that transform does not tokenize a second time.

Structure first, tokens after (:func:`run_validation`): every rule below but the token counts is
checked with light imports only (no tokenizer, numpy or torch), so a dataset that fails on
structure is answered in about a second; the tokenizer is loaded, and the examples kept from the
structural pass tokenized, only for a dataset without errors.

Errors (the dataset is refused; the pipeline stops before tuning):

- invalid UTF-8 (reported with the line and the byte offset in the line);
- invalid JSON, a line that is not a JSON object;
- a missing required field, a field of the wrong type, empty or whitespace-only text, text
  with an unpaired surrogate escape (``"\\ud800"``);
- chat: an unknown author, authors not alternating, not starting with ``user`` or not ending
  with ``assistant``, an empty ``messages`` array, more than 10,000 ``author`` fields in the
  dataset; Gemini: the same for ``role`` (``user``/``model``), non-text parts;
- fewer than 10 or more than 10,000 training examples; evaluation data outside 10 to 250
  examples; evaluation data for the chat format (not supported); evaluation examples
  without ``output_text`` (the expected output is needed to evaluate);
- a file that looks like another format (the message names the format it looks like).

Warnings (the dataset is accepted; the report lists them):

- a UTF-8 byte order mark at the start of the file (removed), CRLF line ends (written as LF),
  blank lines (skipped and counted, with their line numbers);
- exact duplicate examples (same JSON value), with the lines they repeat;
- examples longer than the token limits (truncated by transform; counted per input/output);
- fewer than 100 training examples (100 to 500 are recommended);
- text format: examples with a ``context`` field (the text format ignores it);
- distillation: unlabeled examples (the teacher labels them; more than 1,000 recommended).

Output directory (``validated_dataset``), written atomically and only for a valid dataset:
``train.jsonl`` and ``eval.jsonl`` (the valid examples, one JSON object per line exactly as given:
UTF-8, LF, no BOM, no blank lines), ``report.json``, ``report.md``, ``histogram.png`` and
``tokens/train`` / ``tokens/eval``: the token datasets transform reuses when its tokenizer, format,
limits and default context are the same. Chat examples are tokenized as transform tokenizes them:
with their own context, else the pipeline's ``default_context``, so the token counts and
truncations in the report are those of the tuning data.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

from components.common import storage
from components.common.markdown import write_report
from components.common.artifacts.validated_dataset import (EVAL, EVAL_FILE, TOKENS_DIR, TRAIN,
                                                           TRAIN_FILE, token_cache,
                                                           token_metadata, truncation_metadata)
from components.common.dataset_formats import (MAX_AUTHOR_FIELDS, MAX_EVAL_EXAMPLES,
                                               MAX_EXAMPLES, MIN_EVAL_EXAMPLES, MIN_EXAMPLES,
                                               RECOMMENDED_MIN_EXAMPLES,
                                               RECOMMENDED_MIN_UNLABELED, Example, Limits,
                                               author_fields, compatible_formats,
                                               detect_format, normalize_format, parse_example,
                                               token_limits)
from components.common.model_catalog import check_reference, context_class

if TYPE_CHECKING:  # imported where tokens are counted: numpy, the tokenizer libraries, torch
    from components.common.artifacts.token_dataset import TokenDatasetWriter
    from components.common.encoding import ExampleEncoder

BOM = b"\xef\xbb\xbf"
MAX_REPORTED_ERRORS = 20  # in the report and in the exception message
MAX_KEPT_ERRORS = 1000  # per file, kept in memory (the count is always exact)
MAX_LISTED_LINES = 10  # line numbers listed in a warning
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
HISTOGRAM_PNG = "histogram.png"
KEPT_EXAMPLES_BYTES = 64 * 2**20  # a file's examples kept between the two passes, at most


@dataclass(frozen=True)
class Issue:
    """One error: ``file:line: field: message`` (no line for dataset-wide errors)."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.message}"


class DatasetValidationError(ValueError):
    """Invalid training or evaluation data; the message lists the first errors."""

    def __init__(self, report: "ValidationReport"):
        self.report = report
        errors = report.first_errors()
        lines = "\n".join(f"  {error}" for error in errors)
        more = report.num_errors - len(errors)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"Dataset validation failed with {report.num_errors} "
                         f"error{'s' if report.num_errors != 1 else ''}:\n{lines}{tail}")


def _lines_list(numbers: list[int], total: int) -> str:
    shown = ", ".join(str(n) for n in numbers[:MAX_LISTED_LINES])
    return shown + (", ..." if total > MAX_LISTED_LINES else "")


@dataclass
class FileCheck:
    """What validating one file found."""

    role: str  # 'train' or 'eval'
    uri: str
    name: str  # how the file is named in messages
    dataset_format: str
    lines: int = 0
    examples: int = 0  # valid examples
    invalid_lines: int = 0
    blank_lines: list[int] = field(default_factory=list)
    num_blank_lines: int = 0
    crlf_lines: int = 0
    bom: bool = False
    num_errors: int = 0
    errors: list[Issue] = field(default_factory=list)  # line errors, first MAX_KEPT_ERRORS
    dataset_errors: list[Issue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (line, first line)
    num_duplicates: int = 0
    input_lengths: list[int] = field(default_factory=list)
    output_lengths: list[int] = field(default_factory=list)
    truncated_inputs: int = 0
    truncated_outputs: int = 0
    truncated_examples: int = 0
    author_fields: int = 0
    unlabeled: int = 0
    ignored_contexts: int = 0
    looks_like: Counter = field(default_factory=Counter)

    def add_error(self, line: int | None, field_name: str, message: str) -> None:
        self.num_errors += 1
        issue = Issue(self.name, line, field_name, message)
        if line is None:
            self.dataset_errors.append(issue)
        elif len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(issue)

    def all_errors(self) -> list[Issue]:
        """Dataset-wide errors first (they explain the rest), then line errors in order."""
        return self.dataset_errors + self.errors

    def summary(self, limits: Limits | None) -> dict:
        return {
            "role": self.role,
            "uri": self.uri,
            "lines": self.lines,
            "examples": self.examples,
            "invalid_lines": self.invalid_lines,
            "blank_lines": self.num_blank_lines,
            "crlf_lines": self.crlf_lines,
            "byte_order_mark": self.bom,
            "duplicates": self.num_duplicates,
            "author_fields": self.author_fields,
            "unlabeled": self.unlabeled,
            "num_errors": self.num_errors,
            "errors": [str(e) for e in self.all_errors()[:MAX_REPORTED_ERRORS]],
            "warnings": list(self.warnings),
            "token_stats": {"input": length_stats(self.input_lengths),
                            "output": length_stats(self.output_lengths)},
            "truncated": {"inputs": self.truncated_inputs, "outputs": self.truncated_outputs,
                          "examples": self.truncated_examples},
            "limits": limits.to_dict() if limits else None,
        }


def length_stats(lengths: list[int]) -> dict | None:
    """min / mean / p50 / p95 / max of token lengths (None when there are none)."""
    if not lengths:
        return None
    import numpy as np

    values = np.asarray(lengths, dtype=np.int64)
    return {"count": int(values.size), "min": int(values.min()),
            "mean": round(float(values.mean()), 2),
            "p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "max": int(values.max())}


def check_file(uri: str, dataset_format: str, *, role: str = "train",
               encoder: ExampleEncoder | None = None, jsonl_out: IO[str] | None = None,
               token_writer: TokenDatasetWriter | None = None, name: str | None = None,
               batch_size: int | None = None) -> FileCheck:
    """Validates one JSONL file, streaming.

    Valid examples are written, as given, to ``jsonl_out``; with an ``encoder`` they are
    tokenized in batches of ``batch_size`` (default: transform's; lengths and truncations are
    counted) and, with a ``token_writer``, written as a token dataset. Nothing raises for bad
    data: every problem is in the result.
    """
    check = FileCheck(role, str(uri), name or str(uri), normalize_format(dataset_format))
    counter = None if encoder is None else _TokenCounter(check, encoder, token_writer,
                                                         batch_size)
    _read_file(check, uri, jsonl_out, None if counter is None else counter.add)
    if counter is not None:
        counter.flush()
    return check


class _TokenCounter:
    """Tokenizes examples in batches: lengths and truncations go into a :class:`FileCheck`,
    token rows into a token dataset writer (when given)."""

    def __init__(self, check: FileCheck, encoder: ExampleEncoder,
                 writer: TokenDatasetWriter | None = None, batch_size: int | None = None):
        if batch_size is None:
            from components.common.encoding import DEFAULT_BATCH_SIZE

            batch_size = DEFAULT_BATCH_SIZE
        self.check, self.encoder, self.writer, self.batch_size = check, encoder, writer, batch_size
        self.pending: list[Example] = []

    def add(self, example: Example, size: int = 0) -> None:
        self.pending.append(example)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        check = self.check
        for encoded in self.encoder.encode_batch(self.pending):
            check.input_lengths.append(encoded.input_tokens)
            check.output_lengths.append(encoded.output_tokens)
            check.truncated_inputs += encoded.input_truncated
            check.truncated_outputs += encoded.output_truncated
            check.truncated_examples += encoded.truncated
            if self.writer is not None and encoded.ids is not None:
                self.writer.add(encoded.ids, encoded.mask)
        self.pending.clear()


class _KeptExamples:
    """The valid examples of the structural pass, kept for the token pass while their lines
    total at most ``budget`` bytes; beyond it none are kept (``examples`` is None) and the token
    pass reads the file again."""

    def __init__(self, budget: int | None = None):
        self.examples: list[Example] | None = []
        self.left = KEPT_EXAMPLES_BYTES if budget is None else budget

    def add(self, example: Example, size: int) -> None:
        if self.examples is None:
            return
        self.left -= size
        if self.left < 0:
            self.examples = None
        else:
            self.examples.append(example)


def _read_file(check: FileCheck, uri: str, jsonl_out: IO[str] | None,
               on_example: Callable[[Example, int], None] | None) -> None:
    """The structural pass over one file: each line's rules, then the dataset-wide ones.

    Each valid example is written, as given, to ``jsonl_out`` and passed to ``on_example``
    with the size of its line in bytes.
    """
    fmt = check.dataset_format
    evaluation = check.role == "eval"
    seen: dict[bytes, int] = {}
    try:
        with storage.local_copy(uri) as path, open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                check.lines = number
                size = len(raw)
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                    check.crlf_lines += 1
                if number == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                    check.bom = True
                if not raw.strip(b" \t\r\n\f\v"):
                    check.num_blank_lines += 1
                    if len(check.blank_lines) < MAX_LISTED_LINES:
                        check.blank_lines.append(number)
                    continue
                example, text, obj = _check_line(check, number, raw, fmt, evaluation)
                if example is None:
                    check.invalid_lines += 1
                    continue
                check.examples += 1
                key = _duplicate_key(obj, text)
                if key in seen:
                    check.num_duplicates += 1
                    if len(check.duplicates) < MAX_LISTED_LINES:
                        check.duplicates.append((number, seen[key]))
                else:
                    seen[key] = number
                if fmt == "text" and isinstance(obj, dict) and "context" in obj:
                    check.ignored_contexts += 1
                if not example.labeled:
                    check.unlabeled += 1
                if jsonl_out is not None:
                    jsonl_out.write(text)
                    jsonl_out.write("\n")
                if on_example is not None:
                    on_example(example, size)
    except FileNotFoundError as error:
        check.add_error(None, "(file)", str(error))
        return
    except IsADirectoryError:
        check.add_error(None, "(file)", "is a directory; expected a JSONL file")
        return
    _dataset_checks(check, fmt, evaluation)


def _duplicate_key(obj, text: str) -> bytes:
    """Equal for equal JSON values (whatever the key order or spacing)."""
    try:
        canonical = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    except (ValueError, RecursionError):
        canonical = text
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _check_line(check: FileCheck, number: int, raw: bytes, fmt: str, evaluation: bool):
    """Decodes and checks one non-blank line: (example, normalized text, JSON value)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        check.add_error(number, "(line)", f"invalid UTF-8 at byte {error.start + 1} of the line "
                                          f"(0x{raw[error.start]:02x})")
        return None, None, None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        message = error.msg
        if message.startswith("Unexpected UTF-8 BOM"):
            message = "a byte order mark (U+FEFF) is only allowed at the start of the file"
        check.add_error(number, "(line)", f"invalid JSON: {message} (column {error.colno})")
        return None, None, None
    except (ValueError, RecursionError) as error:  # e.g. integers too long to convert
        check.add_error(number, "(line)", f"invalid JSON: {str(error).splitlines()[0][:120]}")
        return None, None, None
    if fmt == "chat":
        check.author_fields += author_fields(obj)
    example, problems = parse_example(obj, fmt, require_output=evaluation)
    looks = detect_format(obj)
    if looks is not None:
        check.looks_like[looks] += 1
    for field_name, message in problems:
        check.add_error(number, field_name, message)
    if example is None:
        return None, None, None
    return example, text.strip(" \t\r\n"), obj


def _dataset_checks(check: FileCheck, fmt: str, evaluation: bool) -> None:
    """Dataset-wide rules and warnings, once every line has been read."""
    nonblank = check.lines - check.num_blank_lines
    # A file in another format: most lines look like it (text and distillation are compatible).
    if check.invalid_lines and nonblank:
        looks, count = max(check.looks_like.items(), key=lambda item: item[1], default=(None, 0))
        if looks is not None and not compatible_formats(looks, fmt) and count * 2 > nonblank:
            check.add_error(None, "(dataset)", f"the file looks like the {looks} format, not the "
                                               f"{fmt} format; check dataset_format (--format)")
    n = nonblank  # every non-blank line is an example, valid or not
    if evaluation:
        if fmt == "chat":
            check.add_error(None, "(dataset)", "evaluation data is not supported for chat models")
        elif not MIN_EVAL_EXAMPLES <= n <= MAX_EVAL_EXAMPLES:
            check.add_error(None, "(dataset)",
                            f"{_examples(n)}; evaluation data needs {MIN_EVAL_EXAMPLES} to "
                            f"{MAX_EVAL_EXAMPLES} examples")
    else:
        if n < MIN_EXAMPLES:
            check.add_error(None, "(dataset)",
                            f"{_examples(n)}; at least {MIN_EXAMPLES} are required")
        elif n > MAX_EXAMPLES:
            check.add_error(None, "(dataset)",
                            f"{_examples(n)}; at most {MAX_EXAMPLES:,} are allowed")
        elif n < RECOMMENDED_MIN_EXAMPLES and not check.num_errors:
            check.warnings.append(f"{check.name}: {_examples(n)}; {RECOMMENDED_MIN_EXAMPLES} to "
                                  "500 are recommended")
    if fmt == "chat" and check.author_fields > MAX_AUTHOR_FIELDS:
        check.add_error(None, "(dataset)", f"{check.author_fields:,} author fields; at most "
                                           f"{MAX_AUTHOR_FIELDS:,} are allowed over the dataset")
    if check.bom:
        check.warnings.append(f"{check.name}: the file starts with a UTF-8 byte order mark; "
                              "accepted and removed")
    if check.crlf_lines:
        check.warnings.append(f"{check.name}: {check.crlf_lines} line(s) end with CRLF (\\r\\n); "
                              "accepted, written with LF")
    if check.num_blank_lines:
        check.warnings.append(f"{check.name}: {check.num_blank_lines} blank line(s) skipped "
                              f"(lines {_lines_list(check.blank_lines, check.num_blank_lines)})")
    if check.num_duplicates:
        pairs = "; ".join(f"line {line} repeats line {first}" for line, first in check.duplicates)
        more = ", ..." if check.num_duplicates > len(check.duplicates) else ""
        check.warnings.append(f"{check.name}: {check.num_duplicates} exact duplicate example(s) "
                              f"({pairs}{more})")
    if check.ignored_contexts:
        check.warnings.append(f"{check.name}: {check.ignored_contexts} example(s) have a context "
                              "field, which the text format ignores")
    if fmt == "distillation" and check.unlabeled and not evaluation:
        advice = (f"; more than {RECOMMENDED_MIN_UNLABELED:,} are recommended"
                  if check.unlabeled <= RECOMMENDED_MIN_UNLABELED else "")
        check.warnings.append(f"{check.name}: {check.unlabeled} unlabeled example(s); the teacher "
                              f"labels them{advice}")


def _examples(n: int) -> str:
    return f"{n:,} example{'s' if n != 1 else ''}"


def _truncation_warning(check: FileCheck, limits: Limits, fmt: str) -> None:
    if not check.truncated_examples:
        return
    conversational = fmt in ("chat", "gemini")
    what_in = "conversations" if conversational else "inputs"
    what_out = "assistant turns" if conversational else "outputs"
    check.warnings.append(
        f"{check.name}: {check.truncated_examples} example(s) will be truncated: "
        f"{check.truncated_inputs} {what_in} longer than {limits.input_tokens:,} tokens, "
        f"{check.truncated_outputs} with {what_out} longer than {limits.output_tokens:,} tokens")


@dataclass
class ValidationReport:
    """The result of validating a training set and an optional evaluation set."""

    dataset_format: str
    model: dict
    limits: Limits
    files: list[FileCheck]
    general_errors: list[str] = field(default_factory=list)

    @property
    def num_errors(self) -> int:
        return len(self.general_errors) + sum(f.num_errors for f in self.files)

    @property
    def valid(self) -> bool:
        return self.num_errors == 0

    @property
    def warnings(self) -> list[str]:
        return [w for f in self.files for w in f.warnings]

    def first_errors(self, limit: int = MAX_REPORTED_ERRORS) -> list[str]:
        errors = list(self.general_errors)
        for check in self.files:
            errors += [str(e) for e in check.all_errors()]
        return errors[:limit]

    def file(self, role: str) -> FileCheck | None:
        return next((f for f in self.files if f.role == role), None)

    def to_dict(self) -> dict:
        return {
            "valid": self.valid,
            "dataset_format": self.dataset_format,
            "model": self.model,
            "limits": self.limits.to_dict(),
            "num_errors": self.num_errors,
            "errors": self.first_errors(),
            "num_warnings": len(self.warnings),
            "warnings": self.warnings,
            "files": {f.role: f.summary(self.limits) for f in self.files},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self, histogram_png: bytes | None = None) -> str:
        from components.validate_dataset.report import render_markdown

        return render_markdown(self.to_dict(), histogram_png)

    def histogram_png(self) -> bytes | None:
        from components.validate_dataset.report import histogram_png

        return histogram_png(self)

    def raise_if_invalid(self) -> None:
        if not self.valid:
            raise DatasetValidationError(self)


def run_validation(dataset_uri: str, evaluation_data_uri: str = "", dataset_format: str = "text",
                   large_model_reference: str = "text-bison@002", max_context_length: str = "",
                   output_dir: str | os.PathLike | None = None, *, default_context: str = "",
                   tokenizer=None, count_tokens: bool = True, evaluation_only: bool = False,
                   batch_size: int | None = None) -> ValidationReport:
    """Validates a training set (and an evaluation set); writes ``output_dir`` when valid.

    ``default_context`` is the context of chat examples without their own (it counts toward
    their token limit). ``tokenizer`` skips loading the model's (tests); ``count_tokens=False`` checks structure
    only. ``evaluation_only`` validates ``dataset_uri`` as an evaluation set (``tunepipe
    validate --eval``). The output directory appears atomically, and only for a valid dataset.
    Bad data never raises here: call :meth:`ValidationReport.raise_if_invalid`.

    Structure comes first: every file is read and checked (every rule but the token counts)
    without the tokenizer, numpy or torch, so a dataset that fails on structure is answered
    without loading a model. Only a dataset without errors is then tokenized: the tokenizer is
    loaded and the examples kept from the structural pass are encoded (a file whose lines total
    more than ``KEPT_EXAMPLES_BYTES`` is read a second time instead).
    """
    fmt = normalize_format(dataset_format)
    model_class = context_class(large_model_reference, max_context_length)
    limits = token_limits(fmt, model_class)
    model = {"reference": large_model_reference, "context_class": model_class}
    if count_tokens and tokenizer is None:
        check_reference(large_model_reference)  # an unknown model is refused before any data
    general: list[str] = []
    if evaluation_data_uri and fmt == "chat":
        general.append(f"{evaluation_data_uri}: (dataset): evaluation data is not supported for "
                       "chat models; leave evaluation_data_uri empty")
    staging = None
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = output_dir.with_name(f".{output_dir.name}.{uuid.uuid4().hex}.tmp")
        (staging / TOKENS_DIR).mkdir(parents=True)
    files: list[FileCheck] = []
    try:
        jobs = [(EVAL if evaluation_only else TRAIN, dataset_uri, TRAIN_FILE)]
        if evaluation_data_uri and not evaluation_only and fmt != "chat":
            jobs.append((EVAL, evaluation_data_uri, EVAL_FILE))
        kept: list[_KeptExamples | None] = []
        for role, uri, file_name in jobs:
            kept.append(_KeptExamples() if count_tokens else None)
            files.append(_check_into(staging, role, uri, file_name, fmt, kept[-1]))
        report = ValidationReport(fmt, model, limits, files, general)
        if count_tokens and report.valid:
            from components.common.encoding import ExampleEncoder

            if tokenizer is None:
                from components.common.model_loading import load_model_tokenizer

                tokenizer, resolved = load_model_tokenizer(large_model_reference)
                model["checkpoint"] = resolved.checkpoint
            encoder = ExampleEncoder(tokenizer, fmt, limits, default_context)
            for check, (_, uri, _), examples in zip(files, jobs, kept):
                _count_tokens_into(staging, check, uri, examples.examples, encoder, batch_size)
                _truncation_warning(check, limits, fmt)
        if staging is not None:
            if not report.valid:
                shutil.rmtree(staging, ignore_errors=True)
                return report
            histogram = report.histogram_png()
            (staging / REPORT_JSON).write_text(report.to_json(), encoding="utf-8")
            (staging / REPORT_MD).write_text(report.to_markdown(histogram), encoding="utf-8")
            if histogram:
                (staging / HISTOGRAM_PNG).write_bytes(histogram)
            if output_dir.exists():
                shutil.rmtree(output_dir)
            os.replace(staging, output_dir)
        return report
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_into(staging: Path | None, role: str, uri: str, file_name: str, fmt: str,
                kept: _KeptExamples | None) -> FileCheck:
    """The structural pass over one file, writing its valid lines under ``staging`` when given
    and keeping its examples in ``kept`` when given."""
    check = FileCheck(role, str(uri), str(uri), fmt)
    on_example = None if kept is None else kept.add
    if staging is None:
        _read_file(check, uri, None, on_example)
        return check
    with open(staging / file_name, "w", encoding="utf-8", newline="\n") as out:
        _read_file(check, uri, out, on_example)
    return check


def _count_tokens_into(staging: Path | None, check: FileCheck, uri: str,
                       examples: list[Example] | None, encoder: ExampleEncoder,
                       batch_size: int | None) -> None:
    """The token pass over a valid file: its lengths and truncations into ``check``, its token
    dataset under ``staging`` when given. ``examples`` are the file's valid examples, or None to
    read the file again."""
    writer = None
    if staging is not None:
        from components.common.artifacts.token_dataset import TokenDatasetWriter

        writer = TokenDatasetWriter(token_cache(staging, check.role), token_metadata(encoder))
    counter = _TokenCounter(check, encoder, writer, batch_size)
    try:
        if examples is not None:
            for example in examples:
                counter.add(example)
        else:
            again = FileCheck(check.role, check.uri, check.name, check.dataset_format)
            _read_file(again, uri, None, counter.add)
            if again.num_errors or (again.lines, again.examples) != (check.lines,
                                                                     check.examples):
                check.add_error(None, "(file)", "changed while it was being validated; "
                                                "validate it again")
        counter.flush()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        if check.unlabeled or check.num_errors:
            writer.abort()  # unlabeled examples have nothing to train on: no token cache
        else:
            writer.metadata.update(truncation_metadata(check.truncated_inputs,
                                                       check.truncated_outputs,
                                                       check.truncated_examples))
            writer.close()


def validate_for_pipeline(dataset_uri: str, evaluation_data_uri: str, dataset_format: str,
                          large_model_reference: str, max_context_length: str,
                          validated_dataset_path: str, report_path: str,
                          default_context: str = "") -> dict:
    """The validate_dataset component's work: returns the artifact metadata.

    Writes the Markdown report (with the histogram embedded) to ``report_path`` whatever the
    outcome, the validated directory to ``validated_dataset_path`` when valid, and raises
    :class:`DatasetValidationError` (with the first errors) when not.
    """
    report = run_validation(dataset_uri, evaluation_data_uri, dataset_format,
                            large_model_reference, max_context_length, validated_dataset_path,
                            default_context=default_context)
    markdown = report.to_markdown(report.histogram_png())
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    write_report(report_path, markdown)
    print(report.to_markdown(None), flush=True)
    report.raise_if_invalid()
    train = report.file("train")
    evaluation = report.file("eval")
    metadata = {
        "dataset_format": report.dataset_format,
        "num_examples": train.examples if train else 0,
        "num_eval_examples": evaluation.examples if evaluation else 0,
        "num_warnings": len(report.warnings),
        "truncated_examples": sum(f.truncated_examples for f in report.files),
        "context_class": report.model.get("context_class"),
        "input_token_limit": report.limits.input_tokens,
        "output_token_limit": report.limits.output_tokens,
    }
    return metadata
