"""The teacher's answers as they arrive: an append-only JSONL file that makes a task resumable.

Every answer is appended as one line the moment it arrives, flushed and fsynced::

    {"key": "12:answer", "fingerprint": "3f9c...", "text": "...", "prompt_tokens": 210,
     "completion_tokens": 48, "seconds": 1.9, "attempts": 1}

A killed or retried task opens the same file and reuses every answer whose key (example index
and request kind) and fingerprint (teacher, settings and the full prompt, input included) match
a request it still has to make; the teacher is not asked again. A line cut short by a kill (the
last one) is dropped; answers for other fingerprints (the data, prompt or teacher changed) are
ignored and counted as stale.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Completion:
    """One answer of the teacher; token counts are None where the backend reports none."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0
    attempts: int = 1


class CallLog:
    """The log file: answers already there (``completed``) and appending new ones."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, tuple[str, Completion]] = {}
        self._lock = threading.Lock()
        self._read_existing()

    def _read_existing(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]  # a torn last line (a kill mid-write) goes
        if len(complete) != len(data):
            with open(self.path, "r+b") as file:
                file.truncate(len(complete))
        for line in complete.decode("utf-8").splitlines():
            record = json.loads(line)
            key, fingerprint = record.pop("key"), record.pop("fingerprint")
            self._entries[key] = (fingerprint, Completion(**record))

    def completed(self, key: str, fingerprint: str) -> Completion | None:
        """The logged answer for this key and fingerprint, or None."""
        entry = self._entries.get(key)
        return entry[1] if entry and entry[0] == fingerprint else None

    def stale_count(self, current: dict[str, str]) -> int:
        """Logged answers whose fingerprint differs from ``current`` (key -> fingerprint)."""
        return sum(1 for key, (fingerprint, _) in self._entries.items()
                   if current.get(key) != fingerprint)

    def append(self, key: str, fingerprint: str, completion: Completion) -> None:
        """Adds an answer to the file (flushed and fsynced before returning); thread-safe."""
        line = json.dumps({"key": key, "fingerprint": fingerprint, **asdict(completion)},
                          ensure_ascii=False) + "\n"
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(line)
                file.flush()
                os.fsync(file.fileno())
            self._entries[key] = (fingerprint, completion)
