"""The validated dataset folder: the contract between validate_dataset, which writes it, and
transform and evaluate, which read it.

validate_dataset writes the folder atomically, and only for a valid dataset:

- ``train.jsonl`` and ``eval.jsonl`` (:data:`TRAIN_FILE`, :data:`EVAL_FILE`; ``eval.jsonl`` only
  with evaluation data): the valid examples, one JSON object per line exactly as given (UTF-8,
  LF, no BOM, no blank lines); transform tokenizes both, evaluate reads ``eval.jsonl``;
- ``tokens/train`` and ``tokens/eval`` (:data:`TOKENS_DIR`): the examples as token datasets
  (:mod:`components.common.token_dataset`), encoded by :mod:`components.common.encoding`, with
  :func:`token_metadata` and :func:`truncation_metadata` in their meta; transform copies them
  instead of tokenizing again when their encoding key equals its own;
- the validator's reports (``report.json``, ``report.md``, ``histogram.png``), which no other
  component reads.

generate_rationales writes a folder of the same shape from one: ``train.jsonl`` with the kept
examples and their rationales (``input_text``, ``output_text``, ``rationale`` string or null, and
provenance fields), the input folder's ``eval.jsonl`` as it is, and no ``tokens/``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the encoder imports numpy; this module imports nothing heavy
    from components.common.encoding import ExampleEncoder

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
TOKENS_DIR = "tokens"


def token_metadata(encoder: ExampleEncoder) -> dict:
    """The metadata of a token dataset: what decided its bytes (the cache key)."""
    return {"dataset_format": encoder.format, "limits": encoder.limits.to_dict(),
            "encoding_key": encoder.cache_key_digest()}


def truncation_metadata(inputs: int, outputs: int, examples: int) -> dict:
    """How many inputs, outputs and examples of a token dataset were truncated."""
    return {"truncated_inputs": inputs, "truncated_outputs": outputs,
            "truncated_examples": examples}
