"""upload_model and deploy_endpoint in a Kubeflow Pipelines cluster: the model artifact, and a
KServe InferenceService created through a fake Kubernetes API on loopback."""
from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from components.common.cluster import in_kfp_cluster
from components.deploy_endpoint import kserve
from components.deploy_endpoint.component import deploy_endpoint
from components.deploy_endpoint.kserve import (PredictorSettings, deploy_inference_service,
                                               inference_service, service_name)
from components.deploy_endpoint.kubernetes_api import ACCOUNT_DIR_ENV, API_URL_ENV
from components.upload_model.component import upload_model
from pipelines.templates import COMPILED_DIR, pipeline_spec
from tests.fake_kubernetes import COLLECTION, FakeKubernetes

NAMESPACE = "kubeflow"
TOKEN = "service-account-token"
IMAGE = "registry.example.com/tunepipe:test"
MODEL_URI = "gs://pipeline-root/run-1/upload-model/registered_model"
COLLECTION_PATH = COLLECTION.format(namespace=NAMESPACE)
DEFAULTS = PredictorSettings(kserve.DEFAULT_RESOURCES, "", kserve.DEFAULT_READY_TIMEOUT_S)


def write_account(folder: Path, ca_pem: str = "unused: the fake speaks plain http\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "namespace").write_text(NAMESPACE)
    (folder / "ca.crt").write_text(ca_pem)
    return folder


@pytest.fixture
def in_cluster(monkeypatch, tmp_path):
    """A KFP task pod's environment, its service account in a temporary folder."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KFP_POD_NAME", "tune-large-model-abcde-1234")
    monkeypatch.setenv(ACCOUNT_DIR_ENV, str(write_account(tmp_path / "serviceaccount")))
    for name in (kserve.RESOURCES_ENV, kserve.SERVICE_ACCOUNT_ENV, kserve.READY_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def fake_api(in_cluster):
    with FakeKubernetes(ready_after=2) as fake:
        in_cluster.setenv(API_URL_ENV, fake.url)
        yield fake


def test_a_kfp_task_pod_is_told_from_any_other_process(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    assert not in_kfp_cluster()  # a pod, but the local runner in a CI job say
    monkeypatch.setenv("KFP_POD_NAME", "tune-large-model-abcde-1234")
    assert in_kfp_cluster()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert not in_kfp_cluster()


@pytest.mark.parametrize("display_name, name", [
    ("My Model@v2", "my-model-v2"), ("tuned_bison.2", "tuned-bison-2"), ("a" * 45, "a" * 45)])
def test_the_service_is_named_after_the_display_name(display_name, name):
    assert service_name(display_name) == name


@pytest.mark.parametrize("display_name, becomes", [
    ("2024 model", "'2024-model'"), ("a" * 46, "'" + "a" * 46 + "'"), ("@@", "''")])
def test_a_display_name_that_cannot_name_a_service_is_refused(display_name, becomes):
    with pytest.raises(ValueError, match=f"cannot name a KServe InferenceService: it becomes "
                                         f"{becomes}.*start with a letter"):
        service_name(display_name)


def test_the_predictor_runs_the_server_in_the_image_on_the_model():
    manifest = inference_service("My Model", NAMESPACE, IMAGE, MODEL_URI, DEFAULTS)
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "my-model"
    assert manifest["metadata"]["namespace"] == NAMESPACE
    predictor = manifest["spec"]["predictor"]
    assert "serviceAccountName" not in predictor
    [container] = predictor["containers"]
    assert container["image"] == IMAGE
    assert container["command"] == ["python", "-m", "components.deploy_endpoint.server"]
    assert container["args"] == ["--name", "My Model"]
    assert {e["name"]: e["value"] for e in container["env"]} == {
        "AIP_HTTP_PORT": "8080", "AIP_STORAGE_URI": MODEL_URI,
        "AIP_HEALTH_ROUTE": "/health", "AIP_PREDICT_ROUTE": "/predict"}
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])


@pytest.mark.parametrize("uri, storage_uri", [
    ("minio://mlpipeline/v2/artifacts/run/registered_model",
     "s3://mlpipeline/v2/artifacts/run/registered_model"),
    ("s3://bucket/root/registered_model", "s3://bucket/root/registered_model")])
def test_an_s3_model_comes_through_kserve_s_storage_initializer(uri, storage_uri):
    manifest = inference_service("m", NAMESPACE, IMAGE, uri, DEFAULTS)
    env = {e["name"]: e["value"] for e in manifest["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == storage_uri and env["AIP_STORAGE_URI"] == "/mnt/models"


def test_a_model_outside_an_object_store_is_refused():
    with pytest.raises(ValueError, match="cannot read the model at '/tmp/model'.*gs://, s3://"):
        inference_service("m", NAMESPACE, IMAGE, "/tmp/model", DEFAULTS)


def test_the_environment_sets_resources_service_account_and_wait(monkeypatch):
    resources = {"limits": {"cpu": "4", "memory": "16Gi"}}
    monkeypatch.setenv(kserve.RESOURCES_ENV, json.dumps(resources))
    monkeypatch.setenv(kserve.SERVICE_ACCOUNT_ENV, "model-reader")
    monkeypatch.setenv(kserve.READY_TIMEOUT_ENV, "1200")
    settings = PredictorSettings.from_environment()
    assert settings == PredictorSettings(resources, "model-reader", 1200.0)
    predictor = inference_service("m", NAMESPACE, IMAGE, MODEL_URI, settings)["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "model-reader"
    assert predictor["containers"][0]["resources"] == resources
    monkeypatch.setenv(kserve.RESOURCES_ENV, "{cpu: 4}")
    with pytest.raises(ValueError, match=f"{kserve.RESOURCES_ENV}='{{cpu: 4}}' is not JSON"):
        PredictorSettings.from_environment()


def test_creates_the_service_and_waits_until_it_is_ready(fake_api, tmp_path):
    record = deploy_inference_service("My Model", MODEL_URI, IMAGE, tmp_path / "endpoint",
                                      poll_s=0.01)
    calls = [(r.method, r.path) for r in fake_api.requests]
    assert calls[:2] == [("GET", f"{COLLECTION_PATH}/my-model"), ("POST", COLLECTION_PATH)]
    assert calls[2:] == [("GET", f"{COLLECTION_PATH}/my-model")] * 3  # Ready on the third read
    assert {r.authorization for r in fake_api.requests} == {f"Bearer {TOKEN}"}
    sent = fake_api.requests[1].body
    assert sent == inference_service("My Model", NAMESPACE, IMAGE, MODEL_URI, DEFAULTS)
    assert yaml.safe_load((tmp_path / "endpoint" / "inferenceservice.yaml").read_text()) == sent
    assert record == {
        "name": "my-model", "namespace": NAMESPACE, "url": "http://my-model.kubeflow.example.com",
        "predict_url": "http://my-model.kubeflow.example.com/predict",
        "internal_url": "http://my-model.kubeflow.svc.cluster.local", "model_uri": MODEL_URI}
    assert json.loads((tmp_path / "endpoint" / "endpoint.json").read_text()) == record


def test_replaces_a_service_of_the_same_name_and_waits_for_the_new_one(fake_api, tmp_path):
    fake_api.add_ready_service(NAMESPACE, "my-model", {"predictor": {"containers": []}})
    deploy_inference_service("My Model", MODEL_URI, IMAGE, tmp_path / "endpoint", poll_s=0.01)
    calls = [(r.method, r.path) for r in fake_api.requests]
    assert calls[:2] == [("GET", f"{COLLECTION_PATH}/my-model"),
                         ("PUT", f"{COLLECTION_PATH}/my-model")]
    assert len(calls) == 5  # the old revision's Ready did not count
    replaced = fake_api.requests[1].body
    assert replaced["metadata"]["resourceVersion"] == "7"
    assert replaced["spec"]["predictor"]["containers"][0]["image"] == IMAGE
    stored = fake_api.services[f"{NAMESPACE}/my-model"]
    assert stored["metadata"]["generation"] == 2 and stored["status"]["observedGeneration"] == 2


def test_missing_rbac_says_what_to_grant(in_cluster, tmp_path):
    with FakeKubernetes(forbidden=True) as fake:
        in_cluster.setenv(API_URL_ENV, fake.url)
        with pytest.raises(PermissionError) as refused:
            deploy_inference_service("My Model", MODEL_URI, IMAGE, tmp_path, poll_s=0.01)
    message = str(refused.value)
    assert ("service account (kubeflow:pipeline-runner) may not manage "
            "inferenceservices.serving.kserve.io in namespace kubeflow") in message
    assert "get, create, update and patch" in message
    assert ("kubectl create role tunepipe-deployer -n kubeflow --verb=get,create,update,patch "
            "--resource=inferenceservices.serving.kserve.io") in message
    assert "--serviceaccount=kubeflow:pipeline-runner" in message
    assert (tmp_path / "inferenceservice.yaml").exists()  # to apply by hand


def test_a_cluster_without_kserve_says_so(in_cluster, tmp_path):
    with FakeKubernetes(kserve_installed=False) as fake:
        in_cluster.setenv(API_URL_ENV, fake.url)
        with pytest.raises(LookupError, match="KServe is not installed in this cluster"):
            deploy_inference_service("My Model", MODEL_URI, IMAGE, tmp_path, poll_s=0.01)


def test_a_service_that_never_gets_ready_times_out_with_its_conditions(fake_api, in_cluster,
                                                                      tmp_path):
    fake_api.ready_after = 10**6
    in_cluster.setenv(kserve.READY_TIMEOUT_ENV, "0.2")
    with pytest.raises(TimeoutError) as waited:
        deploy_inference_service("My Model", MODEL_URI, IMAGE, tmp_path, poll_s=0.01)
    message = str(waited.value)
    assert "InferenceService my-model in namespace kubeflow is not Ready after 0.2 s" in message
    assert ("PredictorReady=False (RevisionMissing: 0/3 nodes are available: 3 Insufficient "
            "nvidia.com/gpu.); Ready=False (RevisionMissing)") in message
    assert "kubectl describe inferenceservice my-model -n kubeflow" in message


def test_tls_is_verified_against_the_service_account_s_ca(in_cluster, tmp_path):
    certificate, key = _self_signed_certificate(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(certificate, key)
    with FakeKubernetes(ready_after=0, tls=server_tls) as fake:
        in_cluster.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")  # no override: the pod's API
        in_cluster.setenv("KUBERNETES_SERVICE_PORT", fake.url.rsplit(":", 1)[1])
        in_cluster.setenv(ACCOUNT_DIR_ENV, str(write_account(tmp_path / "trusting",
                                                             certificate.read_text())))
        record = deploy_inference_service("m", MODEL_URI, IMAGE, tmp_path / "ok", poll_s=0.01)
        assert record["name"] == "m" and fake.requests
        other_ca, _ = _self_signed_certificate(tmp_path / "other")
        in_cluster.setenv(ACCOUNT_DIR_ENV, str(write_account(tmp_path / "distrusting",
                                                             other_ca.read_text())))
        with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            deploy_inference_service("m", MODEL_URI, IMAGE, tmp_path / "no", poll_s=0.01)


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return folder / "ca.crt", folder / "key.pem"


def test_upload_model_stores_the_model_in_its_artifact(in_cluster, tmp_path):
    in_cluster.setenv("TUNEPIPE_HOME", str(tmp_path / "home"))
    selected = tmp_path / "selected_model"
    (selected / "adapter").mkdir(parents=True)
    (selected / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (selected / "tunepipe_model.json").write_text(json.dumps({"base_model": {"reference": "b"}}))
    dataset = tmp_path / "validated_dataset"
    dataset.mkdir()
    (dataset / "train.jsonl").write_text('{"input_text": "a", "output_text": "b"}\n')
    registered = dsl.Model(name="registered_model", uri=str(tmp_path / "registered_model"))
    upload_model.python_func(
        selected_model=dsl.Model(uri=str(selected)),
        validated_dataset=dsl.Dataset(uri=str(dataset)),
        evaluation_results=dsl.Artifact(uri=str(tmp_path / "no-evaluation")),
        model_display_name="My Model", project="p", location="us-central1",
        dataset_uri="gs://data/train.jsonl", registered_model=registered)
    folder = Path(registered.path)
    assert (folder / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    metadata = json.loads((folder / "tunepipe_model.json").read_text())
    assert metadata["display_name"] == "My Model" and "version" not in metadata
    assert metadata["dataset_uri"] == "gs://data/train.jsonl" and metadata["base_model"]
    assert registered.metadata == {"display_name": "My Model", "model_uri": registered.uri}
    assert not (tmp_path / "home").exists()  # no registry in the pod


def test_deploy_endpoint_creates_the_service_and_records_it(fake_api, tmp_path):
    fake_api.ready_after = 0
    registered = dsl.Model(name="registered_model", uri=MODEL_URI,
                           metadata={"display_name": "My Model", "model_uri": MODEL_URI})
    endpoint = dsl.Artifact(name="endpoint", uri=str(tmp_path / "endpoint"))
    deploy_endpoint.python_func(registered_model=registered, model_display_name="My Model",
                                serving_image=IMAGE, endpoint=endpoint)
    assert endpoint.metadata["predict_url"] == "http://my-model.kubeflow.example.com/predict"
    assert endpoint.metadata["namespace"] == NAMESPACE
    assert sorted(p.name for p in Path(endpoint.path).iterdir()) == [
        "endpoint.json", "inferenceservice.yaml"]
    sent = fake_api.requests[1].body["spec"]["predictor"]["containers"][0]
    assert sent["image"] == IMAGE


def test_the_template_gives_deploy_endpoint_its_own_image():
    spec = pipeline_spec(COMPILED_DIR / "tune-large-model.yaml")
    task = spec["root"]["dag"]["tasks"]["deploy-endpoint"]
    image = task["inputs"]["parameters"]["serving_image"]["runtimeValue"]["constant"]
    assert image == spec["deploymentSpec"]["executors"]["exec-deploy-endpoint"]["container"][
        "image"]
