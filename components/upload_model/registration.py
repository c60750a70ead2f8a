"""What upload_model records with a tuned model: provenance, parameters, data hash, metrics."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluation_summary(results_file: str | Path) -> dict:
    """The evaluation results (base and tuned metrics) without per-example predictions."""
    path = Path(results_file)
    if not path.exists():
        return {"evaluated": False, "reason": "no evaluation results"}
    return json.loads(path.read_text())
