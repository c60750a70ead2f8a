"""A KServe InferenceService serving a registered model: deploy_endpoint in a Kubeflow Pipelines
cluster.

The InferenceService (``serving.kserve.io/v1beta1``) is named after the model's display name
(:func:`service_name`) and created in the task pod's namespace, or replaces the one of that name
there. Its predictor is one container of the project's image running the endpoint server under
Vertex's custom-container contract (:mod:`components.deploy_endpoint.container`) on port 8080.
Where the server finds the model depends on the model artifact's URI:

* ``gs://``: the server downloads it itself (``AIP_STORAGE_URI``), as on Vertex AI;
* ``s3://`` and ``minio://`` (KFP's default artifact store, MinIO, speaks S3): KServe's storage
  initializer downloads ``STORAGE_URI`` (as ``s3://``) into ``/mnt/models`` before the server
  starts, and the server reads it there.

The task prints the manifest, writes it to ``inferenceservice.yaml`` (for ``kubectl apply -f``),
applies it, waits for the Ready condition and writes ``endpoint.json``. Settings, from the
deploy task's environment:

    TUNEPIPE_KSERVE_RESOURCES        the predictor's resources as JSON (default: DEFAULT_RESOURCES)
    TUNEPIPE_KSERVE_SERVICE_ACCOUNT  the predictor's service account (the credentials that read
                                     the model), default the namespace's default one
    TUNEPIPE_KSERVE_READY_TIMEOUT_S  seconds to wait for Ready (default 600)
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.deploy_endpoint.container import (PREDICT_ROUTE, SERVING_COMMAND, SERVING_PORT,
                                                  serving_environment)
from components.deploy_endpoint.kubernetes_api import ApiError, KubernetesApi

API_VERSION = "serving.kserve.io/v1beta1"
RESOURCE = "inferenceservices.serving.kserve.io"
COLLECTION_PATH = "/apis/serving.kserve.io/v1beta1/namespaces/{namespace}/inferenceservices"
# KServe derives names such as <name>-predictor-00001 that must fit Kubernetes' 63 characters.
MAX_NAME_LENGTH = 45
# One GPU, as Vertex's serving machine (g2-standard-12, one L4) has. CPU and memory are explicit:
# KServe fills in any left out with its own defaults (1 CPU, 2Gi), too little to load a model.
DEFAULT_RESOURCES = {"requests": {"cpu": "4", "memory": "32Gi"},
                     "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}}
DEFAULT_READY_TIMEOUT_S = 600.0
RESOURCES_ENV = "TUNEPIPE_KSERVE_RESOURCES"
SERVICE_ACCOUNT_ENV = "TUNEPIPE_KSERVE_SERVICE_ACCOUNT"
READY_TIMEOUT_ENV = "TUNEPIPE_KSERVE_READY_TIMEOUT_S"
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
MANIFEST_FILE = "inferenceservice.yaml"
RECORD_FILE = "endpoint.json"
POLL_S = 5.0

_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SERVICE_ACCOUNT_USER = re.compile(r'User "system:serviceaccount:([^:"]+):([^"]+)"')


@dataclass(frozen=True)
class PredictorSettings:
    """What the deploy task's environment sets: the predictor's resources and service account,
    and how long to wait for it."""

    resources: dict
    service_account: str
    ready_timeout_s: float

    @classmethod
    def from_environment(cls) -> PredictorSettings:
        """The settings from ``TUNEPIPE_KSERVE_*``, defaults where unset."""
        return cls(
            _setting(RESOURCES_ENV, json.loads, DEFAULT_RESOURCES,
                     f"JSON resources such as {json.dumps(DEFAULT_RESOURCES)}"),
            os.environ.get(SERVICE_ACCOUNT_ENV, ""),
            _setting(READY_TIMEOUT_ENV, float, DEFAULT_READY_TIMEOUT_S, "a number of seconds"))


def _setting(name: str, parse, default, expected: str):
    """The environment variable ``name`` parsed, ``default`` when unset."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return parse(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not {expected}") from None


def service_name(display_name: str) -> str:
    """The InferenceService name of a display name: lowercase, every run of characters other
    than letters and digits one ``-``. ValueError when that is no usable name."""
    name = re.sub(r"[^a-z0-9]+", "-", display_name.lower()).strip("-")
    if not _DNS_1035_LABEL.match(name) or len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"model_display_name {display_name!r} cannot name a KServe InferenceService: it "
            f"becomes {name!r}, and the name must start with a letter and have at most "
            f"{MAX_NAME_LENGTH} lowercase letters, digits and '-' (a DNS-1035 label short enough "
            "for the names KServe derives from it). Choose a display name that starts with a "
            f"letter, of at most {MAX_NAME_LENGTH} characters.")
    return name


def model_environment(model_uri: str) -> dict[str, str]:
    """The predictor's environment that finds the model at ``model_uri`` (see the module)."""
    scheme, separator, location = model_uri.partition("://")
    if separator and scheme == "gs":
        return serving_environment(model_uri)
    if separator and scheme in ("s3", "minio"):
        return {"STORAGE_URI": f"s3://{location}", **serving_environment(KSERVE_MODEL_DIR)}
    raise ValueError(f"A KServe predictor cannot read the model at {model_uri!r}: the model "
                     "artifact must be in the pipeline root's object store (gs://, s3:// or "
                     "minio://)")


def inference_service(display_name: str, namespace: str, image: str, model_uri: str,
                      settings: PredictorSettings) -> dict:
    """The InferenceService manifest serving the model at ``model_uri`` in ``image``."""
    predictor: dict = {"containers": [{
        "name": "kserve-container",
        "image": image,
        "command": SERVING_COMMAND,
        "args": ["--name", display_name],
        "env": [{"name": name, "value": value}
                for name, value in model_environment(model_uri).items()],
        "ports": [{"containerPort": SERVING_PORT, "protocol": "TCP"}],
        "resources": settings.resources,
    }]}
    if settings.service_account:
        predictor["serviceAccountName"] = settings.service_account
    return {"apiVersion": API_VERSION, "kind": "InferenceService",
            "metadata": {"name": service_name(display_name), "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "tunepipe"},
                         "annotations": {"tunepipe/model-display-name": display_name}},
            "spec": {"predictor": predictor}}


def apply(api: KubernetesApi, manifest: dict) -> dict:
    """Creates the InferenceService, or replaces the one of the same name; returns what the API
    server stored."""
    metadata = manifest["metadata"]
    collection = COLLECTION_PATH.format(namespace=metadata["namespace"])
    try:
        existing = api.request("GET", f"{collection}/{metadata['name']}")
    except ApiError as error:
        if not _absent(error, metadata["name"]):
            raise
        return api.request("POST", collection, manifest)
    replacement = copy.deepcopy(manifest)
    replacement["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
    return api.request("PUT", f"{collection}/{metadata['name']}", replacement)


def wait_until_ready(api: KubernetesApi, namespace: str, name: str, generation: int | None,
                     timeout_s: float, poll_s: float = POLL_S) -> dict:
    """Reads the InferenceService until its Ready condition is True for ``generation`` (the
    spec written; a status without observedGeneration counts as current) and returns its status;
    TimeoutError with its last conditions after ``timeout_s``."""
    path = f"{COLLECTION_PATH.format(namespace=namespace)}/{name}"
    deadline = time.monotonic() + timeout_s
    while True:
        status = api.request("GET", path).get("status") or {}
        observed = status.get("observedGeneration")
        current = generation is None or observed is None or observed >= generation
        if current and any(condition.get("type") == "Ready" and condition.get("status") == "True"
                           for condition in status.get("conditions", [])):
            return status
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"InferenceService {name} in namespace {namespace} is not Ready after "
                f"{timeout_s:g} s; its conditions: {_describe(status.get('conditions', []))}. "
                f"See `kubectl describe inferenceservice {name} -n {namespace}` and the "
                f"predictor pod's log; {READY_TIMEOUT_ENV} sets the wait.")
        time.sleep(poll_s)


def deploy_inference_service(display_name: str, model_uri: str, image: str,
                             output_dir: str | Path, poll_s: float = POLL_S) -> dict:
    """Serves the model at ``model_uri`` from an InferenceService in this pod's namespace, waits
    until it is Ready and writes the manifest and the endpoint record to ``output_dir``; returns
    the record (name, namespace, url, predict_url, internal_url, model_uri)."""
    api = KubernetesApi.from_pod()
    settings = PredictorSettings.from_environment()
    manifest = inference_service(display_name, api.namespace, image, model_uri, settings)
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(manifest, sort_keys=False)
    (output / MANIFEST_FILE).write_text(text)
    print(f"Applying this InferenceService to {api.url}:\n{text}", flush=True)
    try:
        stored = apply(api, manifest)
        status = wait_until_ready(api, namespace, name, stored["metadata"].get("generation"),
                                  settings.ready_timeout_s, poll_s)
    except ApiError as error:
        raise _explained(error, name, namespace) from None
    internal_url = (status.get("address") or {}).get("url", "")
    url = status.get("url") or internal_url
    record = {"name": name, "namespace": namespace, "url": url,
              "predict_url": url + PREDICT_ROUTE, "internal_url": internal_url,
              "model_uri": model_uri}
    (output / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return record


def _absent(error: ApiError, name: str) -> bool:
    """Whether a 404 says the InferenceService ``name`` does not exist (rather than the
    resource kind: then its Status names no such object)."""
    return error.status == 404 and error.details.get("name") == name


def _explained(error: ApiError, name: str, namespace: str) -> Exception:
    """The API error as what to do about it: RBAC to grant, KServe to install."""
    if error.status == 403:
        user = _SERVICE_ACCOUNT_USER.search(error.message)
        account = f"{user[1]}:{user[2]}" if user else f"{namespace}:SERVICE_ACCOUNT"
        return PermissionError(
            f"The pipeline's service account ({account}) may not manage {RESOURCE} in "
            f"namespace {namespace} ({error}). Grant it get, create, update and patch on them, "
            f"e.g.:\n  kubectl create role tunepipe-deployer -n {namespace} "
            f"--verb=get,create,update,patch --resource={RESOURCE}\n"
            f"  kubectl create rolebinding tunepipe-deployer -n {namespace} "
            f"--role=tunepipe-deployer --serviceaccount={account}")
    if error.status == 404 and not _absent(error, name):
        return LookupError(
            f"KServe is not installed in this cluster: the API server has no {RESOURCE} "
            f"({API_VERSION}) ({error}). Install KServe, or apply the manifest printed above "
            "(inferenceservice.yaml) where it is.")
    return error


def _describe(conditions: list[dict]) -> str:
    """``Type=Status (Reason: message)`` for each condition."""
    described = []
    for condition in conditions:
        why = ": ".join(part for part in (condition.get("reason"), condition.get("message"))
                        if part)
        described.append(f"{condition.get('type')}={condition.get('status')}"
                         + (f" ({why})" if why else ""))
    return "; ".join(described) or "none reported yet"
