"""A tuningJob's job process: the tuning components' own functions, in sequence.

validate_dataset -> transform -> tune -> select_checkpoint -> upload_model -> deploy_endpoint,
each its KFP component's Python function (``component.python_func``) on artifacts in the job's
``outputs/`` folder, as the KFP local runner calls them, with Gemini's settings: the ``gemini``
dataset format; ``epoch_count`` (steps = ceil(epochs x examples / batch size)) and
``adapter_size`` (the LoRA rank); with validation data, an evaluation and a checkpoint once per
epoch; no early stopping; the final checkpoint. No pipeline template is involved: Vertex runs
tuningJobs as managed jobs, and its pipeline templates take no epochs or adapter size.

``request.json`` holds the settings :mod:`service.tuning_jobs` checked; the result is the job's
``tunedModel`` {model, endpoint} and ``tuningDataStats``.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from service.endpoints import endpoint_name
from service.jobs import (INTERNAL_CODE, INVALID_ARGUMENT_CODE, LOG_FILE, REQUEST_FILE,
                          job_main)
from service.models import model_name

OUTPUTS_DIR = "outputs"
DATASET_FORMAT = "gemini"


def tune_and_deploy(job: dict, outputs: Path) -> dict:
    """Runs the components for the job's settings, their artifacts under ``outputs``; the
    job's ``tunedModel`` and ``tuningDataStats``."""
    from kfp import dsl

    from components.common.accelerators import DEFAULT_ACCELERATOR_TYPE
    from components.common.images import BASE_IMAGE
    from components.common.model_catalog import resolve_model
    from components.deploy_endpoint.component import deploy_endpoint
    from components.select_checkpoint.component import select_checkpoint
    from components.transform.component import transform
    from components.tune import settings
    from components.tune.component import tune
    from components.upload_model.component import upload_model
    from components.validate_dataset.component import validate_dataset

    outputs.mkdir(parents=True, exist_ok=True)

    def artifact(kind: type, name: str):
        return kind(name=name, uri=str(outputs / name))

    base = job["baseModel"]
    common = {"large_model_reference": base, "max_context_length": ""}
    validated = artifact(dsl.Dataset, "validated_dataset")
    validate_dataset.python_func(
        dataset_uri=job["trainingDatasetUri"], evaluation_data_uri=job["validationDatasetUri"],
        dataset_format=DATASET_FORMAT, validated_dataset=validated,
        report=artifact(dsl.Markdown, "report"), **common)
    tokenized = artifact(dsl.Dataset, "tokenized_dataset")
    transform.python_func(validated_dataset=validated, dataset_format=DATASET_FORMAT,
                          default_context="", tokenized_dataset=tokenized, **common)
    examples = validated.metadata["num_examples"]
    batch_size = settings.batch_size(resolve_model(base).context_class, DEFAULT_ACCELERATOR_TYPE)
    tuned = artifact(dsl.Model, "tuned_model")
    tune.python_func(
        tokenized_dataset=tokenized, train_steps=0,
        learning_rate_multiplier=job["learningRateMultiplier"],
        evaluation_interval=settings.steps_for_epochs(1, examples, batch_size),
        enable_early_stopping=False, accelerator=DEFAULT_ACCELERATOR_TYPE,
        tensorboard_resource_id="", tuned_model=tuned,
        training_metrics=artifact(dsl.Metrics, "training_metrics"),
        loss_curve=artifact(dsl.Markdown, "loss_curve"), adapter_size=job["adapterSize"],
        tuning_method=job["tuningMethod"], epoch_count=float(job["epochCount"]), **common)
    no_evaluation = artifact(dsl.Artifact, "evaluation_results")  # no evaluate task: not written
    selected = artifact(dsl.Model, "selected_model")
    select_checkpoint.python_func(tuned_model=tuned, evaluation_results=no_evaluation,
                                  enable_checkpoint_selection="false",
                                  large_model_reference=base, selected_model=selected)
    display_name = job["modelDisplayName"]
    _, project, _, location = job["parent"].split("/")
    registered = artifact(dsl.Model, "registered_model")
    upload_model.python_func(selected_model=selected, validated_dataset=validated,
                             evaluation_results=no_evaluation, model_display_name=display_name,
                             project=project, location=location,
                             dataset_uri=job["trainingDatasetUri"], registered_model=registered)
    deploy_endpoint.python_func(registered_model=registered, model_display_name=display_name,
                                serving_image=BASE_IMAGE,
                                endpoint=artifact(dsl.Artifact, "endpoint"))
    version = registered.metadata["version"]
    return {"tunedModel": {"model": f"{model_name(job['parent'], display_name)}@{version}",
                           "endpoint": endpoint_name(job["parent"], display_name)},
            "tuningDataStats": {"supervisedTuningDataStats": {
                "tuningDatasetExampleCount": str(examples),
                "tuningStepCount": str(tuned.metadata["train_steps"])}}}


def run_tuning_job(folder: Path) -> dict:
    """The job in ``folder``: :func:`tune_and_deploy`'s result, or ``{"error": {code,
    message}}`` (INVALID_ARGUMENT for bad data or settings, INTERNAL otherwise)."""
    job = json.loads((folder / REQUEST_FILE).read_text())
    try:
        return tune_and_deploy(job, folder / OUTPUTS_DIR)
    except ValueError as error:  # invalid data (DatasetValidationError), a bad setting
        return {"error": {"code": INVALID_ARGUMENT_CODE, "message": str(error).strip()}}
    except Exception as error:  # noqa: BLE001 (the job fails with the reason)
        traceback.print_exc()
        return {"error": {"code": INTERNAL_CODE,
                          "message": f"{type(error).__name__}: {error}; its log: "
                                     f"{folder / LOG_FILE}"}}


if __name__ == "__main__":
    sys.exit(job_main(run_tuning_job))
