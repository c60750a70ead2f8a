"""The tokenized dataset folder: transform writes it, tune and evaluate read it.

It holds one token dataset (:mod:`.token_dataset`) per role of the validated dataset it was
made from: ``train/`` always, ``eval/`` with evaluation data (:func:`split_dir`). transform
writes the folder atomically (built in a temporary sibling, renamed into place).
"""
from __future__ import annotations

import os
from pathlib import Path

from components.common.artifacts.validated_dataset import EVAL, TRAIN

SPLITS = (TRAIN, EVAL)


def split_dir(folder: str | os.PathLike, split: str) -> Path:
    """The token dataset of ``split`` (train or eval) in a tokenized dataset folder."""
    return Path(folder) / split


def train_dir(folder: str | os.PathLike) -> Path:
    """The training token dataset."""
    return split_dir(folder, TRAIN)


def eval_dir(folder: str | os.PathLike) -> Path | None:
    """The evaluation token dataset; None when the folder has no evaluation data."""
    path = split_dir(folder, EVAL)
    return path if path.is_dir() else None
