"""Templates: the compiled YAML is current, parameters are checked against it."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from pipelines.local_run import request_from_file
from pipelines.templates import (COMPILED_DIR, IMAGE_ENV, VERTEX_SUBDIR, ParameterError,
                                 bind_parameters, compile_all, pipeline_spec, read_template,
                                 template_path)
from pipelines.vertex import tuning_accelerator

DOCS_PARAMETERS = {  # docs/parameters.md's table for tune-large-model: name -> (type, default)
    "project": ("STRING", None), "location": ("STRING", ""), "model_display_name": ("STRING", None),
    "dataset_uri": ("STRING", None), "large_model_reference": ("STRING", "text-bison@002"),
    "accelerator_type": ("STRING", "GPU"), "train_steps": ("NUMBER_INTEGER", 300),
    "learning_rate_multiplier": ("NUMBER_DOUBLE", 1.0), "evaluation_data_uri": ("STRING", ""),
    "evaluation_interval": ("NUMBER_INTEGER", 20), "enable_early_stopping": ("BOOLEAN", True),
    "enable_checkpoint_selection": ("STRING", "default"), "tensorboard_resource_id": ("STRING", ""),
    "encryption_spec_key_name": ("STRING", ""), "max_context_length": ("STRING", ""),
}


def test_compiled_templates_match_a_fresh_compile(tmp_path, monkeypatch):
    monkeypatch.delenv(IMAGE_ENV, raising=False)  # the checked-in templates name the default image
    fresh_templates = compile_all(tmp_path)
    assert {path.relative_to(tmp_path).as_posix() for path in fresh_templates} == {
        f"{directory}{name}.yaml" for directory in ("", f"{VERTEX_SUBDIR}/")
        for name in ("tune-large-model", "tune-large-chat-model", "distillation")}
    for fresh in fresh_templates:
        checked_in = COMPILED_DIR / fresh.relative_to(tmp_path)
        assert checked_in.exists(), f"{checked_in} is missing: run `make compile`"
        assert list(yaml.safe_load_all(checked_in.read_text())) == \
            list(yaml.safe_load_all(fresh.read_text())), \
            f"{checked_in} is stale: run `make compile` and commit it"


def test_tune_large_model_parameters_are_vertex_s():
    name, parameters = read_template(template_path("tune-large-model"))
    assert name == "tune-large-model"
    assert {n: (p.type, p.default) for n, p in parameters.items()} == DOCS_PARAMETERS
    assert all(p.description for p in parameters.values()), "every parameter is documented"
    assert {n for n, p in parameters.items() if p.required} == {"project", "model_display_name", "dataset_uri"}


# Seed 002's request body for the distillation template: exactly these parameters.
DISTILLATION_PARAMETERS = {
    **{name: DOCS_PARAMETERS[name] for name in DOCS_PARAMETERS if name != "large_model_reference"},
    "teacher_model_reference": ("STRING", "text-unicorn@001"),
    "student_model_reference": ("STRING", "text-bison@002"),
}


def test_distillation_parameters_are_vertex_s():
    name, parameters = read_template(template_path("distillation"))
    assert name == "distillation"
    assert {n: (p.type, p.default) for n, p in parameters.items()} == DISTILLATION_PARAMETERS
    assert all(p.description for p in parameters.values()), "every parameter is documented"
    assert {n for n, p in parameters.items() if p.required} == {"project", "model_display_name", "dataset_uri"}


def test_distillation_runs_the_teacher_between_validation_and_transform():
    spec = pipeline_spec(template_path("distillation"))
    tasks = spec["root"]["dag"]["tasks"]
    teacher = tasks["generate-rationales"]
    assert teacher["dependentTasks"] == ["validate-dataset"]
    assert teacher["inputs"]["parameters"]["teacher_model_reference"] == {
        "componentInputParameter": "teacher_model_reference"}
    for task in ("transform", "evaluate"):
        assert tasks[task]["inputs"]["artifacts"]["validated_dataset"] == {
            "taskOutputArtifact": {"outputArtifactKey": "rationale_dataset",
                                   "producerTask": "generate-rationales"}}
    assert tasks["transform"]["inputs"]["parameters"]["dataset_format"] == {
        "runtimeValue": {"constant": "distillation"}}
    assert tasks["tune"]["inputs"]["parameters"]["large_model_reference"] == {
        "componentInputParameter": "student_model_reference"}


# accelerator_type -> what the portable tune task's pod asks for on a cluster: the resource
# limit, and the node selector (GKE's labels); TPU: one v3 host, since a pod is on one node.
PORTABLE_TUNER_ACCELERATORS = {
    "GPU": ("nvidia.com/gpu", "8", {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}),
    "TPU": ("google.com/tpu", "4", {"cloud.google.com/gke-tpu-accelerator": "tpu-v3-device",
                                    "cloud.google.com/gke-tpu-topology": "2x2"}),
}
INPUT_PLACEHOLDER = re.compile(r"\{\{\$\.inputs\.parameters\['(?P<name>[^']+)'\]\}\}")


@pytest.mark.parametrize("name", ["tune-large-model", "tune-large-chat-model", "distillation"])
def test_the_portable_tuner_asks_for_the_accelerator_type_s_kubernetes_resources(name):
    spec, platform = yaml.safe_load_all(template_path(name).read_text())
    tasks = spec["root"]["dag"]["tasks"]
    lookup = tasks["tuning-accelerator"]["inputs"]["parameters"]
    assert lookup["accelerator"] == {"componentInputParameter": "accelerator_type"}
    cluster_accelerators = lookup["cluster_accelerators"]["runtimeValue"]["constant"]
    for accelerator_type, expected in PORTABLE_TUNER_ACCELERATORS.items():
        assert tuple(tuning_accelerator.python_func(accelerator_type, cluster_accelerators)) == \
            expected
    with pytest.raises(ValueError, match="accelerator_type must be one of GPU, TPU, got 'gpu'"):
        tuning_accelerator.python_func("gpu", cluster_accelerators)
    outputs = spec["components"]["comp-tuning-accelerator"]["outputDefinitions"]["parameters"]
    assert outputs["node_selector"] == {"parameterType": "STRUCT"}  # KFP's driver reads a struct

    tuner = tasks["tune"]
    assert "tuning-accelerator" in tuner["dependentTasks"]
    assert tuner["inputs"]["parameters"]["accelerator"] == {
        "componentInputParameter": "accelerator_type"}  # the batch size rule
    executor = spec["components"][tuner["componentRef"]["name"]]["executorLabel"]
    resources = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
    for field, output in (("resourceType", "resource_name"), ("resourceCount", "resource_count")):
        placeholder = INPUT_PLACEHOLDER.fullmatch(resources["accelerator"][field])
        assert tuner["inputs"]["parameters"][placeholder["name"]] == {"taskOutputParameter": {
            "producerTask": "tuning-accelerator", "outputParameterKey": output}}
    assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor] == {
        "nodeSelector": {"nodeSelectorJson": {"taskOutputParameter": {
            "producerTask": "tuning-accelerator", "outputParameterKey": "node_selector"}}}}


def test_unknown_and_mistyped_parameters_are_all_named():
    _, parameters = read_template(template_path("tune-large-model"))
    with pytest.raises(ParameterError) as error:
        bind_parameters(parameters, {"project": "p", "dataset_uri": "d.jsonl",
                                     "accelerator_type:": "GPU", "train_steps": "many"})
    message = str(error.value)
    assert "unknown parameter 'accelerator_type:' (did you mean 'accelerator_type'?)" in message
    assert "missing required parameter 'model_display_name'" in message
    assert "parameter 'train_steps'='many': expected an integer" in message


def test_request_body_values_are_converted_to_the_template_types():
    _, parameters = read_template(template_path("tune-large-model"))
    values = bind_parameters(parameters, {"project": "p", "model_display_name": "m", "dataset_uri": "d",
                                          "train_steps": "40", "enable_early_stopping": "false",
                                          "learning_rate_multiplier": 2, "evaluation_interval": 10.0})
    assert values["train_steps"] == 40 and values["enable_early_stopping"] is False
    assert values["learning_rate_multiplier"] == 2.0 and values["evaluation_interval"] == 10


def test_a_seed_request_body_is_read_as_is(tmp_path):
    body = {"displayName": "job", "runtimeConfig": {
        "gcsOutputDirectory": "gs://bucket/out",
        "parameterValues": {"project": "p", "model_display_name": "m", "dataset_uri": "gs://b/d.jsonl",
                            "location": "us-central1", "accelerator_type": "GPU"}},
        "encryptionSpec": {"kmsKeyName": "projects/p/keyRings/r/cryptoKeys/k"},
        "serviceAccount": "sa@p.iam.gserviceaccount.com",
        "templateUri": "https://us-kfp.pkg.dev/ml-pipeline/large-language-model-pipelines/tune-large-model/v2.0.0"}
    path = tmp_path / "request.json"
    path.write_text(json.dumps(body))
    request = request_from_file(path)
    assert request.template == template_path("tune-large-model")
    assert request.parameters["dataset_uri"] == "gs://b/d.jsonl"
    assert any("gcsOutputDirectory" in note for note in request.notes)
    assert (f"templateUri {body['templateUri']} names a registry template; the local runner runs "
            "tunepipe's template of the same name, compiled/tune-large-model.yaml") in request.notes

    body["runtimeConfig"]["parameterValue"] = {}
    path.write_text(json.dumps(body))
    with pytest.raises(ParameterError, match="unknown runtimeConfig fields \\['parameterValue'\\]"):
        request_from_file(path)
