"""A token dataset: tokenized examples, the format of transform's output and of the validator's
token cache (:mod:`.tokenized_dataset`, :mod:`.validated_dataset`).

A token dataset is a directory:

- ``tokens.bin``: every example's token ids, concatenated, uint32 little-endian;
- ``loss_mask.bin``: one uint8 per token, 0 for prompt tokens; every nonzero value marks a
  training target (the model is scored on predicting it from the tokens before it), and the
  value is the target's task: 1 in a single-task dataset; in a distillation dataset 1 for label
  prediction and 2 for rationale generation, the tasks its meta lists
  (:mod:`components.common.distillation_tasks`);
- ``offsets.bin``: int64 little-endian, ``num_examples + 1`` offsets into the two files above;
- ``meta.json``: counts and whatever the writer was given as metadata.

Writing streams (one example at a time, nothing held in memory) into a temporary sibling
directory that is renamed into place on close, so a crash never leaves a half-written dataset.
Reading memory-maps the files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
LOSS_MASK_FILE = "loss_mask.bin"
OFFSETS_FILE = "offsets.bin"
META_FILE = "meta.json"
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<i8")


def read_meta(directory: str | os.PathLike) -> dict | None:
    """The meta of the token dataset in ``directory``; None when there is none."""
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class TokenDatasetWriter:
    """Appends examples to a token dataset; use as a context manager."""

    def __init__(self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self._staging = self.directory.with_name(self.directory.name + ".partial")
        if self._staging.exists():
            shutil.rmtree(self._staging)
        self._staging.mkdir(parents=True)
        self._tokens = open(self._staging / TOKENS_FILE, "wb")
        self._mask = open(self._staging / LOSS_MASK_FILE, "wb")
        self._offsets = [0]
        self._num_target_tokens = 0
        self.metadata = dict(metadata or {})

    def add(self, token_ids: Sequence[int], loss_mask: Sequence[int]) -> None:
        """Appends one example: its token ids and, per token, 0 or the task of a training target."""
        if len(token_ids) != len(loss_mask):
            raise ValueError(f"{len(token_ids)} tokens but {len(loss_mask)} loss-mask entries")
        ids = np.asarray(token_ids, dtype=TOKEN_DTYPE)
        mask = np.asarray(loss_mask, dtype=np.uint8)
        self._tokens.write(ids.tobytes())
        self._mask.write(mask.tobytes())
        self._offsets.append(self._offsets[-1] + len(ids))
        self._num_target_tokens += int(np.count_nonzero(mask))

    def close(self) -> None:
        """Finishes the files and moves the dataset into place atomically."""
        self._tokens.close()
        self._mask.close()
        np.asarray(self._offsets, dtype=OFFSET_DTYPE).tofile(self._staging / OFFSETS_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "num_examples": len(self._offsets) - 1,
            "num_tokens": self._offsets[-1],
            "num_target_tokens": self._num_target_tokens,
            **self.metadata,
        }
        (self._staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if self.directory.exists():
            shutil.rmtree(self.directory)
        os.replace(self._staging, self.directory)

    def abort(self) -> None:
        """Discards everything written so far."""
        self._tokens.close()
        self._mask.close()
        shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> "TokenDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenDataset:
    """A token dataset opened for reading; ``dataset[i]`` is ``(token_ids, loss_mask)``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta = read_meta(self.directory)
        if meta is None:
            raise FileNotFoundError(f"{self.directory} is not a token dataset (no {META_FILE})")
        self.meta = meta
        self.offsets = np.fromfile(self.directory / OFFSETS_FILE, dtype=OFFSET_DTYPE)
        if self.meta["num_tokens"]:
            self.tokens = np.memmap(self.directory / TOKENS_FILE, dtype=TOKEN_DTYPE, mode="r")
            self.loss_mask = np.memmap(self.directory / LOSS_MASK_FILE, dtype=np.uint8, mode="r")
        else:
            self.tokens = np.zeros(0, dtype=TOKEN_DTYPE)
            self.loss_mask = np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return np.asarray(self.tokens[start:end]), np.asarray(self.loss_mask[start:end])

    def lengths(self) -> np.ndarray:
        """Token count of every example."""
        return np.diff(self.offsets)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for index in range(len(self)):
            yield self[index]
