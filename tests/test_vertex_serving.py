"""The endpoint server as a Vertex AI custom serving container: AIP_* environment, over HTTP."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


HEALTH_ROUTE = "/v1/endpoints/123/deployedModels/456"
PREDICT_ROUTE = "/generate"  # a custom route, to show it is the one honoured


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def vertex_server(tuned_checkpoint, tmp_path):
    port = _free_port()
    env = {**os.environ, "AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": HEALTH_ROUTE,
           "AIP_PREDICT_ROUTE": PREDICT_ROUTE, "AIP_STORAGE_URI": str(tuned_checkpoint),
           "AIP_DEPLOYED_MODEL_ID": "456"}
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "components.deploy_endpoint.server"],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + HEALTH_ROUTE, timeout=5) as reply:
                health = json.load(reply)
            break
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not answer its health route"
            time.sleep(0.5)
    yield url, health
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_serves_under_vertex_s_custom_container_contract(vertex_server):
    url, health = vertex_server
    assert health["status"] == "ready" and health["name"] == "456"
    body = json.dumps({"instances": [{"prompt": "Where is my parcel?"}],
                       "parameters": {"maxOutputTokens": 4}}).encode()
    request = urllib.request.Request(url + PREDICT_ROUTE, body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        answer = json.load(reply)
    assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0]["content"], str)
    assert answer["deployedModelId"] == "456"


def test_the_local_mode_still_needs_its_arguments():
    done = subprocess.run([sys.executable, "-m", "components.deploy_endpoint.server"],
                          env={k: v for k, v in os.environ.items() if k != "AIP_HTTP_PORT"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unless AIP_HTTP_PORT is set" in done.stderr
