"""The tune output folder (the ``tuned_model`` artifact): tune writes it, evaluate and
select_checkpoint read it. ::

    checkpoints.json                 the index (:func:`write_index`)
    checkpoints/step-000020/         a checkpoint: a tuned model folder, loadable on its own
                                     (:mod:`components.common.model_loading`)
    metrics.jsonl                    one JSON object per training log record, with its ``step``
    tensorboard/, loss_curve.png     the same records for TensorBoard, and plotted

The index lists every complete checkpoint, oldest first, as ``{"step", "dir" (relative to the
folder), "eval" (the eval metrics the tuner recorded, or null)}``, with the run's
``final_step``, ``stopped_early``, ``base_model`` and what a resumed run checks. It is written
after its checkpoint, atomically, so it only ever lists complete checkpoints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CHECKPOINTS_INDEX = "checkpoints.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE = "loss_curve.png"


def checkpoint_dir_name(step: int) -> str:
    """``checkpoints/step-000020``: a checkpoint's folder, relative to the tune output."""
    return f"{CHECKPOINTS_DIR}/step-{step:06d}"


def read_index(output_dir: str | os.PathLike) -> dict | None:
    """The index of a tune output, or None when there is none (yet)."""
    path = Path(output_dir) / CHECKPOINTS_INDEX
    return json.loads(path.read_text()) if path.exists() else None


def write_index(output_dir: str | os.PathLike, index: dict) -> None:
    """Writes the index atomically."""
    target = Path(output_dir) / CHECKPOINTS_INDEX
    staging = target.with_name(CHECKPOINTS_INDEX + ".partial")
    staging.write_text(json.dumps(index, indent=2, sort_keys=True))
    os.replace(staging, target)


def read_checkpoints(tuned_model_dir: str | os.PathLike) -> dict:
    """The index of a tune output; a lone tuned model folder (a selected or registered model)
    counts as a tune output with one checkpoint, ``"."``. ValueError for an empty index."""
    root = Path(tuned_model_dir)
    index = read_index(root)
    if index is not None:
        if not index.get("checkpoints"):
            raise ValueError(f"{root / CHECKPOINTS_INDEX} lists no checkpoints")
        return index
    from components.common.model_loading import read_tuned_model_metadata  # imports torch

    metadata = read_tuned_model_metadata(root)  # raises FileNotFoundError naming the folder
    step = metadata.get("step")
    return {"checkpoints": [{"step": step, "dir": ".", "eval": metadata.get("eval_metrics")}],
            "final_step": step, "stopped_early": False, "base_model": metadata.get("base_model")}


def final_checkpoint(tuned_model_dir: str | os.PathLike) -> Path:
    """The folder of the last checkpoint (the folder itself for a lone tuned model folder)."""
    return Path(tuned_model_dir) / read_checkpoints(tuned_model_dir)["checkpoints"][-1]["dir"]


def read_training_metrics(tuned_model_dir: str | os.PathLike) -> list[dict]:
    """The records of the training log ([] without one); lines that are not records skipped."""
    path = Path(tuned_model_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records
