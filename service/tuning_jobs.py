"""tuningJobs: Gemini supervised tuning (seed 004), create, get, list and cancel.

A create request is seed 004's body or what ``vertexai.tuning.sft.train()`` sends::

    {"baseModel": "gemini-1.5-pro-002",
     "supervisedTuningSpec": {"trainingDatasetUri": ..., "validationDatasetUri": ...,
                              "hyperParameters": {"epochCount": "3", "adapterSize": 2,
                                                  "learningRateMultiplier": 1.0},
                              "tuningMode": ...},
     "tunedModelDisplayName": ..., "description": ..., "labels": {...},
     "encryptionSpec": {...}, "serviceAccount": ...}

in the proto3 JSON mapping (:mod:`service.proto_json`: camelCase or snake_case names, enums by
name or number, int64 as strings). ``baseModel`` is a Gemini name, an alias in the model catalog
(``components/common/model_catalog.py``) of a local model, or any other catalog name or local
checkpoint; ``adapterSize`` is the LoRA rank (1, 4, 8 or 16; default 8); ``epochCount`` (default
:data:`DEFAULT_EPOCHS`) becomes ceil(epochs x examples / batch size) steps;
``tuningMode`` ``TUNING_MODE_FULL`` tunes every weight instead of an adapter. Unknown fields,
bad values, datasets or models that do not exist and local paths outside the allowed roots
(:mod:`service.local_paths`) are refused with 400 before anything is stored, and so are
numbers and text beyond the limits ``pipelines/parameters.py`` names: ``epochCount``
1 to MAX_EPOCH_COUNT, ``learningRateMultiplier`` above 0 and at most
MAX_LEARNING_RATE_MULTIPLIER, MAX_DISPLAY_NAME_LENGTH characters of display name,
MAX_DESCRIPTION_LENGTH of ``description``, Vertex's labels (at most MAX_LABELS, keys and values
of MAX_LABEL_LENGTH) and MAX_TEXT_LENGTH of any other string. The server numbers
the job. The tuned model is registered under ``tunedModelDisplayName`` (characters the registry
does not take become ``-``) and deployed to an endpoint of that name; ``tunedModel`` {model,
endpoint} names them as the models and endpoints routes answer them.

States are Vertex's JobState names: JOB_STATE_PENDING, _RUNNING, _SUCCEEDED, _FAILED,
_CANCELLING, _CANCELLED. A job runs in its own process (:mod:`service.supervised_tuning`), on the
server's one runner with the pipeline jobs.
"""
from __future__ import annotations

import json
import re

from pipelines.parameters import (MAX_DESCRIPTION_LENGTH, MAX_DISPLAY_NAME_LENGTH, MAX_EPOCH_COUNT,
                                  MAX_TEXT_LENGTH, integer_problem, labels_problems,
                                  multiplier_problem, text_problems)
from components.tune import settings as tune_settings
from service import proto_json
from service.http_api import ApiError, Call
from service.job_collections import JobCollection
from service.jobs import REQUEST_FILE
from service.local_paths import AllowedRoots
from service.pipeline_jobs import location_problems
from service.records import new_job_id, timestamp

COLLECTION = "tuningJobs"
STATE_PREFIX = "JOB_STATE_"
DEFAULT_EPOCHS = 3
FIELDS = {"baseModel", "supervisedTuningSpec", "tunedModelDisplayName", "description", "labels",
          "encryptionSpec", "serviceAccount"}
ECHOED_FIELDS = ("description", "labels", "encryptionSpec", "serviceAccount")
ENCRYPTION_SPEC_FIELDS = {"kmsKeyName"}
SPEC_FIELDS = {"trainingDatasetUri", "validationDatasetUri", "hyperParameters", "tuningMode"}
HYPER_PARAMETER_FIELDS = {"epochCount", "adapterSize", "learningRateMultiplier"}
# google.cloud.aiplatform_v1beta1 SupervisedHyperParameters.AdapterSize and
# SupervisedTuningSpec.TuningMode: names and numbers
ADAPTER_SIZES = {"ADAPTER_SIZE_UNSPECIFIED": 0, "ADAPTER_SIZE_ONE": 1, "ADAPTER_SIZE_TWO": 6,
                 "ADAPTER_SIZE_FOUR": 2, "ADAPTER_SIZE_EIGHT": 3, "ADAPTER_SIZE_SIXTEEN": 4,
                 "ADAPTER_SIZE_THIRTY_TWO": 5}
TUNING_MODES = {"TUNING_MODE_UNSPECIFIED": 0, "TUNING_MODE_FULL": 1,
                "TUNING_MODE_PEFT_ADAPTER": 2}
TUNING_METHODS = {"TUNING_MODE_UNSPECIFIED": "lora", "TUNING_MODE_FULL": "full",
                  "TUNING_MODE_PEFT_ADAPTER": "lora"}
ADAPTER_SIZE_NAMES = {rank: name for name, rank in tune_settings.GEMINI_ADAPTER_SIZES.items()}
# The pipeline parameters whose checks (service.pipeline_jobs, pipelines.parameters)
# the request's fields take
DATASET_FIELDS = {"dataset_uri": "trainingDatasetUri",
                  "evaluation_data_uri": "validationDatasetUri"}
REQUEST_FIELDS = {"large_model_reference": "baseModel",
                  **{parameter: f"supervisedTuningSpec.{field}"
                     for parameter, field in DATASET_FIELDS.items()}}
PUBLISHER_PREFIX = "publishers/google/models/"


def registry_name(display_name: str) -> str:
    """The registry and endpoint name of a tuned model's display name (Vertex takes any 128
    characters; the registry takes letters, digits, spaces and ``. _ @ -``, starting with a
    letter or digit); '' when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._@ -]", "-", display_name).lstrip("._@ -")[
        :MAX_DISPLAY_NAME_LENGTH]


def hyper_parameters(value: object) -> dict:
    """``hyperParameters`` as the tuner takes them: epochs, LoRA rank, learning rate
    multiplier."""
    where = "supervisedTuningSpec.hyperParameters"
    given = proto_json.message(value, HYPER_PARAMETER_FIELDS, where)
    epochs = proto_json.int64(given.get("epochCount", DEFAULT_EPOCHS), f"{where}.epochCount")
    size = proto_json.enum(given.get("adapterSize", "ADAPTER_SIZE_UNSPECIFIED"), ADAPTER_SIZES,
                           f"{where}.adapterSize")
    multiplier = proto_json.double(given.get("learningRateMultiplier", 1.0),
                                   f"{where}.learningRateMultiplier")
    problem = integer_problem(f"{where}.epochCount", epochs, MAX_EPOCH_COUNT) or \
        multiplier_problem(f"{where}.learningRateMultiplier", multiplier)
    if problem:
        raise ApiError(400, problem)
    try:
        rank = tune_settings.adapter_size(size)
    except ValueError as error:
        raise ApiError(400, f"{where}.adapterSize: {error}") from None
    return {"epochCount": epochs, "adapterSize": rank, "learningRateMultiplier": multiplier}


def base_model(value: object) -> str:
    """The catalog reference or path ``baseModel`` names (``publishers/google/models/``
    dropped)."""
    reference = proto_json.string(value, "baseModel", MAX_TEXT_LENGTH).strip()
    if not reference:
        raise ApiError(400, "baseModel is required: a Gemini model such as gemini-1.5-pro-002, "
                            "another catalog name, or a local checkpoint folder")
    return reference.removeprefix(PUBLISHER_PREFIX)


def input_problems(roots: AllowedRoots, values: dict[str, str]) -> list[str]:
    """The pipelines' checks of a base model and datasets given as pipeline parameters (the
    allowed roots first, then that they exist and resolve), naming the request's fields."""
    from pipelines.parameters import input_problems as parameter_problems

    problems = location_problems(roots, values, None) or parameter_problems(values)
    return [re.sub(r"^\w+", lambda match: REQUEST_FIELDS.get(match[0], match[0]), problem)
            for problem in problems]


def echoed_problems(body: dict) -> None:
    """Checks the fields the job's record echoes: ``description``, ``labels``,
    ``encryptionSpec`` {kmsKeyName} and ``serviceAccount``; ApiError 400 naming the first
    problem."""
    proto_json.string(body.get("description", ""), "description", MAX_DESCRIPTION_LENGTH)
    proto_json.string(body.get("serviceAccount", ""), "serviceAccount", MAX_TEXT_LENGTH)
    proto_json.message(body.get("encryptionSpec", {}), ENCRYPTION_SPEC_FIELDS, "encryptionSpec")
    problems = labels_problems(body.get("labels", {})) + \
        text_problems(body.get("encryptionSpec", {}), "encryptionSpec")
    if problems:
        raise ApiError(400, "\n".join(problems))


class TuningJobs(JobCollection):
    """The tuningJobs collection: each job tunes, registers and deploys one model."""

    collection = COLLECTION
    state_prefix = STATE_PREFIX
    job_module = "service.supervised_tuning"
    result_fields = ("tunedModel", "tuningDataStats")

    def create(self, call: Call) -> dict:
        """Checks the request, stores the job JOB_STATE_PENDING and queues it; the job."""
        body = proto_json.message(call.body, FIELDS, "the request")
        if "supervisedTuningSpec" not in body:
            raise ApiError(400, "supervisedTuningSpec is required (tunepipe serve runs supervised "
                                "tuning only)")
        spec = proto_json.message(body["supervisedTuningSpec"], SPEC_FIELDS,
                                  "supervisedTuningSpec")
        reference = base_model(body.get("baseModel", ""))
        values = {"large_model_reference": reference}
        values.update({parameter: proto_json.string(spec[field], f"supervisedTuningSpec.{field}",
                                                    MAX_TEXT_LENGTH)
                       for parameter, field in DATASET_FIELDS.items() if spec.get(field)})
        if "dataset_uri" not in values:
            raise ApiError(400, "supervisedTuningSpec.trainingDatasetUri is required: a JSONL "
                                "file of Gemini examples, a gs:// URI or a local path")
        parameters = hyper_parameters(spec.get("hyperParameters", {}))
        mode = proto_json.enum(spec.get("tuningMode", "TUNING_MODE_UNSPECIFIED"), TUNING_MODES,
                               "supervisedTuningSpec.tuningMode")
        display_name = proto_json.string(body.get("tunedModelDisplayName", ""),
                                         "tunedModelDisplayName", MAX_DISPLAY_NAME_LENGTH)
        echoed_problems(body)
        problems = input_problems(self.roots, values)
        if problems:
            raise ApiError(400, "\n".join(problems))
        job_id = new_job_id()
        name = self.job_name(call, job_id)
        display_name = display_name or f"tuned-model-{job_id}"
        settings = {"parent": call.parent, "baseModel": reference,
                    "trainingDatasetUri": values["dataset_uri"],
                    "validationDatasetUri": values.get("evaluation_data_uri", ""),
                    **parameters, "tuningMethod": TUNING_METHODS[mode],
                    "modelDisplayName": registry_name(display_name) or f"tuned-model-{job_id}"}
        now = timestamp()
        tuning_spec = {field: spec[field] for field in DATASET_FIELDS.values() if field in spec}
        tuning_spec["hyperParameters"] = {
            "epochCount": str(parameters["epochCount"]),
            "adapterSize": ADAPTER_SIZE_NAMES[parameters["adapterSize"]],
            "learningRateMultiplier": parameters["learningRateMultiplier"]}
        if "tuningMode" in spec:
            tuning_spec["tuningMode"] = mode
        record = {"name": name, "baseModel": body["baseModel"],
                  "tunedModelDisplayName": display_name, "supervisedTuningSpec": tuning_spec,
                  "state": STATE_PREFIX + "PENDING", "createTime": now, "updateTime": now,
                  **{field: body[field] for field in ECHOED_FIELDS if field in body}}
        return self.submit(record, {REQUEST_FILE: json.dumps(settings, indent=2)})

