"""Submits a compiled template to Vertex AI Pipelines (google-cloud-aiplatform) or to a Kubeflow
Pipelines API server (``kfp.Client``), after the checks of a local run.

Errors from the service (credentials, quota, a bad region, any HTTP error) are raised as
:class:`SubmissionError`, whose message is one line.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.local_run import RunRequest
from pipelines.templates import COMPILED_DIR, VERTEX_SUBDIR, ParameterError

VERTEX_TEMPLATES = COMPILED_DIR / VERTEX_SUBDIR
POLL_SECONDS = 30.0
VERTEX_DONE = {"PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED"}
KFP_DONE = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}
SUCCEEDED = {"PIPELINE_STATE_SUCCEEDED", "SUCCEEDED"}


class SubmissionError(RuntimeError):
    """The service refused the submission or could not be reached; the message is one line."""


@dataclass
class Submitted:
    """A submitted run: its name, where to watch it, and how to read its state."""

    name: str
    link: str
    state: Callable[[], tuple[str, str]]  # -> (state, error message) from the service


def vertex_template(template: Path) -> Path:
    """The template to send to Vertex: ``compiled/vertex/<name>.yaml`` for a compiled template
    when it exists (its tasks name the published image), else the template itself."""
    vertex = VERTEX_TEMPLATES / template.name
    if template.resolve().parent == COMPILED_DIR.resolve() and vertex.exists():
        return vertex
    return template


def check_pipeline_root(pipeline_root: str, unchecked_gcs: list[str] | None = None) -> None:
    """Refuses a Vertex pipeline root that is not a gs:// folder in an existing bucket (with
    ``unchecked_gcs``, the bucket is not looked up but added to it)."""
    from components.common import storage

    if not storage.is_gcs(pipeline_root):
        raise ParameterError(f"  - Vertex AI writes the run's outputs to Cloud Storage: give "
                             f"--pipeline-root gs://BUCKET/DIR (not {pipeline_root!r})")
    bucket = "gs://" + pipeline_root[len("gs://"):].split("/")[0]
    if unchecked_gcs is not None:
        unchecked_gcs.append(bucket)
    elif not storage.exists(bucket):
        raise ParameterError(f"  - the pipeline root's bucket {bucket} does not exist")


def google_credentials_found() -> bool:
    """Whether gs:// locations can be read here: Application Default Credentials, or a Cloud
    Storage emulator (``STORAGE_EMULATOR_HOST``)."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    from components.common import storage

    if os.environ.get(storage.EMULATOR_ENV):
        return True
    try:
        google.auth.default()
    except DefaultCredentialsError:
        return False
    return True


_REQUEST_PREFIX = re.compile(r"^(?:GET|POST|PUT|PATCH|DELETE) \S+: ")  # REST errors name the call


class _BucketCheckWarning(logging.Filter):
    """Drops the traceback the Vertex SDK logs when its check of the pipeline root's bucket
    fails (it submits anyway) and prints the reason as one line on stderr instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        error = record.exc_info[1]
        print(f"warning: Vertex AI could not check the pipeline root's bucket "
              f"({type(error).__name__}: {' '.join(str(error).split())})", file=sys.stderr)
        return False


def _one_line(error: Exception) -> str:
    """A service error as one line: HTTP status and the service's own message."""
    code = getattr(error, "code", None) or getattr(error, "status", None)
    message = getattr(error, "message", None) or getattr(error, "body", None) or str(error)
    with contextlib.suppress(ValueError, TypeError):
        message = json.loads(message).get("message", message)  # a KFP error body
    text = _REQUEST_PREFIX.sub("", " ".join(str(message).split()))
    if isinstance(code, int):
        return f"HTTP {code}: {text}"
    return f"{type(error).__name__}: {text}"


def _service_errors() -> tuple[type[Exception], ...]:
    """What the clients raise when a service refuses a call or cannot be reached."""
    import requests
    import urllib3
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError
    from kfp_server_api import ApiException

    return (GoogleAPIError, GoogleAuthError, ApiException, requests.RequestException,
            urllib3.exceptions.HTTPError, OSError)


def submit_to_vertex(request: RunRequest, values: dict[str, Any], project: str, region: str,
                     api_endpoint: str | None = None) -> Submitted:
    """Creates a Vertex AI pipeline job. An ``http://`` ``api_endpoint`` (a local fake of the
    service) is called without credentials; otherwise the default credentials are used."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    logging.getLogger("google.cloud.aiplatform").setLevel(logging.WARNING)
    sdk_log = logging.getLogger("google.cloud.aiplatform.pipeline_jobs")
    bucket_check = _BucketCheckWarning()
    anonymous = bool(api_endpoint) and api_endpoint.startswith("http://")
    try:
        aiplatform.init(project=project, location=region, api_endpoint=api_endpoint,
                        api_transport="rest",
                        credentials=AnonymousCredentials() if anonymous else None)
        job = aiplatform.PipelineJob(
            display_name=request.display_name or values.get("model_display_name", ""),
            template_path=str(vertex_template(request.template)),
            pipeline_root=request.pipeline_root, parameter_values=values,
            encryption_spec_key_name=request.kms_key_name or None)
        sdk_log.addFilter(bucket_check)
        job.submit(service_account=request.service_account or None)
    except _service_errors() as error:
        raise SubmissionError(f"Vertex AI ({region}): {_one_line(error)}") from None
    finally:
        sdk_log.removeFilter(bucket_check)
    project_id, location, job_id = job.resource_name.split("/")[1::2]
    link = (f"https://console.cloud.google.com/vertex-ai/locations/{location}/pipelines/runs/"
            f"{job_id}?project={project_id}")

    def state() -> tuple[str, str]:
        job_state = job.state.name  # fetches the job again
        return job_state, job.gca_resource.error.message

    return Submitted(job.resource_name, link, state)


def submit_to_kfp(request: RunRequest, values: dict[str, Any], host: str) -> Submitted:
    """Creates a run on the Kubeflow Pipelines API server at ``host``."""
    import kfp

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # "This client only works with KFP v2.0.0-beta.2..."
            client = kfp.Client(host=host)
            result = client.create_run_from_pipeline_package(
                str(request.template), arguments=values,
                run_name=request.display_name or None,
                pipeline_root=request.pipeline_root or None,
                service_account=request.service_account or None)
    except _service_errors() as error:
        raise SubmissionError(f"Kubeflow Pipelines at {host}: {_one_line(error)}") from None

    def state() -> tuple[str, str]:
        run = client.get_run(result.run_id)
        return str(run.state), (run.error.message if run.error else "") or ""

    return Submitted(result.run_id, f"{host.rstrip('/')}/#/runs/details/{result.run_id}", state)


def follow(submitted: Submitted, done: set[str]) -> None:
    """Prints each new state of a submitted run, read every :data:`POLL_SECONDS`, until it
    ends; a run that did not succeed is raised as :class:`SubmissionError` with the service's
    error message."""
    shown = None
    while True:
        try:
            state, error = submitted.state()
        except _service_errors() as failure:
            raise SubmissionError(f"reading the state of {submitted.name}: "
                                  f"{_one_line(failure)}") from None
        if state != shown:
            print(f"state: {state}", flush=True)
            shown = state
        if state in done:
            break
        time.sleep(POLL_SECONDS)
    if state not in SUCCEEDED:
        raise SubmissionError(f"{submitted.name} ended {state}: {error or 'no error message'}")
