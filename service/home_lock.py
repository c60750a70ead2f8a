"""One ``tunepipe serve`` per ``TUNEPIPE_HOME``: two servers on one home would fail each other's
running jobs (the restart rule), run two jobs at once and rewrite each other's records.

The server holds an exclusive ``flock`` on ``$TUNEPIPE_HOME/service/serve.lock`` for its
lifetime; ``serve.json`` beside it names the holder (PID, and its URL once bound). The kernel
releases the lock when the holder dies, even by SIGKILL, so a stale file never blocks: a lock
is free when it can be taken, whatever files exist. Use::

    lock = HomeLock.acquire()  # HomeLockError: one line naming the holder
    lock.record(url)           # once the server is bound
    lock.release()             # when it stops
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from components.common.paths import tunepipe_home
from service.records import service_dir, write_json

LOCK_FILE = "serve.lock"
HOLDER_FILE = "serve.json"


class HomeLockError(RuntimeError):
    """Another process holds the home's lock; the message names it and what to do."""


class HomeLock:
    """The held lock of this process's server on its home."""

    def __init__(self, descriptor: int, folder: Path):
        self._descriptor, self.folder = descriptor, folder

    @classmethod
    def acquire(cls) -> HomeLock:
        """Takes the home's lock (without waiting) and records this PID as its holder;
        HomeLockError naming the holder's URL and PID when another process holds it."""
        folder = service_dir()
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise HomeLockError(_refusal(folder / HOLDER_FILE)) from None
        lock = cls(descriptor, folder)
        lock.record(None)
        return lock

    def record(self, url: str | None) -> None:
        """Names this server's URL (None: not bound yet) in the holder file."""
        write_json(self.folder / HOLDER_FILE, {"url": url, "pid": os.getpid()})

    def release(self) -> None:
        """Removes the holder file and releases the lock (a second call does nothing)."""
        if self._descriptor < 0:
            return
        (self.folder / HOLDER_FILE).unlink(missing_ok=True)
        os.close(self._descriptor)  # closing the only descriptor releases the flock
        self._descriptor = -1

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _refusal(holder_file: Path) -> str:
    """The one line that names the holder (as far as its file tells)."""
    try:
        holder = json.loads(holder_file.read_text())
        where = f"{holder.get('url') or 'not listening yet'}, PID {holder['pid']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        where = f"its PID and address are not recorded in {holder_file}"
    return (f"another tunepipe serve is running on this home (TUNEPIPE_HOME={tunepipe_home()}): "
            f"{where}; stop it first or set TUNEPIPE_HOME to another folder")
