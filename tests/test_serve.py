"""`tunepipe serve`: the HTTP skeleton (routes, Google-shaped errors, token, body limit), job
records and the restart rule, and pipelineJobs end to end: the real google-cloud-aiplatform
SDK submits a tune-large-model job on a tiny model and waits for it; the seed's request body
is created and cancelled over plain HTTP."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.home_lock import HomeLockError
from service.records import RecordStore, service_dir
from service.server import ServeConfig, Service

REPO = Path(__file__).resolve().parent.parent
SEED_REQUEST = REPO / "tests" / "seeds" / "001_70d06e170e6fa02c_request.json"
PARENT = "/v1/projects/my-project/locations/us-central1"


def call(url: str, method: str, path: str, body: dict | bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    """``(HTTP status, decoded JSON reply)`` of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for_state(url: str, name: str, states: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, job = call(url, "GET", f"/v1/{name}")
        assert status == 200, job
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server on a free port; the test session's temporary folders are an allowed root."""
    with Service(ServeConfig(port=0, allow_roots=[str(tmp_path_factory.getbasetemp())])) as running:
        yield running


@pytest.mark.parametrize("method, path, body, code, status, message", [
    ("GET", "/v2/projects/p/locations/l/pipelineJobs", None, 404, "NOT_FOUND", "no such path"),
    ("DELETE", f"{PARENT}/pipelineJobs", None, 405, "UNIMPLEMENTED", "takes GET or POST"),
    ("POST", f"{PARENT}/pipelineJobs", b'{"displayName": ', 400, "INVALID_ARGUMENT",
     "the request body is not valid JSON: Expecting value: line 1 column 17"),
    ("POST", f"{PARENT}/pipelineJobs", b"[1]", 400, "INVALID_ARGUMENT",
     "the request body must be a JSON object, not list"),
    ("POST", f"{PARENT}/pipelineJobs", {"templateUri": "tune-large-model", "displayname": "x"},
     400, "INVALID_ARGUMENT", "unknown request fields ['displayname']"),
    ("POST", f"{PARENT}/pipelineJobs?pipelineJobID=x", {}, 400, "INVALID_ARGUMENT",
     "unknown query parameters ['pipelineJobID']; this call takes ['pipelineJobId']"),
    ("POST", f"{PARENT}/pipelineJobs?pipelineJobId=Bad_Id", {"templateUri": "tune-large-model"},
     400, "INVALID_ARGUMENT", "job ID 'Bad_Id' is not valid"),
    ("GET", f"{PARENT}/pipelineJobs/nope", None, 404, "NOT_FOUND",
     "pipelineJob projects/my-project/locations/us-central1/pipelineJobs/nope not found"),
    ("GET", "/v1beta1/projects/p/locations/l/pipelineJobs/..", None, 400, "INVALID_ARGUMENT",
     "job ID '..' is not valid"),
    ("POST", f"{PARENT}/pipelineJobs", {"templateUri": "/etc/tune-large-model.yaml"}, 400,
     "INVALID_ARGUMENT", "Unknown pipeline template"),
    ("POST", f"{PARENT}/pipelineJobs",
     {"pipelineSpec": {"pipelineInfo": {"name": "tune-large-model"}, "deploymentSpec": {}}},
     400, "INVALID_ARGUMENT", "pipelineSpec differs from compiled/tune-large-model.yaml and "
     "compiled/vertex/tune-large-model.yaml"),
])
def test_refusals_are_answered_in_google_s_shape(service, method, path, body, code, status,
                                                 message):
    got, reply = call(service.url, method, path, body)
    assert got == code and set(reply) == {"error"}, reply
    assert reply["error"]["code"] == code and reply["error"]["status"] == status
    assert message in reply["error"]["message"], reply


def test_paths_outside_the_allowed_roots_are_refused_before_any_check(service):
    body = {"templateUri": "tune-large-model",
            "runtimeConfig": {"gcsOutputDirectory": "/etc/out",
                              "parameterValues": {"dataset_uri": "/etc/passwd",
                                                  "large_model_reference": "file:///m"}}}
    status, reply = call(service.url, "POST", f"{PARENT}/pipelineJobs", body)
    assert status == 400
    lines = reply["error"]["message"].splitlines()
    assert lines[0].startswith("dataset_uri '/etc/passwd' is outside the folders this server "
                               "may read and write")
    assert lines[1].startswith("large_model_reference 'file:///m': only gs:// URIs and local "
                               "paths are accepted")
    assert lines[2].startswith("runtimeConfig.gcsOutputDirectory '/etc/out' is outside")
    assert not RecordStore("pipelineJobs").list()


def test_body_limit_and_bearer_token(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))  # a home of its own: one server a home
    config = ServeConfig(port=0, token="s3cret-token", max_body_bytes=64)
    with Service(config) as guarded:
        jobs = f"{guarded.url}{PARENT}/pipelineJobs"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            status, reply = call(guarded.url, "GET", f"{PARENT}/pipelineJobs", headers=headers)
            assert status == 401 and reply["error"]["status"] == "UNAUTHENTICATED", headers
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(jobs)
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
        token = {"Authorization": "Bearer s3cret-token"}
        assert call(guarded.url, "GET", f"{PARENT}/pipelineJobs", headers=token) == \
            (200, {"pipelineJobs": []})
        status, reply = call(guarded.url, "POST", f"{PARENT}/pipelineJobs", b"x" * 65, token)
        assert status == 413
        assert reply["error"]["message"] == ("the request body has 65 bytes; the limit is 64 "
                                             "(tunepipe serve --max-body-bytes)")


def test_binding_beyond_loopback_needs_a_token(monkeypatch):
    monkeypatch.delenv("TUNEPIPE_SERVE_TOKEN", raising=False)
    with pytest.raises(ValueError, match="binding 0.0.0.0 opens the API to other machines"):
        Service(ServeConfig(host="0.0.0.0", port=0))


def test_serve_prints_its_url_and_stops_cleanly_on_ctrl_c(tmp_path):
    # PYTHONFAULTHANDLER: a server that does not stop is sent SIGABRT, which prints every
    # thread's stack into this test's captured stderr, to show where it hangs.
    env = {**os.environ, "TUNEPIPE_HOME": str(tmp_path), "PYTHONFAULTHANDLER": "1"}
    # Started as from a terminal, with Ctrl-C's default action: a test run launched in the
    # background by a script inherits SIGINT ignored, and Python keeps an inherited ignore.
    process = subprocess.Popen([sys.executable, "-m", "command", "serve", "--port", "0"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ready = process.stdout.readline()
        assert ready.startswith("tunepipe serve: listening on http://127.0.0.1:"), ready
        url = ready.split()[-1]
        assert call(url, "GET", f"{PARENT}/pipelineJobs") == (200, {"pipelineJobs": []})
        process.send_signal(signal.SIGINT)
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            process.wait(timeout=10)
            pytest.fail("tunepipe serve did not stop within 30 s of SIGINT: its threads' stacks "
                        "are in the captured stderr")
        assert status == 0
        assert process.stdout.read().splitlines()[-1] == "tunepipe serve: stopped"
    finally:
        if process.poll() is None:
            process.kill()


def test_a_restarted_server_fails_the_running_job_and_queues_the_pending_one(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))
    store = RecordStore("pipelineJobs")
    jobs = "projects/p/locations/us-central1/pipelineJobs"
    for job_id, state, files in (("was-running", "RUNNING", {}),
                                 ("was-pending", "PENDING", {"request.json": "{}"})):
        record = {"name": f"{jobs}/{job_id}", "displayName": job_id,
                  "createTime": "2024-01-01T00:00:00.000000Z",
                  "updateTime": "2024-01-01T00:00:00.000000Z", "state": f"PIPELINE_STATE_{state}"}
        assert store.create(record, files)
        assert not store.create(record, files)  # a name is taken once
    with Service(ServeConfig(port=0)) as restarted:
        pending = wait_for_state(restarted.url, f"{jobs}/was-pending", {"PIPELINE_STATE_FAILED"})
        running = call(restarted.url, "GET", f"/v1/{jobs}/was-running")[1]
    assert running["state"] == "PIPELINE_STATE_FAILED" and running["error"]["code"] == 10
    assert running["error"]["message"].startswith("the server stopped while the job ran")
    assert running["endTime"] >= running["createTime"]
    assert [p.name for p in (service_dir() / running["name"]).iterdir()] == ["record.json"]
    assert pending["state"] == "PIPELINE_STATE_FAILED" and pending["error"] == {
        "code": 3, "message": f"{service_dir() / jobs}/was-pending/request.json: no templateUri "
                              "or pipelineSpec; name the pipeline on the command line"}


def _job_processes(folder: Path) -> list[int]:
    """The process IDs of the job process running the job in ``folder``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service.jobs" in arguments and str(folder).encode() in arguments:
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_a_job_ends_with_its_server_and_the_restart_marks_it_failed(
        tmp_path, monkeypatch, sample_dir, tiny_model_dir):
    """The server is killed (no chance to clean up) while a job runs: the job's process ends
    itself, and the next server marks the job FAILED."""
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))
    process = subprocess.Popen(
        [sys.executable, "-m", "command", "serve", "--port", "0",
         "--allow-root", str(tiny_model_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().split()[-1]
        status, job = call(url, "POST", f"{PARENT}/pipelineJobs?pipelineJobId=killed",
                           _seed_body(sample_dir, tiny_model_dir))
        assert status == 200, job
        assert wait_for_state(url, job["name"], {"PIPELINE_STATE_RUNNING"})["state"] == \
            "PIPELINE_STATE_RUNNING"
        folder = service_dir() / job["name"]
        (job_process,) = _job_processes(folder)
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 30
    while _job_processes(folder) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _job_processes(folder), "the job's process outlived its server"
    with Service(ServeConfig(port=0)) as restarted:
        job = call(restarted.url, "GET", f"/v1/{job['name']}")[1]
    assert job["state"] == "PIPELINE_STATE_FAILED"
    assert job["error"]["message"].startswith("the server stopped while the job ran")


def _seed_body(sample_dir: Path, tiny_model_dir: Path) -> dict:
    """The seed's body with its typo fixed and its gs:// dataset and model made local."""
    body = json.loads(SEED_REQUEST.read_text())
    values = body["runtimeConfig"]["parameterValues"]
    values["accelerator_type"] = values.pop("accelerator_type:")
    values.update(dataset_uri=str(sample_dir / "support_intents_train.jsonl"),
                  large_model_reference=str(tiny_model_dir), model_display_name="seed-job")
    return body


def test_the_seed_body_is_checked_created_and_cancelled(service, sample_dir, tiny_model_dir):
    """As the seed's curl command sends it: its own typo is named; fixed, it is queued and
    cancelled (whether it had started or not)."""
    jobs = f"{PARENT}/pipelineJobs?pipelineJobId=tune-large-model-20240101000000"
    status, reply = call(service.url, "POST", jobs, json.loads(SEED_REQUEST.read_text()))
    assert status == 400
    assert "unknown parameter 'accelerator_type:' (did you mean 'accelerator_type'?)" in \
        reply["error"]["message"]
    status, job = call(service.url, "POST", jobs, _seed_body(sample_dir, tiny_model_dir))
    assert status == 200, job
    name = "projects/my-project/locations/us-central1/pipelineJobs/tune-large-model-20240101000000"
    assert job["name"] == name and job["state"] == "PIPELINE_STATE_PENDING"
    assert job["displayName"] == "tune-llm" and job["pipelineSpec"]["pipelineInfo"]["name"] == \
        "tune-large-model"
    assert job["encryptionSpec"]["kmsKeyName"].endswith("cryptoKeys/sample-key")
    assert call(service.url, "POST", jobs, _seed_body(sample_dir, tiny_model_dir))[0] == 409
    assert call(service.url, "POST", f"/v1/{name}:cancel") == (200, {})
    job = wait_for_state(service.url, name, {"PIPELINE_STATE_CANCELLED"})
    assert job["state"] == "PIPELINE_STATE_CANCELLED" and job["error"]["code"] == 1
    status, reply = call(service.url, "POST", f"/v1/{name}:cancel")
    assert status == 400 and reply["error"]["status"] == "FAILED_PRECONDITION"
    log = (service_dir() / name / "log.txt").read_text()
    assert ("note: gcsOutputDirectory gs://my-gcs-bucket-uri/output is for cloud runs; the local "
            f"runner writes its outputs under {service_dir() / name / 'outputs'}/") in log


def test_the_sdk_submits_a_pipeline_job_and_waits_for_it(service, sample_dir, tiny_model_dir,
                                                         tmp_path, monkeypatch):
    """PipelineJob(...).submit() and .wait() against the server: the local runner tunes the
    tiny model, registers it and deploys its endpoint; a restarted server lists the job."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform
    from google.cloud.aiplatform import pipeline_jobs

    from components.common.model_registry import get_model
    from components.deploy_endpoint.endpoints import get_endpoint, stop_endpoint

    monkeypatch.setattr(pipeline_jobs, "_JOB_WAIT_TIME", 0.5)
    aiplatform.init(project="my-project", location="us-central1", api_endpoint=service.url,
                    api_transport="rest", credentials=AnonymousCredentials())
    job = aiplatform.PipelineJob(
        display_name="tiny-sdk-job",
        template_path=str(REPO / "compiled" / "vertex" / "tune-large-model.yaml"),
        pipeline_root=str(tmp_path / "root"), job_id="tiny-sdk-job",
        parameter_values={"project": "my-project", "model_display_name": "tiny-sdk",
                          "dataset_uri": str(sample_dir / "support_intents_train.jsonl"),
                          "large_model_reference": str(tiny_model_dir), "train_steps": 2})
    job.submit()
    assert job.resource_name == \
        "projects/my-project/locations/us-central1/pipelineJobs/tiny-sdk-job"
    try:
        job.wait()
        assert job.state.name == "PIPELINE_STATE_SUCCEEDED"
        assert job.gca_resource.start_time and job.gca_resource.end_time
        assert get_model("tiny-sdk").version == 1
        assert get_endpoint("tiny-sdk").model_dir == str(get_model("tiny-sdk").path)
        assert any(p.name.startswith("tune-large-model") for p in (tmp_path / "root").iterdir())
        assert ("note: pipelineSpec is compiled/vertex/tune-large-model.yaml: it runs here as "
                "compiled/tune-large-model.yaml") in (service_dir() / job.resource_name / "log.txt").read_text()
    finally:
        stop_endpoint("tiny-sdk", missing_ok=True)
    listed = aiplatform.PipelineJob.list()
    assert "tiny-sdk-job" in [j.name for j in listed]
    record = service_dir() / job.resource_name / "record.json"
    home = tmp_path / "restarted-home"  # this home is the running server's
    (home / "service" / job.resource_name).mkdir(parents=True)
    shutil.copy(record, home / "service" / job.resource_name / "record.json")
    monkeypatch.setenv("TUNEPIPE_HOME", str(home))
    with Service(ServeConfig(port=0)) as restarted:
        status, reply = call(restarted.url, "GET", f"/v1/{job.resource_name}")
    assert status == 200 and reply["state"] == "PIPELINE_STATE_SUCCEEDED"


def test_a_second_server_on_one_home_refuses_to_start(service, tmp_path):
    with pytest.raises(HomeLockError) as refused:
        Service(ServeConfig(port=0))
    assert str(refused.value).startswith("another tunepipe serve is running on this home")
    assert f": {service.url}, PID {os.getpid()}; stop it first" in str(refused.value)
    second = subprocess.run([sys.executable, "-m", "command", "serve", "--port", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr.splitlines() == [f"tunepipe serve: {refused.value}"]
