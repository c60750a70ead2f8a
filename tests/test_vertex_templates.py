"""The Vertex templates: the tuner as a Vertex CustomJob on the accelerator's machine and region,
CMEK passed through, the model uploaded and deployed with the project's image."""
from __future__ import annotations

import pytest
import yaml

from pipelines.templates import (COMPILED_DIR, VERTEX_SUBDIR, compile_all, pipeline_spec,
                                 template_path)

PIPELINES = ("tune-large-model", "tune-large-chat-model")
BRANCHES = {  # accelerator_type -> (machine_type, accelerator_type, count, region)
    "GPU": ("a2-ultragpu-8g", "NVIDIA_A100_80GB", 8, "us-central1"),
    "TPU": ("cloud-tpu", "TPU_V3", 64, "europe-west4"),
}


def _vertex_template(name: str) -> dict:
    return yaml.safe_load((COMPILED_DIR / VERTEX_SUBDIR / f"{name}.yaml").read_text())


def _tune_branches(spec: dict) -> dict[str, dict]:
    """accelerator_type -> the tune CustomJob task of the branch that runs for it."""
    branches = {}
    for component in spec["components"].values():
        for task in component.get("dag", {}).get("tasks", {}).values():
            if task["taskInfo"]["name"].startswith("Tune ("):
                accelerator = "TPU" if "TPU" in task["taskInfo"]["name"] else "GPU"
                branches[accelerator] = task
    return branches


@pytest.mark.parametrize("name", PIPELINES)
def test_the_tuner_is_a_custom_job_on_the_accelerator_s_machine(name):
    spec = _vertex_template(name)
    branches = _tune_branches(spec)
    assert set(branches) == {"GPU", "TPU"}
    for accelerator, (machine_type, accelerator_type, count, region) in BRANCHES.items():
        task = branches[accelerator]
        component = spec["components"][task["componentRef"]["name"]]
        pool, = component["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]
        assert pool["machine_spec"] == {"machine_type": machine_type,
                                        "accelerator_type": accelerator_type,
                                        "accelerator_count": count}
        assert pool["container_spec"]["image_uri"] == "ghcr.io/tunepipe/tunepipe:0.1.0"
        executor = spec["deploymentSpec"]["executors"][component["executorLabel"]]
        assert "google_cloud_pipeline_components.container.v1.custom_job" in \
            " ".join(executor["container"]["command"] + executor["container"]["args"])
        inputs = task["inputs"]["parameters"]
        assert inputs["location"] == {"runtimeValue": {"constant": region}}
        for name_on_job, parameter in (("encryption_spec_key_name", "encryption_spec_key_name"),
                                       ("tensorboard", "tensorboard_resource_id"),
                                       ("project", "project")):
            assert inputs[name_on_job] == {
                "componentInputParameter": f"pipelinechannel--{parameter}"}
    conditions = [task["triggerPolicy"]["condition"]
                  for component in spec["components"].values()
                  for task in component.get("dag", {}).get("tasks", {}).values()
                  if "triggerPolicy" in task]
    assert conditions[0] == "inputs.parameter_values['pipelinechannel--accelerator_type'] == 'GPU'"
    assert conditions[1].startswith("!(")  # the TPU branch: dsl.Else


@pytest.mark.parametrize("name", PIPELINES)
def test_the_model_goes_to_the_vertex_registry_and_an_endpoint(name):
    spec = _vertex_template(name)
    tasks = spec["root"]["dag"]["tasks"]
    assert {"model-upload", "endpoint-create", "model-deploy"} <= set(tasks)
    for task in ("model-upload", "endpoint-create"):
        assert tasks[task]["inputs"]["parameters"]["encryption_spec_key_name"] == {
            "componentInputParameter": "encryption_spec_key_name"}
    serving = spec["deploymentSpec"]["executors"]["exec-importer"]["importer"]["metadata"]
    assert serving["containerSpec"]["imageUri"] == "ghcr.io/tunepipe/tunepipe:0.1.0"
    assert serving["containerSpec"]["command"][-1] == "components.deploy_endpoint.server"
    assert "upload-model" not in tasks and "deploy-endpoint" not in tasks  # the local ones


def test_vertex_and_portable_templates_take_the_same_parameters():
    for name in PIPELINES:
        portable = pipeline_spec(template_path(name))
        assert _vertex_template(name)["root"]["inputDefinitions"] == \
            portable["root"]["inputDefinitions"]


def test_compile_writes_the_image_given(tmp_path):
    image = "europe-docker.pkg.dev/p/r/tunepipe:test"
    for path in compile_all(tmp_path, image=image):
        text = path.read_text()
        assert image in text and "ghcr.io/tunepipe/tunepipe" not in text, path
