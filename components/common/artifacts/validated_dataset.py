"""The validated dataset folder: the contract between validate_dataset, which writes it, and
transform, evaluate, generate_rationales and upload_model, which read it.

validate_dataset writes the folder atomically, and only for a valid dataset:

- ``train.jsonl`` and ``eval.jsonl`` (:data:`TRAIN_FILE`, :data:`EVAL_FILE`; ``eval.jsonl`` only
  with evaluation data): the valid examples, one JSON object per line exactly as given (UTF-8,
  LF, no BOM, no blank lines), every evaluation example labeled;
- ``tokens/train`` and ``tokens/eval`` (:func:`token_cache`): the examples as token datasets
  (:mod:`components.common.artifacts.token_dataset`), encoded by
  :mod:`components.common.encoding`, with :func:`token_metadata` and :func:`truncation_metadata`
  in their meta; transform copies them instead of tokenizing again when their encoding key
  equals its own;
- the validator's reports, which no other component reads.

generate_rationales writes a folder of the same shape from one: ``train.jsonl`` with the kept
examples and their rationales (``input_text``, ``output_text``, ``rationale`` string or null, and
provenance fields), the input folder's ``eval.jsonl`` as it is, and no ``tokens/``.

Readers trust the validation: :func:`read_examples` reads the records as their format lays them
out without checking them again, and fails naming the file and line on a record of another shape.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from components.common.dataset_formats import Example, normalize_format
from components.common.storage import write_text

if TYPE_CHECKING:  # the encoder imports numpy; this module imports nothing heavy
    from components.common.encoding import ExampleEncoder

TRAIN, EVAL = "train", "eval"  # the roles of the examples
TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
ROLE_FILES = {TRAIN: TRAIN_FILE, EVAL: EVAL_FILE}
TOKENS_DIR = "tokens"


class ValidatedDatasetError(ValueError):
    """A file that is not what validate_dataset writes (the message names the file and line)."""


def examples_file(folder: str | os.PathLike, role: str) -> Path | None:
    """The JSONL file of ``role`` in a validated dataset folder; None when there is none."""
    path = Path(folder) / ROLE_FILES[role]
    return path if path.is_file() else None


def token_cache(folder: str | os.PathLike, role: str) -> Path:
    """Where the validator left the token dataset of ``role`` (it may not exist)."""
    return Path(folder) / TOKENS_DIR / role


def token_metadata(encoder: ExampleEncoder) -> dict:
    """The metadata of a token dataset: what decided its bytes (the cache key)."""
    return {"dataset_format": encoder.format, "limits": encoder.limits.to_dict(),
            "encoding_key": encoder.cache_key_digest()}


def truncation_metadata(inputs: int, outputs: int, examples: int) -> dict:
    """How many inputs, outputs and examples of a token dataset were truncated."""
    return {"truncated_inputs": inputs, "truncated_outputs": outputs,
            "truncated_examples": examples}


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, JSON object)`` of every line of a validated JSONL file."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                record = json.loads(raw)
            except ValueError as error:
                raise ValidatedDatasetError(f"{path}:{number}: not a validated example "
                                            f"({error}); validate the dataset first") from None
            if not isinstance(record, dict):
                raise ValidatedDatasetError(f"{path}:{number}: not a JSON object; validate the "
                                            "dataset first")
            yield number, record


def read_examples(path: str | os.PathLike, dataset_format: str
                  ) -> Iterator[tuple[int, dict, Example]]:
    """``(line number, JSON object, Example)`` of every line of a validated JSONL file of
    ``dataset_format``; an unlabeled distillation example has ``None`` for its answer."""
    fmt = normalize_format(dataset_format)
    for number, record in read_records(path):
        try:
            yield number, record, _EXAMPLE_OF[fmt](record)
        except (KeyError, TypeError, IndexError, AttributeError):
            raise ValidatedDatasetError(f"{path}:{number}: not a validated {fmt} example; "
                                        "validate the dataset first") from None


def _text_example(record: dict) -> Example:
    return Example(None, ((record["input_text"], record.get("output_text")),))


def _pairs(texts: Sequence[str]) -> tuple[tuple[str, str], ...]:
    if len(texts) % 2:
        raise IndexError("a conversation ends with its model's answer")
    return tuple((texts[i], texts[i + 1]) for i in range(0, len(texts), 2))


def _chat_example(record: dict) -> Example:
    return Example(record.get("context"), _pairs([m["content"] for m in record["messages"]]))


def _parts_text(parts: Sequence[dict]) -> str:
    return "".join(part["text"] for part in parts)


def _gemini_example(record: dict) -> Example:
    instruction = record.get("systemInstruction")
    context = None if instruction is None else _parts_text(instruction["parts"])
    return Example(context, _pairs([_parts_text(turn["parts"]) for turn in record["contents"]]))


_EXAMPLE_OF = {"text": _text_example, "distillation": _text_example, "chat": _chat_example,
               "gemini": _gemini_example}


def write_records(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Writes records as a validated JSONL file (one object a line, UTF-8, LF), atomically."""
    write_text(str(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
