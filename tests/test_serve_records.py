"""`tunepipe serve`'s records on disk: an unreadable record is reported and set aside, and the
server starts; records are strict JSON, written durably; one server holds a home at a time."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service import records
from service.home_lock import HomeLock, HomeLockError
from service.records import RecordStore, service_dir, write_json
from service.server import ServeConfig, Service
from tests.test_serve import call

REPO = Path(__file__).resolve().parent.parent
JOBS = "projects/p/locations/us-central1/tuningJobs"


def test_unreadable_records_are_set_aside_and_the_server_starts(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))
    store = RecordStore("tuningJobs")
    good = {"name": f"{JOBS}/good", "state": "JOB_STATE_SUCCEEDED",
            "createTime": "2024-01-01T00:00:00.000000Z", "updateTime": "2024-01-01T00:00:00Z"}
    assert store.create(good, {})
    stateless = {field: value for field, value in good.items() if field != "state"}
    bad = {"empty": "", "stateless": json.dumps({**stateless, "name": f"{JOBS}/stateless"}),
           "not-an-object": "[1, 2]"}
    for job_id, text in bad.items():
        folder = store.folder(f"{JOBS}/{job_id}")
        folder.mkdir(parents=True)
        (folder / records.RECORD_FILE).write_text(text)
    with Service(ServeConfig(port=0)) as service:
        status, listed = call(service.url, "GET", f"/v1/{JOBS}")
        assert status == 200 and [job["name"] for job in listed["tuningJobs"]] == [good["name"]]
        assert call(service.url, "GET", f"/v1/{JOBS}/empty")[0] == 404
    lines = [line for line in capfd.readouterr().err.splitlines() if "unreadable" in line]
    assert len(lines) == len(bad)
    for job_id, text in bad.items():
        folder = store.folder(f"{JOBS}/{job_id}")
        (aside,) = folder.glob("record.json.unreadable-*")
        assert aside.read_text() == text and not (folder / records.RECORD_FILE).exists()
        (line,) = [line for line in lines if f"/{job_id}/record.json" in line]
        assert line.endswith(f": set aside as {aside.name}")
    assert "(JSONDecodeError: Expecting value: line 1 column 1 (char 0))" in \
        next(line for line in lines if "/empty/" in line)
    assert "(no state (a string))" in next(line for line in lines if "/stateless/" in line)


def test_records_are_strict_json_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(tmp_path / "record.json", {"learningRateMultiplier": math.inf})
    assert not list(tmp_path.iterdir())  # no temporary file is left
    steps = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: steps.append(
        "fsync folder" if Path(f"/proc/self/fd/{fd}").resolve().is_dir() else "fsync file")
        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda *paths: steps.append("rename")
                        or real_replace(*paths))
    write_json(tmp_path / "record.json", {"state": "JOB_STATE_PENDING"})
    assert steps == ["fsync file", "rename", "fsync folder"]
    assert json.loads((tmp_path / "record.json").read_text()) == {"state": "JOB_STATE_PENDING"}


HOLDER = """
import sys, time
from service.home_lock import HomeLock
HomeLock.acquire().record("http://127.0.0.1:8123")
print("held", flush=True)
time.sleep(120)
"""


def test_one_server_holds_a_home_and_a_killed_one_does_not_block(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(HomeLockError) as refused:
            HomeLock.acquire()
        assert str(refused.value) == (
            f"another tunepipe serve is running on this home (TUNEPIPE_HOME={tmp_path}): "
            f"http://127.0.0.1:8123, PID {holder.pid}; stop it first or set TUNEPIPE_HOME to "
            "another folder")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (service_dir() / "serve.json").exists()  # the stale holder file does not block
    with HomeLock.acquire() as lock:
        assert json.loads((service_dir() / "serve.json").read_text()) == \
            {"url": None, "pid": os.getpid()}
        lock.record("http://127.0.0.1:9000")
        with pytest.raises(HomeLockError, match=rf"http://127.0.0.1:9000, PID {os.getpid()};"):
            HomeLock.acquire()  # a second server in this process is refused too
    assert not (service_dir() / "serve.json").exists()
    HomeLock.acquire().release()  # free again
