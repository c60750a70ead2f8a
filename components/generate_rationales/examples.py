"""Distillation examples: reading the JSONL the teacher works on.

One example a line: ``{"input_text": str, "output_text": str (optional)}``. Without
``output_text`` (absent or null) the example is unlabeled and the teacher writes its label. A
labeled example may carry a hand-written ``rationale`` (a string): such examples are preferred as
few-shot demonstrations (the paper's chain-of-thought demonstrations are hand-written). Other
fields are ignored. Blank lines are skipped; an example's ``index`` counts the examples (0-based),
its ``line`` the file's lines (1-based).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from components.common.storage import read_text
from components.common.validated_dataset import EVAL_FILE, TRAIN_FILE


class ExampleDataError(ValueError):
    """Data the teacher cannot work on; the message names the file, line and field."""


@dataclass(frozen=True)
class DistillationExample:
    """One example: its input, its gold label (None: unlabeled) and an optional rationale."""

    index: int
    line: int
    input_text: str
    output_text: str | None = None
    rationale: str | None = None

    @property
    def labeled(self) -> bool:
        return self.output_text is not None


def dataset_file(dataset: str | os.PathLike) -> str:
    """The JSONL file of ``dataset``: a validated dataset folder (validate_dataset's output, whose
    ``train.jsonl`` is read), or a JSONL file (local path, ``file://`` or ``gs://`` URI)."""
    path = Path(str(dataset))
    return str(path / TRAIN_FILE) if path.is_dir() else str(dataset)


def evaluation_file(dataset: str | os.PathLike) -> Path | None:
    """The ``eval.jsonl`` of a validated dataset folder; None for a JSONL file or a folder
    without evaluation data."""
    path = Path(str(dataset)) / EVAL_FILE
    return path if path.is_file() else None


def parse_examples(text: str, source: str) -> list[DistillationExample]:
    """The examples of a JSONL text; ``source`` names the file in error messages."""
    examples = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ExampleDataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ExampleDataError(f"{where}: expected a JSON object with input_text")
        fields = {name: record.get(name) for name in ("input_text", "output_text", "rationale")}
        if not isinstance(fields["input_text"], str) or not fields["input_text"].strip():
            raise ExampleDataError(f"{where}: input_text must be a non-empty string")
        for name in ("output_text", "rationale"):
            value = fields[name]
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ExampleDataError(f"{where}: {name} must be a non-empty string, null or "
                                       "absent")
        examples.append(DistillationExample(len(examples), line_number, **fields))
    if not examples:
        raise ExampleDataError(f"{source}: no examples")
    return examples


def read_examples(dataset: str | os.PathLike) -> list[DistillationExample]:
    """The examples of a dataset (see :func:`dataset_file` for what ``dataset`` may be)."""
    source = dataset_file(dataset)
    return parse_examples(read_text(source), source)


def read_evaluation_examples(dataset: str | os.PathLike) -> list[DistillationExample]:
    """The labeled examples of a validated dataset folder's ``eval.jsonl`` ([] without one)."""
    path = evaluation_file(dataset)
    if path is None:
        return []
    examples = parse_examples(path.read_text(encoding="utf-8"), str(path))
    unlabeled = [e.line for e in examples if not e.labeled]
    if unlabeled:
        raise ExampleDataError(f"{path}:{unlabeled[0]}: output_text: evaluation examples must "
                               "be labeled")
    return examples
