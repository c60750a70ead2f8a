"""`tunepipe serve`: tuningJobs, Gemini supervised tuning (seed 004). The real Vertex SDK tunes a
tiny model (``vertexai.tuning.sft.train``, ``.refresh()``) and prompts the tuned endpoint
(``GenerativeModel.generate_content``); seed 004's request body is created and cancelled over
plain HTTP, its datasets in a Cloud Storage emulator; refusals; records that survive a restart."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from service.records import RecordStore, service_dir
from service.server import ServeConfig, Service
from tests.test_serve import call, wait_for_state

REPO = Path(__file__).resolve().parent.parent
SEED_REQUEST = REPO / "tests" / "seeds" / "004_9f6935d0f6ff2f85_request.json"
PARENT = "projects/my-project/locations/us-central1"
JOBS = f"/v1/{PARENT}/tuningJobs"
TRAIN_EXAMPLES, VALIDATION_EXAMPLES = 12, 10


def gemini_example(number: int) -> dict:
    """One Gemini-format example; every third has a system instruction."""
    example = {"contents": [
        {"role": "user", "parts": [{"text": f"Where is parcel {number}?"}]},
        {"role": "model", "parts": [{"text": f"Parcel {number} ships in {number % 5 + 1} "},
                                    {"text": "days."}]}]}
    if number % 3 == 0:
        example["systemInstruction"] = {"role": "system", "parts": [{"text": "Be brief."}]}
    return example


@pytest.fixture(scope="module")
def gemini_data(tmp_path_factory) -> tuple[Path, Path]:
    """Gemini-format training (12 examples) and validation (10) files."""
    folder = tmp_path_factory.mktemp("gemini-data")
    files = (folder / "train.jsonl", folder / "validation.jsonl")
    for path, numbers in zip(files, (range(TRAIN_EXAMPLES), range(100, 100 + VALIDATION_EXAMPLES))):
        path.write_text("".join(json.dumps(gemini_example(n)) + "\n" for n in numbers))
    return files


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server on a free port; the test session's temporary folders are an allowed root."""
    with Service(ServeConfig(port=0, allow_roots=[str(tmp_path_factory.getbasetemp())])) as running:
        yield running


def _body(train: Path, model: str = "gemini-1.0-pro-002") -> dict:
    return {"baseModel": model, "supervisedTuningSpec": {
        "trainingDatasetUri": str(train), "hyperParameters": {"epochCount": "1"}}}


def _hyper(body: dict) -> dict:
    return body["supervisedTuningSpec"]["hyperParameters"]


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(epochs=3), "unknown fields in the request: ['epochs']"),
    (lambda b: b.update(distillationSpec={}),
     "unknown fields in the request: ['distillationSpec']"),
    (lambda b: _hyper(b).update(batchSize=4),
     "unknown fields in supervisedTuningSpec.hyperParameters: ['batchSize']"),
    (lambda b: _hyper(b).update(epoch_count=2),
     "supervisedTuningSpec.hyperParameters names the field epochCount twice"),
    (lambda b: _hyper(b).update(adapterSize=99),
     "supervisedTuningSpec.hyperParameters.adapterSize: 99 is not one of ADAPTER_SIZE_UNSPECIFIED"),
    (lambda b: _hyper(b).update(adapterSize="ADAPTER_SIZE_HUGE"), "'ADAPTER_SIZE_HUGE' is not one"),
    (lambda b: _hyper(b).update(adapterSize="ADAPTER_SIZE_THIRTY_TWO"),
     "supervisedTuningSpec.hyperParameters.adapterSize: adapter size must be one of (1, 4, 8, 16)"),
    (lambda b: _hyper(b).update(epochCount="three"),
     "supervisedTuningSpec.hyperParameters.epochCount must be an integer (int64), not 'three'"),
    (lambda b: _hyper(b).update(epochCount=0),
     "epochCount must be an integer from 1 to 100, not 0"),
    (lambda b: _hyper(b).update(learningRateMultiplier=-1),
     "learningRateMultiplier must be a number above 0 and at most 100, not -1.0"),
    (lambda b: b["supervisedTuningSpec"].update(tuningMode=7),
     "supervisedTuningSpec.tuningMode: 7"),
    (lambda b: b["supervisedTuningSpec"].pop("trainingDatasetUri"),
     "supervisedTuningSpec.trainingDatasetUri is required"),
    (lambda b: b["supervisedTuningSpec"].update(trainingDatasetUri="/etc/passwd"),
     "supervisedTuningSpec.trainingDatasetUri '/etc/passwd' is outside the folders this server"),
    (lambda b: b["supervisedTuningSpec"].update(validationDatasetUri="file:///data.jsonl"),
     "supervisedTuningSpec.validationDatasetUri 'file:///data.jsonl': only gs:// URIs and local"),
    (lambda b: b.update(baseModel="gemini-9-ultra"),
     "baseModel: Unknown model reference 'gemini-9-ultra'"),
    (lambda b: b.update(baseModel="/opt/models/gemini"),
     "baseModel '/opt/models/gemini' is outside"),
    (lambda b: b.pop("supervisedTuningSpec"), "supervisedTuningSpec is required"),
])
def test_bad_requests_are_refused_naming_the_field(service, gemini_data, change, message):
    body = _body(gemini_data[0])
    change(body)
    before = len(RecordStore("tuningJobs").list())
    status, reply = call(service.url, "POST", JOBS, body)
    assert status == 400 and reply["error"]["status"] == "INVALID_ARGUMENT", reply
    assert message in reply["error"]["message"], reply
    assert len(RecordStore("tuningJobs").list()) == before


def test_a_missing_dataset_and_an_unknown_job_are_named(service, gemini_data):
    body = _body(gemini_data[0])
    body["supervisedTuningSpec"]["validationDatasetUri"] = str(gemini_data[0].parent / "nope.jsonl")
    status, reply = call(service.url, "POST", JOBS.replace("/v1/", "/v1beta1/"), body)
    assert status == 400 and reply["error"]["message"] == (
        f"supervisedTuningSpec.validationDatasetUri '{gemini_data[0].parent / 'nope.jsonl'}' "
        "does not exist")
    status, reply = call(service.url, "GET", f"{JOBS}/nope")
    assert status == 404
    assert reply["error"]["message"] == f"tuningJob {PARENT}/tuningJobs/nope not found"


def test_the_seed_body_is_created_and_cancelled(service, gemini_data, gcs_emulator,
                                                embedded_checkpoint):
    """Seed 004's curl body as it is (snake_case dataset fields, gemini-1.5-pro-002), its
    datasets in the emulated bucket it names; cancelled whether it had started or not (the
    embedded model is converted already, so a cancelled job leaves no half conversion)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="local", credentials=AnonymousCredentials())
    bucket = client.lookup_bucket("cloud-samples-data") or client.create_bucket(
        "cloud-samples-data")
    for path, name in zip(gemini_data, ("sft_train_data.jsonl", "sft_validation_data.jsonl")):
        bucket.blob(f"ai-platform/generative_ai/{name}").upload_from_filename(str(path))
    status, job = call(service.url, "POST", JOBS, json.loads(SEED_REQUEST.read_text()))
    assert status == 200, job
    assert job["name"].startswith(f"{PARENT}/tuningJobs/") and job["state"] == "JOB_STATE_PENDING"
    assert job["baseModel"] == "gemini-1.5-pro-002" and job["tunedModelDisplayName"] == \
        "tuned_gemini_pro"
    samples = "gs://cloud-samples-data/ai-platform/generative_ai"
    assert job["supervisedTuningSpec"] == {
        "trainingDatasetUri": f"{samples}/sft_train_data.jsonl",
        "validationDatasetUri": f"{samples}/sft_validation_data.jsonl",
        "hyperParameters": {"epochCount": "3", "adapterSize": "ADAPTER_SIZE_EIGHT",
                            "learningRateMultiplier": 1.0}}
    assert call(service.url, "POST", f"/v1/{job['name']}:cancel") == (200, {})
    job = wait_for_state(service.url, job["name"], {"JOB_STATE_CANCELLED"})
    assert job["state"] == "JOB_STATE_CANCELLED" and job["error"]["code"] == 1
    status, reply = call(service.url, "POST", f"/v1/{job['name']}:cancel")
    assert status == 400 and reply["error"]["status"] == "FAILED_PRECONDITION"
    assert "tunedModel" not in job


def test_the_sdk_tunes_a_model_and_prompts_its_endpoint(service, gemini_data, tiny_model_dir,
                                                        tmp_path, monkeypatch):
    """sft.train() with every hyperparameter, polled with refresh() until it ends; the tuned
    model and endpoint it names answer through the models, endpoints and generateContent
    routes; the job is listed, and a restarted server still answers it."""
    import vertexai
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform
    from vertexai.generative_models import GenerationConfig, GenerativeModel
    from vertexai.tuning import sft

    from components.deploy_endpoint.endpoints import stop_endpoint
    from service.models import resource_id

    vertexai.init(project="my-project", location="us-central1", api_endpoint=service.url,
                  api_transport="rest", credentials=AnonymousCredentials())
    train, validation = gemini_data
    job = sft.train(source_model=str(tiny_model_dir), train_dataset=str(train),
                    validation_dataset=str(validation), epochs=1, adapter_size=4,
                    learning_rate_multiplier=2.0, tuned_model_display_name="tiny gemini: tuned")
    registered = "tiny gemini- tuned"  # the registry's name for the display name
    try:
        deadline = time.monotonic() + 180
        while not job.has_ended and time.monotonic() < deadline:
            time.sleep(0.5)
            job.refresh()
        log = (service_dir() / job.resource_name / "log.txt").read_text()
        assert job.state.name == "JOB_STATE_SUCCEEDED", f"{job.error}\n{log[-3000:]}"
        hyper = job.gca_resource.supervised_tuning_spec.hyper_parameters
        assert (hyper.epoch_count, hyper.adapter_size.name, hyper.learning_rate_multiplier) == \
            (1, "ADAPTER_SIZE_FOUR", 2.0)
        stats = job.tuning_data_statistics.supervised_tuning_data_stats
        assert stats.tuning_dataset_example_count == TRAIN_EXAMPLES
        assert stats.tuning_step_count == math.ceil(1 * TRAIN_EXAMPLES / 8)  # batch size 8
        assert job.tuned_model_name == f"{PARENT}/models/{resource_id(registered)}@1"
        assert job.tuned_model_endpoint_name == f"{PARENT}/endpoints/{resource_id(registered)}"
        model = aiplatform.Model(job.tuned_model_name)
        assert model.display_name == registered and model.version_id == "1"
        metadata = json.loads((Path(model.gca_resource.artifact_uri) /
                               "tunepipe_model.json").read_text())
        assert metadata["adapter_size"] == 4 and metadata["step"] == stats.tuning_step_count

        again = sft.SupervisedTuningJob(job.resource_name)  # as seed 004's Python example
        tuned = GenerativeModel(again.tuned_model_endpoint_name)
        response = tuned.generate_content(
            "Where is parcel 3?", generation_config=GenerationConfig(temperature=0.0,
                                                                     max_output_tokens=3))
        assert isinstance(response.candidates[0].content.parts[0].text, str)
        assert 0 < response.usage_metadata.candidates_token_count <= 3
        listed = sft.SupervisedTuningJob.list()
        assert job.resource_name in [other.resource_name for other in listed]
    finally:
        stop_endpoint(registered, missing_ok=True)
    # One server per home: the restarted one reads a copy of the record in a home of its own.
    shutil.copytree(service_dir() / job.resource_name, tmp_path / "service" / job.resource_name)
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))
    with Service(ServeConfig(port=0)) as restarted:
        status, reply = call(restarted.url, "GET", f"/v1beta1/{job.resource_name}")
    assert status == 200 and reply["state"] == "JOB_STATE_SUCCEEDED"
    assert reply["tunedModel"] == {"model": job.tuned_model_name,
                                   "endpoint": job.tuned_model_endpoint_name}


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_a_job_cancelled_while_it_deploys_leaves_no_endpoint(service, gemini_data,
                                                             tiny_model_dir):
    """The endpoint is recorded as soon as its process exists, while it starts; cancelling the
    job then stops it and removes its record: no endpoint process is left unlisted."""
    from components.common.paths import endpoints_dir
    from components.deploy_endpoint.endpoints import list_endpoints

    body = {**_body(gemini_data[0], str(tiny_model_dir)), "tunedModelDisplayName": "cancelled"}
    status, job = call(service.url, "POST", JOBS, body)
    assert status == 200, job
    record = endpoints_dir() / "cancelled.json"
    deadline = time.monotonic() + 240
    while not record.exists() and time.monotonic() < deadline:
        job = call(service.url, "GET", f"/v1/{job['name']}")[1]
        assert job["state"] in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING"), job
        time.sleep(0.05)
    starting = json.loads(record.read_text())
    assert starting["url"] == "" and _running(starting["pid"]), starting  # not ready yet
    assert "cancelled" in [endpoint.name for endpoint in list_endpoints()]
    assert call(service.url, "POST", f"/v1/{job['name']}:cancel") == (200, {})
    job = wait_for_state(service.url, job["name"], {"JOB_STATE_CANCELLED", "JOB_STATE_FAILED",
                                                    "JOB_STATE_SUCCEEDED"})
    assert job["state"] == "JOB_STATE_CANCELLED", job
    assert not _running(starting["pid"]) and not record.exists()
    assert "cancelled" not in [endpoint.name for endpoint in list_endpoints()]


def test_a_restarted_server_lists_old_jobs_and_fails_the_running_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))
    store = RecordStore("tuningJobs")
    jobs = "projects/p/locations/us-central1/tuningJobs"
    for job_id, state, created in (("1", "SUCCEEDED", "2024-01-01"),
                                   ("2", "RUNNING", "2024-01-02")):
        assert store.create({"name": f"{jobs}/{job_id}", "baseModel": "gemini-1.0-pro-002",
                             "createTime": f"{created}T00:00:00.000000Z",
                             "updateTime": f"{created}T00:00:00.000000Z",
                             "state": f"JOB_STATE_{state}"}, {})
    with Service(ServeConfig(port=0)) as restarted:
        status, listed = call(restarted.url, "GET", f"/v1/{jobs}?pageSize=1")
        assert status == 200 and [j["name"] for j in listed["tuningJobs"]] == [f"{jobs}/2"]
        assert call(restarted.url, "GET", f"/v1/{jobs}?pageToken={listed['nextPageToken']}")[1][
            "tuningJobs"][0]["state"] == "JOB_STATE_SUCCEEDED"
    running = listed["tuningJobs"][0]
    assert running["state"] == "JOB_STATE_FAILED" and running["error"]["code"] == 10
    assert running["error"]["message"].startswith("the server stopped while the job ran")
