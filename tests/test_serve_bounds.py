"""`tunepipe serve` refuses numbers and text beyond their limits, with 400 naming the field and
the limit, before anything is stored: infinite or huge numbers, full-width digits, IDs with a
trailing newline, display names that would be paths, oversized text."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service import proto_json
from service.http_api import ApiError
from service.records import job_name, service_dir
from service.server import ServeConfig, Service
from tests.test_serve import call

PARENT = "projects/my-project/locations/us-central1"
TUNING_JOBS = f"/v1/{PARENT}/tuningJobs"
PIPELINE_JOBS = f"/v1/{PARENT}/pipelineJobs"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server on a free port; the test session's temporary folders are an allowed root."""
    with Service(ServeConfig(port=0, allow_roots=[str(tmp_path_factory.getbasetemp())])) as running:
        yield running


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """A Gemini-format dataset of one example (its content is not read before the job runs)."""
    path = tmp_path_factory.mktemp("bounds") / "train.jsonl"
    path.write_text(json.dumps({"contents": [
        {"role": "user", "parts": [{"text": "hi"}]},
        {"role": "model", "parts": [{"text": "hello"}]}]}) + "\n")
    return path


def _tuning(train: Path, hyper: str = '{"epochCount": "1"}', extra: str = "") -> bytes:
    """A tuningJobs body as raw JSON: numbers such as 1e309 have no Python literal to dump."""
    return ('{"baseModel": "gemini-1.0-pro-002", "supervisedTuningSpec": {"trainingDatasetUri": '
            f'{json.dumps(str(train))}, "hyperParameters": {hyper}}}{extra}}}').encode()


def _pipeline(train: Path, **parameters) -> dict:
    return {"templateUri": "tune-large-model", "runtimeConfig": {"parameterValues": {
        "project": "my-project", "location": "us-central1", "model_display_name": "bounded",
        "dataset_uri": str(train), "train_steps": 1, **parameters}}}


def _refused(service, path: str, body, message: str) -> None:
    before = len(list(service_dir().rglob("record.json")))
    status, reply = call(service.url, "POST", path, body)
    assert status == 400 and reply["error"]["status"] == "INVALID_ARGUMENT", reply
    assert message in reply["error"]["message"], reply
    assert len(list(service_dir().rglob("record.json"))) == before  # nothing stored


HYPER = "supervisedTuningSpec.hyperParameters"


@pytest.mark.parametrize("hyper, message", [
    ('{"learningRateMultiplier": 1e309}', "1e309"),  # refused as it is parsed, or as the field
    ('{"learningRateMultiplier": "NaN"}',
     f"{HYPER}.learningRateMultiplier must be a finite number, not 'NaN'"),
    ('{"learningRateMultiplier": 101}',
     f"{HYPER}.learningRateMultiplier must be a number above 0 and at most 100, not 101.0"),
    ('{"epochCount": "99999999999999999999999"}',
     f"{HYPER}.epochCount must be an integer (int64), not '99999999999999999999999'"),
    ('{"epochCount": "101"}', f"{HYPER}.epochCount must be an integer from 1 to 100, not 101"),
    ('{"epochCount": 1e300}', f"{HYPER}.epochCount must be an integer (int64), not 1e+300"),
    ('{"epochCount": "\uff13"}', f"{HYPER}.epochCount must be an integer (int64), not '\uff13'"),
])
def test_tuning_numbers_out_of_range_are_refused(service, train_file, hyper, message):
    _refused(service, TUNING_JOBS, _tuning(train_file, hyper), message)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10 ** 400, "1e309", "inf", "\uff11"])
def test_a_double_field_takes_finite_ascii_numbers_only(value):
    with pytest.raises(ApiError, match="^rate must be a finite number, not "):
        proto_json.double(value, "rate")


@pytest.mark.parametrize("extra, message", [
    (f', "description": "{"d" * 15 * 2**20}"',
     f"description has {15 * 2**20} characters; at most 16384 are accepted"),
    (f', "tunedModelDisplayName": "{"n" * 129}"',
     "tunedModelDisplayName has 129 characters; at most 128 are accepted"),
    (', "labels": ' + json.dumps({f"k{n}": "v" for n in range(65)}),
     "labels has 65 labels; at most 64 are accepted"),
    (', "labels": {"team": "' + "v" * 64 + '"}',
     "labels.team must be a string of at most 63 characters"),
    (', "serviceAccount": "' + "a" * 65_537 + '"',
     "serviceAccount has 65537 characters; at most 65536 are accepted"),
    (', "encryptionSpec": {"kmsKeyName": "' + "k" * 65_537 + '"}',
     "encryptionSpec.kmsKeyName has 65537 characters; at most 65536 are accepted"),
    (', "encryptionSpec": {"other": 1}', "unknown fields in encryptionSpec: ['other']"),
])
def test_oversized_tuning_text_is_refused(service, train_file, extra, message):
    _refused(service, TUNING_JOBS, _tuning(train_file, extra=extra), message)


@pytest.mark.parametrize("parameters, message", [
    ({"train_steps": 1e12}, "train_steps must be an integer from 1 to 100000, not "),
    ({"train_steps": "\uff13\uff10\uff10"},
     "parameter 'train_steps'='\uff13\uff10\uff10': expected an integer"),
    ({"learning_rate_multiplier": "1e309"},
     "parameter 'learning_rate_multiplier'='1e309': expected a finite number"),
    ({"model_display_name": "../../x"}, "model_display_name '../../x' is not valid"),
    ({"model_display_name": "x\n"}, "model_display_name 'x\\n' is not valid"),
])
def test_pipeline_parameters_out_of_range_are_refused(service, train_file, parameters, message):
    _refused(service, PIPELINE_JOBS, _pipeline(train_file, **parameters), message)


def test_oversized_pipeline_text_is_refused(service, train_file):
    body = {**_pipeline(train_file), "displayName": "p" * 129}
    _refused(service, PIPELINE_JOBS, body, "displayName has 129 characters; at most 128")
    body = {**_pipeline(train_file), "network": "n" * 65_537}
    _refused(service, PIPELINE_JOBS, body, "network has 65537 characters; at most 65536")


@pytest.mark.parametrize("method, path", [
    ("GET", f"{TUNING_JOBS}/abc%0A"),
    ("POST", f"{PIPELINE_JOBS.replace('/v1/', '/v1beta1/')}?pipelineJobId=abc%0A"),
    ("GET", "/v1/projects/p%0A/locations/us-central1/tuningJobs"),
])
def test_ids_with_a_trailing_newline_are_refused(service, train_file, method, path):
    status, reply = call(service.url, method, path,
                         _pipeline(train_file) if method == "POST" else None)
    assert status == 400 and reply["error"]["status"] == "INVALID_ARGUMENT", reply
    assert not [path for path in service_dir().rglob("*") if "\n" in path.name]


@pytest.mark.parametrize("parent, job_id, message", [
    (PARENT, "abc\n", "job ID 'abc\\n' is not valid"),
    ("projects/p\n/locations/us-central1", "abc", "project 'p\\n' is not valid"),
    ("projects/p/locations/us-central1\n", "abc", "location 'us-central1\\n' is not valid"),
])
def test_names_match_whole(parent, job_id, message):
    """The records' own rule, under the HTTP layer's: "$" would take a trailing newline."""
    with pytest.raises(ValueError, match=re.escape(message)):
        job_name(parent, "tuningJobs", job_id)
