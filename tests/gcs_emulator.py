"""The ``gcs_emulator`` pytest fixture: an in-process Cloud Storage emulator.

Use it with ``pytest_plugins = ["tests.gcs_emulator"]`` in a conftest, or import the
fixture into a test module (``from tests.gcs_emulator import gcs_emulator``).

One gcp-storage-emulator server (in memory, on 127.0.0.1 and a free port) is started
the first time a test asks for the fixture and stopped when the pytest session ends.
For each test the fixture empties it (keeping the bucket) and sets
``STORAGE_EMULATOR_HOST``, which subprocesses inherit, so code under test (and the
programs it starts) talks to the emulator through the real google-cloud-storage client
and never reaches the network.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest
from gcp_storage_emulator.server import Server, create_server

BUCKET = "tunepipe-test"

_server: tuple[Server, str] | None = None


@dataclass(frozen=True)
class GcsEmulator:
    host: str  # the value of STORAGE_EMULATOR_HOST, e.g. http://127.0.0.1:41234
    bucket: str  # an existing, empty bucket

    def uri(self, key: str = "") -> str:
        """``gs://BUCKET/key`` in the test bucket."""
        return f"gs://{self.bucket}/{key}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _started_server(config: pytest.Config) -> tuple[Server, str]:
    global _server
    if _server is None:
        port = _free_port()
        server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        server.start()
        _server = (server, f"http://127.0.0.1:{port}")

        def stop() -> None:
            global _server
            server.stop()
            _server = None

        config.add_cleanup(stop)
    return _server


@pytest.fixture
def gcs_emulator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> GcsEmulator:
    """An empty emulated bucket, with STORAGE_EMULATOR_HOST pointing at it."""
    server, host = _started_server(request.config)
    server.wipe(keep_buckets=True)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
    return GcsEmulator(host=host, bucket=BUCKET)
