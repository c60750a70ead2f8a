"""Distillation examples: reading the JSONL the teacher works on.

One example a line: ``{"input_text": str, "output_text": str (optional)}``. Without
``output_text`` (absent or null) the example is unlabeled and the teacher writes its label. A
labeled example may carry a hand-written ``rationale`` (a string): such examples are preferred as
few-shot demonstrations (the paper's chain-of-thought demonstrations are hand-written). Other
fields are ignored. An example's ``index`` counts the examples (0-based), its ``line`` the file's
lines (1-based).

A validated dataset folder is read through its contract
(:mod:`components.common.artifacts.validated_dataset`), without checking its examples again; a
JSONL file is checked here (blank lines are skipped). Either way a ``rationale`` is checked: the
validator ignores that field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from components.common.artifacts import validated_dataset
from components.common.storage import read_text


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


def evaluation_file(dataset: str | os.PathLike) -> Path | None:
    """The evaluation examples of a validated dataset folder; None for a JSONL file or a folder
    without evaluation data."""
    path = Path(str(dataset))
    return validated_dataset.examples_file(path, validated_dataset.EVAL) if path.is_dir() else None


def _example(index: int, line: int, record: dict, where: str) -> DistillationExample:
    rationale = record.get("rationale")
    if rationale is not None and (not isinstance(rationale, str) or not rationale.strip()):
        raise ExampleDataError(f"{where}: rationale must be a non-empty string, null or absent")
    return DistillationExample(index, line, record["input_text"], record.get("output_text"),
                               rationale)


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
        input_text, output_text = record.get("input_text"), record.get("output_text")
        if not isinstance(input_text, str) or not input_text.strip():
            raise ExampleDataError(f"{where}: input_text must be a non-empty string")
        if output_text is not None and (not isinstance(output_text, str)
                                        or not output_text.strip()):
            raise ExampleDataError(f"{where}: output_text must be a non-empty string, null or "
                                   "absent")
        examples.append(_example(len(examples), line_number, record, where))
    if not examples:
        raise ExampleDataError(f"{source}: no examples")
    return examples


def read_validated_examples(path: Path) -> list[DistillationExample]:
    """The examples of a validated distillation JSONL file (validated: not checked again)."""
    return [_example(index, line, record, f"{path}:{line}") for index, (line, record, _)
            in enumerate(validated_dataset.read_examples(path, "distillation"))]


def read_examples(dataset: str | os.PathLike) -> list[DistillationExample]:
    """The examples of a dataset: a validated dataset folder (validate_dataset's output: its
    training examples), or a JSONL file (local path, ``file://`` or ``gs://`` URI)."""
    path = Path(str(dataset))
    if path.is_dir():
        return read_validated_examples(path / validated_dataset.TRAIN_FILE)
    return parse_examples(read_text(str(dataset)), str(dataset))


def read_evaluation_examples(dataset: str | os.PathLike) -> list[DistillationExample]:
    """The (labeled) evaluation examples of a validated dataset folder ([] without any)."""
    path = evaluation_file(dataset)
    return [] if path is None else read_validated_examples(path)
