"""What upload_model records with a tuned model: provenance, parameters, data hash, metrics."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from components.common.artifacts.evaluation_results import read_results
from components.common.artifacts.validated_dataset import TRAIN_FILE


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_sha256(validated_dataset_dir: str | os.PathLike) -> str:
    """Hex SHA-256 of a validated dataset's training examples."""
    return file_sha256(Path(validated_dataset_dir) / TRAIN_FILE)


def evaluation_summary(evaluation_results_dir: str | os.PathLike) -> dict:
    """The evaluation results (base and tuned metrics) without per-example predictions."""
    results = read_results(evaluation_results_dir)
    return results if results is not None else {"evaluated": False,
                                                "reason": "no evaluation results"}
