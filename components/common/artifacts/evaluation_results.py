"""The evaluation results folder (the ``evaluation_results`` artifact): evaluate writes it,
select_checkpoint and upload_model read it.

- ``results.json``: ``{"evaluated": false, "reason", ...}`` without evaluation data; else every
  model's metrics: ``base`` and ``checkpoints`` (one entry per checkpoint, with its ``step``
  and ``metrics``), ``best_by_eval_loss`` and the settings they were computed with;
- ``predictions.jsonl`` (evaluated only): one row per evaluation example with every answer.

``tunepipe evaluate --output DIR`` writes a folder of the same two files.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from components.common.storage import staged_local_path

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"


def write_directory(target: str | os.PathLike, files: dict[str, str | bytes]) -> None:
    """Writes ``files`` (relative name -> content) as the directory ``target``, atomically:
    built in a temporary sibling, then renamed into place (replacing an old one)."""
    with staged_local_path(Path(target)) as staging:
        for name, content in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


def write_results(target: str | os.PathLike, results: dict, predictions: Sequence[dict]) -> None:
    """Writes an evaluation results folder atomically (predictions only when evaluated)."""
    files = {RESULTS_FILE: json.dumps(results, indent=2, sort_keys=True, default=_json_default)
             + "\n"}
    if results.get("evaluated"):
        files[PREDICTIONS_FILE] = "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                          for row in predictions)
    write_directory(target, files)


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_results(evaluation_results_dir: str | os.PathLike) -> dict | None:
    """``results.json`` of an evaluation results folder; None when there is none."""
    path = Path(evaluation_results_dir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else None
