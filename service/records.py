"""Resource records on disk: one folder per resource, its state in ``record.json``.

A resource named ``projects/P/locations/L/pipelineJobs/ID`` lives in
``$TUNEPIPE_HOME/service/projects/P/locations/L/pipelineJobs/ID/``: ``record.json`` is the
resource as the API answers it, written atomically (a temporary sibling, then a rename), so a
crash never leaves half a record (the file is fsynced before the rename, the folder after
it); the folder also holds what the job needs and writes (its request, log and outputs). A
restarted server reads the records back. A record that cannot be read (not JSON, or without
its name, state or createTime) is set aside as ``record.json.unreadable-<time>`` and reported
on stderr, never deleted: one bad file does not stop the server.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sys
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from components.common.paths import tunepipe_home

RECORD_FILE = "record.json"
# Project and location IDs as Vertex accepts them (letters, digits, - . _), and job IDs as
# Vertex accepts them: all safe folder names.
# Matched whole (fullmatch: "$" would take a trailing newline).
SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
JOB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")
UNREADABLE_SUFFIX = ".unreadable-"
REQUIRED_FIELDS = ("name", "state", "createTime")  # what get, list and the runner rely on


def service_dir() -> Path:
    """Where the service keeps its records: ``$TUNEPIPE_HOME/service``."""
    return tunepipe_home() / "service"


def timestamp(seconds: float | None = None) -> str:
    """A time (default: now) as the REST API writes it: RFC 3339 in UTC with microseconds."""
    moment = datetime.now(timezone.utc) if seconds is None else \
        datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_parent(parent: str) -> None:
    """ValueError unless the project and location of ``projects/P/locations/L`` are valid."""
    _, project, _, location = parent.split("/")
    for what, value in (("project", project), ("location", location)):
        if not SEGMENT.fullmatch(value):
            raise ValueError(f"{what} {value!r} is not valid: use letters, digits, '-', '.' or "
                             "'_' (at most 63, starting with a letter or digit)")


def job_name(parent: str, collection: str, job_id: str) -> str:
    """``parent/collection/job_id`` once every part is valid; ValueError naming the part that
    is not."""
    check_parent(parent)
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(f"job ID {job_id!r} is not valid: use lowercase letters, digits and "
                         "'-' (at most 128, starting with a letter or digit)")
    return f"{parent}/{collection}/{job_id}"


def write_json(path: Path, value: object) -> None:
    """Writes ``value`` to ``path`` atomically and durably: a temporary sibling, fsynced, renamed
    over ``path``, then the folder fsynced. ValueError for a NaN or infinite number (JSON has
    none: a bare ``Infinity`` would make the file unreadable to JSON parsers)."""
    text = json.dumps(value, indent=2, allow_nan=False)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json",
                                           dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_record(path: Path, name: str) -> dict:
    """The record of the resource ``name`` in ``path``; ValueError saying why it is none."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        raise ValueError(f"{type(error).__name__}: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    missing = [field for field in REQUIRED_FIELDS if not isinstance(record.get(field), str)]
    if missing:
        raise ValueError(f"no {', '.join(missing)} (a string)")
    if record["name"] != name:
        raise ValueError(f"it names {record['name']!r}, not its folder's {name!r}")
    return record


def new_job_id() -> str:
    """A job ID when the request names none: 18 digits, as Vertex numbers jobs."""
    return str(10**17 + secrets.randbelow(9 * 10**17))


class RecordStore:
    """Records of one collection (``pipelineJobs``, ``tuningJobs``) in every project and
    location; reads and updates are serialized by one lock."""

    def __init__(self, collection: str, root: Path | None = None):
        self.collection = collection
        self.root = root or service_dir()
        self._lock = threading.RLock()

    def folder(self, name: str) -> Path:
        """The folder of the resource ``name``."""
        return self.root / name

    def create(self, record: dict, files: dict[str, str]) -> bool:
        """Stores a new record, after the ``files`` (name -> text) its folder starts with;
        False when the name is taken."""
        folder = self.folder(record["name"])
        with self._lock:
            if (folder / RECORD_FILE).exists():
                return False
            folder.mkdir(parents=True, exist_ok=True)
            for file_name, text in files.items():
                (folder / file_name).write_text(text)
            self._write(record)
            return True

    def get(self, name: str) -> dict | None:
        """The record ``name``, or None (also when it was unreadable and is now set aside)."""
        path = self.folder(name) / RECORD_FILE
        with self._lock:
            return self._read(path) if path.exists() else None

    def update(self, name: str, change: Callable[[dict], None]) -> dict:
        """Applies ``change`` to the record in place, stamps ``updateTime`` and saves it."""
        with self._lock:
            record = self.get(name)
            change(record)
            record["updateTime"] = timestamp()
            self._write(record)
            return record

    def list(self, parent: str | None = None) -> list[dict]:
        """The records under ``parent`` (``projects/P/locations/L``; every one when None),
        oldest first."""
        pattern = f"{parent}/{self.collection}/*/{RECORD_FILE}" if parent else \
            f"projects/*/locations/*/{self.collection}/*/{RECORD_FILE}"
        with self._lock:
            records = [self._read(path) for path in self.root.glob(pattern)]
        return sorted((record for record in records if record),
                      key=lambda record: (record["createTime"], record["name"]))

    def _read(self, path: Path) -> dict | None:
        """The record in ``path``; None when it cannot be read, after setting it aside."""
        try:
            return read_record(path, path.parent.relative_to(self.root).as_posix())
        except ValueError as error:
            problem = str(error)
        aside = path.with_name(RECORD_FILE + UNREADABLE_SUFFIX +
                               timestamp().replace(":", "").replace("-", ""))
        try:
            os.replace(path, aside)
            outcome = f"set aside as {aside.name}"
        except OSError as error:
            outcome = f"left in place ({error})"
        print(f"tunepipe serve: unreadable record {path} ({problem}): {outcome}",
              file=sys.stderr, flush=True)
        return None

    def _write(self, record: dict) -> None:
        write_json(self.folder(record["name"]) / RECORD_FILE, record)
