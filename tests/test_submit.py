"""`tunepipe submit` and `--dry-run`: the real google-cloud-aiplatform and kfp clients against
local fakes of their services (tests/fake_services.py), Cloud Storage from the emulator."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipelines import submit
from command.main import main
from tests.fake_services import FakeService

SEED_REQUEST = Path(__file__).resolve().parent / "seeds" / "001_70d06e170e6fa02c_request.json"
# Seed 002's distillation request body (its placeholders given values of the same kind).
DISTILLATION_SEED_REQUEST = SEED_REQUEST.with_name("002_e4cc4b91ade755bc_request.json")
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "support_intents_train.jsonl"
SERVICE_ACCOUNT = "tuner@my-project.iam.gserviceaccount.com"


@pytest.fixture
def cloud(gcs_emulator, tmp_path, monkeypatch):
    """The emulated bucket holding the sample dataset; no Google credentials anywhere."""
    from google.cloud import storage

    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.setattr(submit, "POLL_SECONDS", 0.0)
    client = storage.Client(project="local", credentials=_anonymous())
    client.bucket(gcs_emulator.bucket).blob("data/train.jsonl").upload_from_filename(SAMPLE)
    return gcs_emulator


@pytest.fixture
def own_buckets(monkeypatch):
    """The emulator's buckets belong to every project: the Vertex SDK checks that the pipeline
    root's bucket belongs to the job's project by asking Resource Manager for the project's
    number, a call it retries for 60 s offline."""
    from gcp_storage_emulator import settings
    from google.cloud.aiplatform.utils import resource_manager_utils

    monkeypatch.setattr(resource_manager_utils, "get_project_number",
                        lambda project, credentials=None: settings.DEFAULT_PROJECT_NUMBER)


def _anonymous():
    from google.auth.credentials import AnonymousCredentials

    return AnonymousCredentials()


def _vertex_args(cloud, fake, *extra):
    return ["submit", "tune-large-model", "--vertex", "--project", "my-project",
            "--region", "europe-west4", "--api-endpoint", fake.url,
            "--pipeline-root", cloud.uri("root"), "--param", "project=my-project",
            "--param", "model_display_name=support-intents",
            "--param", f"dataset_uri={cloud.uri('data/train.jsonl')}",
            "--param", "train_steps=40", *extra]


def test_vertex_submission_sends_template_parameters_region_and_account(cloud, own_buckets, capsys):
    with FakeService("vertex", ["PIPELINE_STATE_RUNNING"]) as fake:
        assert main(_vertex_args(cloud, fake, "--service-account", SERVICE_ACCOUNT)) == 0
    (create,) = fake.creates()
    assert create.path.startswith("/v1/projects/my-project/locations/europe-west4/pipelineJobs?")
    body = create.body
    assert body["pipelineSpec"]["pipelineInfo"]["name"] == "tune-large-model"
    assert body["serviceAccount"] == SERVICE_ACCOUNT
    assert body["runtimeConfig"]["gcsOutputDirectory"] == cloud.uri("root")
    values = body["runtimeConfig"]["parameterValues"]
    assert values["dataset_uri"] == cloud.uri("data/train.jsonl")
    assert values["train_steps"] == 40 and values["model_display_name"] == "support-intents"
    out = capsys.readouterr().out
    assert "projects/my-project/locations/europe-west4/pipelineJobs/job-1" in out
    assert ("https://console.cloud.google.com/vertex-ai/locations/europe-west4/pipelines/runs/"
            "job-1?project=my-project") in out


def test_what_the_sdk_sends_is_a_request_body_run_accepts(cloud, own_buckets, tmp_path, capsys):
    """Ints as floats and an inline pipelineSpec: `run --dry-run --request-file` takes it."""
    with FakeService("vertex", ["PIPELINE_STATE_RUNNING"]) as fake:
        assert main(_vertex_args(cloud, fake)) == 0
    sent = {key: value for key, value in fake.creates()[0].body.items() if key != "labels"}
    path = tmp_path / "sent.json"
    path.write_text(json.dumps(sent))
    capsys.readouterr()
    assert main(["run", "--request-file", str(path), "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["runtimeConfig"]["parameterValues"]["train_steps"] == 40


@pytest.mark.parametrize("states,error,status", [
    (["PIPELINE_STATE_RUNNING", "PIPELINE_STATE_SUCCEEDED"], "", 0),
    (["PIPELINE_STATE_RUNNING", "PIPELINE_STATE_FAILED"], "The replica workerpool0-0 exited "
                                                          "with a non-zero status of 1.", 1),
])
def test_wait_follows_the_state_to_the_end(cloud, own_buckets, capsys, states, error, status):
    with FakeService("vertex", states, error_message=error) as fake:
        assert main(_vertex_args(cloud, fake, "--wait")) == status
    captured = capsys.readouterr()
    shown = [line for line in captured.out.splitlines() if line.startswith("state:")]
    assert shown[-1] == f"state: {states[-1]}"
    if error:
        assert captured.err.strip().splitlines() == [
            "tunepipe submit: projects/my-project/locations/europe-west4/pipelineJobs/job-1 "
            f"ended PIPELINE_STATE_FAILED: {error}"]


def test_a_service_error_is_one_line(cloud, own_buckets, capsys):
    message = "Quota exceeded for aiplatform.googleapis.com/custom_model_training_nvidia_a100"
    with FakeService("vertex", ["PIPELINE_STATE_RUNNING"], refuse=(429, message)) as fake:
        assert main(_vertex_args(cloud, fake)) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"tunepipe submit: Vertex AI (europe-west4): HTTP 429: {message}"]


def test_the_seed_request_body_submits_as_it_is(cloud, own_buckets, tmp_path, capsys):
    """The seed's body is refused for its own typo, naming it; corrected, it is sent whole."""
    from google.cloud import storage

    client = storage.Client(project="local", credentials=_anonymous())
    bucket = client.lookup_bucket("my-gcs-bucket-uri") or client.create_bucket("my-gcs-bucket-uri")
    bucket.blob("dataset").upload_from_filename(SAMPLE)
    with FakeService("vertex", ["PIPELINE_STATE_RUNNING"]) as fake:
        args = ["submit", "--request-file", str(SEED_REQUEST), "--vertex", "--project",
                "myproject", "--region", "europe-west4", "--api-endpoint", fake.url]
        assert main(args) == 2
        assert "unknown parameter 'accelerator_type:' (did you mean 'accelerator_type'?)" in \
            capsys.readouterr().err
        assert not fake.received
        corrected = json.loads(SEED_REQUEST.read_text())
        values = corrected["runtimeConfig"]["parameterValues"]
        values["accelerator_type"] = values.pop("accelerator_type:")
        path = tmp_path / "request.json"
        path.write_text(json.dumps(corrected))
        assert main(["submit", "--request-file", str(path), *args[3:]]) == 0
    body = fake.creates()[0].body
    assert body["displayName"] == "tune-llm"
    assert body["encryptionSpec"]["kmsKeyName"] == values["encryption_spec_key_name"]
    assert body["runtimeConfig"]["gcsOutputDirectory"] == "gs://my-gcs-bucket-uri/output"
    assert body["runtimeConfig"]["parameterValues"]["accelerator_type"] == "GPU"


def test_the_distillation_seed_request_body_submits_as_it_is(cloud, own_buckets, capsys):
    from google.cloud import storage

    client = storage.Client(project="local", credentials=_anonymous())
    # The seed bucket: another seed's test may have made it in this emulator already.
    bucket = client.lookup_bucket("my-gcs-bucket-uri") or client.create_bucket("my-gcs-bucket-uri")
    for name in ("dataset", "eval-dataset"):
        bucket.blob(name).upload_from_filename(SAMPLE)
    with FakeService("vertex", ["PIPELINE_STATE_RUNNING"]) as fake:
        assert main(["submit", "--request-file", str(DISTILLATION_SEED_REQUEST), "--vertex",
                     "--project", "myproject", "--region", "us-central1",
                     "--api-endpoint", fake.url]) == 0
    (create,) = fake.creates()
    sent = json.loads(DISTILLATION_SEED_REQUEST.read_text())
    assert create.body["runtimeConfig"]["parameterValues"] == sent["runtimeConfig"][
        "parameterValues"]
    assert create.body["serviceAccount"] == sent["serviceAccount"]
    assert create.body["pipelineSpec"]["pipelineInfo"]["name"] == "distillation"


def test_dry_run_checks_and_prints_the_body_sending_nothing(cloud, capsys):
    with FakeService("vertex", ["PIPELINE_STATE_RUNNING"]) as fake:
        assert main(_vertex_args(cloud, fake, "--dry-run")) == 0
        assert not fake.received
        body = json.loads(capsys.readouterr().out)
        assert body["runtimeConfig"]["parameterValues"]["train_steps"] == 40
        missing = _vertex_args(cloud, fake, "--dry-run", "--param",
                               f"dataset_uri={cloud.uri('data/nope.jsonl')}")
        assert main(missing) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"tunepipe submit: invalid request: dataset_uri '{cloud.uri('data/nope.jsonl')}' "
            "does not exist"]
        local = _vertex_args(cloud, fake, "--dry-run", "--param", f"dataset_uri={SAMPLE}")
        assert main(local) == 2
        assert "is a local path; a remote run reads gs:// only" in capsys.readouterr().err
        no_root = _vertex_args(cloud, fake, "--dry-run", "--pipeline-root", "gs://no-such-bucket/x")
        assert main(no_root) == 2
        assert "gs://no-such-bucket does not exist" in capsys.readouterr().err
        assert not fake.received


def test_vertex_template_is_preferred_when_compiled(tmp_path, monkeypatch):
    portable = submit.COMPILED_DIR / "tune-large-model.yaml"
    monkeypatch.setattr(submit, "VERTEX_TEMPLATES", tmp_path)
    assert submit.vertex_template(portable) == portable
    (tmp_path / "tune-large-model.yaml").write_text("{}")
    assert submit.vertex_template(portable) == tmp_path / "tune-large-model.yaml"
    elsewhere = tmp_path / "mine" / "tune-large-model.yaml"
    assert submit.vertex_template(elsewhere) == elsewhere


@pytest.mark.parametrize("states,status", [(["RUNNING", "SUCCEEDED"], 0), (["FAILED"], 1)])
def test_kfp_submission_and_wait(cloud, capsys, states, status):
    with FakeService("kfp", states, error_message="task tune failed") as fake:
        args = ["submit", "tune-large-model", "--kfp-host", fake.url, "--param", "project=p",
                "--param", "model_display_name=m", "--param",
                f"dataset_uri={cloud.uri('data/train.jsonl')}",
                "--service-account", "pipeline-runner",
                "--pipeline-root", cloud.uri("kfp-root"), "--wait"]
        assert main(args) == status
    (create,) = fake.creates()
    assert create.path == "/apis/v2beta1/runs"
    run = create.body
    # A template with a platform spec travels as both (the tuner's node selector is in it).
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "tune-large-model"
    executors = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"][
        "deploymentSpec"]["executors"]
    assert "nodeSelector" in executors["exec-tune"]
    assert run["runtime_config"]["parameters"]["dataset_uri"] == cloud.uri("data/train.jsonl")
    assert run["runtime_config"]["pipeline_root"] == cloud.uri("kfp-root")
    assert run["service_account"] == "pipeline-runner"
    captured = capsys.readouterr()
    assert f"{fake.url}/#/runs/details/run-1" in captured.out
    if status:
        assert captured.err.strip() == "tunepipe submit: run-1 ended FAILED: task tune failed"


def test_a_failed_bucket_check_is_one_warning_line(cloud, capsys, caplog, monkeypatch):
    """The SDK submits anyway; its traceback is left out."""
    from google.cloud.aiplatform.utils import resource_manager_utils

    monkeypatch.setattr(resource_manager_utils, "get_project_number",
                        lambda project, credentials=None: "999")  # not the bucket's project
    with FakeService("vertex", ["PIPELINE_STATE_RUNNING"]) as fake:
        assert main(_vertex_args(cloud, fake)) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: Vertex AI could not check the pipeline root's bucket "
                           "(ValueError: Output artifacts bucket \"tunepipe-test\" exists but does "
                           "not belong to project \"my-project\".")
    assert not [record for record in caplog.records if record.exc_info]


def test_dry_run_without_google_credentials_skips_only_the_gs_existence_checks(
        tmp_path, monkeypatch, capsys):
    """No credentials anywhere (no key file, an empty HOME and gcloud folder, no metadata
    server, no emulator): the gs:// locations go unchecked, and the note names them."""
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:1")
    args = ["submit", "tune-large-model", "--vertex", "--project", "my-project", "--region",
            "europe-west4", "--pipeline-root", "gs://my-bucket/root", "--param",
            "project=my-project", "--param", "model_display_name=support-intents", "--param",
            "dataset_uri=gs://my-bucket/data/train.jsonl", "--dry-run"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runtimeConfig"]["gcsOutputDirectory"] == "gs://my-bucket/root"
    assert captured.err.strip().splitlines() == [
        "note: no Google credentials: skipped checking that gs://my-bucket/data/train.jsonl, "
        "gs://my-bucket exist (`gcloud auth application-default login` lets the dry run check "
        "them; submitting needs it)"]
    # Every other check still runs: a local dataset is refused for a remote run.
    assert main([*args[:-2], f"dataset_uri={SAMPLE}", "--dry-run"]) == 2
    assert "is a local path; a remote run reads gs:// only" in capsys.readouterr().err


def test_the_vertex_check_script_says_its_usage(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "check_vertex_submission.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[0] == (f"usage: {script} PROJECT REGION gs://BUCKET/DIR "
                                           "gs://BUCKET/train.jsonl [SERVICE_ACCOUNT]")
    helped = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: ")
