"""The targets a pipeline compiles for, and the tasks that differ on Vertex AI.

``portable``: the template the KFP local runner and open-source Kubeflow Pipelines run; every
task is a container of the project's image, the tuner's pod asks for the Kubernetes resources and
GKE node labels of ``accelerator_type`` (``CLUSTER_TUNING_ACCELERATORS``: GPU, 8
``nvidia.com/gpu`` on an A100 80GB node; TPU, the 4 ``google.com/tpu`` chips of one TPU v3 host,
since one pod cannot span Vertex's multi-host v3-64 slice; a ``tuning-accelerator`` task looks
them up at run time; the local runner ignores them), and upload_model and deploy_endpoint
register and serve the model (inside their own task on the local runner; as a model artifact and
a KServe InferenceService in a cluster).
``vertex``: the template for Vertex AI Pipelines; the tuner runs as a Vertex CustomJob on the
machine ``accelerator_type`` names, in that machine's region, and the selected checkpoint goes
to the Vertex Model Registry and a Vertex endpoint served by the project's image
(``components.deploy_endpoint.server`` honours Vertex's custom-container contract).
"""
from typing import NamedTuple

from kfp import dsl

from components.common.images import BASE_IMAGE
from components.deploy_endpoint.container import SERVING_COMMAND, SERVING_PORT

PORTABLE, VERTEX = "portable", "vertex"
TARGETS = (PORTABLE, VERTEX)


class Machine(NamedTuple):
    """A Vertex machine: type, accelerator and count, and the region it is found in."""

    machine_type: str
    accelerator_type: str
    accelerator_count: int
    region: str = ""


# Where tuning runs, by accelerator_type (docs/parameters.md, "Machines").
TUNING_MACHINES = {
    "GPU": Machine("a2-ultragpu-8g", "NVIDIA_A100_80GB", 8, "us-central1"),
    "TPU": Machine("cloud-tpu", "TPU_V3", 64, "europe-west4"),
}
SERVING_MACHINE = Machine("g2-standard-12", "NVIDIA_L4", 1)  # one replica per endpoint
PIPELINE_LOCATION = "{{$.pipeline_google_cloud_location}}"  # Vertex fills in the job's region


class PodAccelerators(NamedTuple):
    """A pod's accelerators on Kubernetes: the device plugin's resource name and count, and the
    node selector (GKE's node labels) of the nodes that have them."""

    resource_name: str
    resource_count: int
    node_selector: dict


# The portable template's tuner on a cluster, by accelerator_type: one KFP task is one pod on one
# node. GPU: the 8 A100 80GB of Vertex's machine. TPU: one TPU v3 host (GKE's ct3-hightpu-4t: 4
# chips, 8 TensorCores, a v3-8); Vertex's TPU_V3 x 64 is a 32-chip slice of 8 hosts, which one
# pod cannot span: the multi-host slice is the Vertex template's.
CLUSTER_TUNING_ACCELERATORS = {
    "GPU": PodAccelerators("nvidia.com/gpu", 8,
                           {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}),
    "TPU": PodAccelerators("google.com/tpu", 4,
                           {"cloud.google.com/gke-tpu-accelerator": "tpu-v3-device",
                            "cloud.google.com/gke-tpu-topology": "2x2"}),
}


def tune_as_custom_job(tune_inputs: dict, *, accelerator_type, project, encryption_spec_key_name,
                       tensorboard_resource_id):
    """The tune component as a Vertex CustomJob on the machine of ``accelerator_type`` (GPU or
    TPU, chosen at run time); returns its tuned model, whichever branch ran.

    The job runs as Vertex's default identity for custom code: Vertex's templates have no
    service account parameter and a pipeline cannot read its job's ``serviceAccount``.
    """
    from google_cloud_pipeline_components.v1.custom_job import (
        create_custom_training_job_from_component)

    from components.tune.component import tune

    def tune_on(accelerator: str):
        machine = TUNING_MACHINES[accelerator]
        custom_job = create_custom_training_job_from_component(
            tune, display_name="tune", machine_type=machine.machine_type,
            accelerator_type=machine.accelerator_type,
            accelerator_count=machine.accelerator_count)
        return custom_job(
            **tune_inputs, project=project, location=machine.region,
            encryption_spec_key_name=encryption_spec_key_name, tensorboard=tensorboard_resource_id,
        ).set_display_name(f"Tune ({machine.accelerator_count}x {machine.accelerator_type}, "
                           f"{machine.region})").set_caching_options(False)

    # The branches need an Else (dsl.OneOf); the check before them keeps it from taking any
    # other value (say "gpu") for TPU.
    checked = check_accelerator_type(accelerator=accelerator_type).set_display_name(
        "Check accelerator_type").set_caching_options(False)
    with dsl.If(accelerator_type == "GPU", name="tune-on-gpu"):
        on_gpu = tune_on("GPU").after(checked)
    with dsl.Else(name="tune-on-tpu"):
        on_tpu = tune_on("TPU").after(checked)
    return dsl.OneOf(on_gpu.outputs["tuned_model"], on_tpu.outputs["tuned_model"])


@dsl.component(base_image=BASE_IMAGE)
def check_accelerator_type(accelerator: str):
    """Fails the run unless ``accelerator`` is an accelerator type, spelled exactly."""
    from components.common.accelerators import check_accelerator_type as check

    check(accelerator)


@dsl.component(base_image=BASE_IMAGE)
def tuning_accelerator(
    accelerator: str, cluster_accelerators: dict,
) -> NamedTuple("TuningAccelerator", resource_name=str, resource_count=str, node_selector=dict):
    """The Kubernetes resource name, count and node selector of
    ``cluster_accelerators[accelerator]`` (``accelerator``: GPU or TPU); the count a string: KFP's
    driver reads a resource placeholder's value as a string."""
    from collections import namedtuple

    if accelerator not in cluster_accelerators:
        raise ValueError(f"accelerator_type must be one of {', '.join(cluster_accelerators)}, "
                         f"got {accelerator!r}")
    pod_accelerators = cluster_accelerators[accelerator]
    return namedtuple("TuningAccelerator", ["resource_name", "resource_count", "node_selector"])(
        pod_accelerators["resource_name"], pod_accelerators["resource_count"],
        pod_accelerators["node_selector"])


def tune_as_task(tune_inputs: dict, *, accelerator_type):
    """The tune component as a task of the template whose pod asks for ``accelerator_type``'s
    ``CLUSTER_TUNING_ACCELERATORS``: resource limit and node selector; returns its tuned model.

    A ``tuning_accelerator`` task maps accelerator_type to them at run time (the KFP local runner
    cannot join branch outputs, so no ``dsl.If`` and ``dsl.OneOf`` as on Vertex); open-source KFP
    (2.4 and later) fills the tuner's accelerator resource and node selector in from its outputs
    when it creates the pod. KFP's compiler also gives the tuner task inputs named
    ``accelerator_type`` and ``accelerator_count`` (the resource fields' names) holding those
    outputs, which is why the tune component's own input is ``accelerator``: one named
    ``accelerator_type`` would be replaced by the resource name.
    """
    from kfp import kubernetes

    from components.tune.component import tune

    cluster_accelerators = {
        accelerator: {**pod_accelerators._asdict(),
                      "resource_count": str(pod_accelerators.resource_count)}
        for accelerator, pod_accelerators in CLUSTER_TUNING_ACCELERATORS.items()}
    lookup = tuning_accelerator(accelerator=accelerator_type,
                                cluster_accelerators=cluster_accelerators)
    lookup.set_display_name("Tuning Accelerator")
    tuner = tune(**tune_inputs).set_display_name("Tune").set_caching_options(False)
    tuner.set_accelerator_type(lookup.outputs["resource_name"]).set_accelerator_limit(
        lookup.outputs["resource_count"])
    kubernetes.add_node_selector_json(tuner, node_selector_json=lookup.outputs["node_selector"])
    # Outputs used as resources make no dependency (kfp 2.17): without it the local runner and
    # KFP's DAG may start the tuner before the lookup has run.
    tuner.after(lookup)
    return tuner.outputs["tuned_model"]


@dsl.component(base_image=BASE_IMAGE)
def vertex_upload_settings(
    selected_model: dsl.Input[dsl.Model], location: str, pipeline_location: str,
) -> NamedTuple("UploadSettings", artifact_uri=str, location=str):
    """Where the selected checkpoint is (the model's artifact URI) and the upload region
    (``location``, else the pipeline job's region)."""
    from collections import namedtuple

    settings = namedtuple("UploadSettings", ["artifact_uri", "location"])
    return settings(selected_model.uri, location or pipeline_location)


def upload_and_deploy_on_vertex(selected_model, *, model_display_name, project, location,
                                encryption_spec_key_name) -> None:
    """Uploads the selected checkpoint to the Vertex Model Registry with the project's image as
    its serving container, and deploys it to a new Vertex endpoint of the same name."""
    from google_cloud_pipeline_components.types.artifact_types import UnmanagedContainerModel
    from google_cloud_pipeline_components.v1.endpoint import EndpointCreateOp, ModelDeployOp
    from google_cloud_pipeline_components.v1.model import ModelUploadOp

    settings = vertex_upload_settings(
        selected_model=selected_model, location=location, pipeline_location=PIPELINE_LOCATION,
    ).set_display_name("Upload Settings")
    serving_model = dsl.importer(
        artifact_uri=settings.outputs["artifact_uri"], artifact_class=UnmanagedContainerModel,
        metadata={"containerSpec": {"imageUri": BASE_IMAGE, "command": SERVING_COMMAND,
                                    "ports": [{"containerPort": SERVING_PORT}]}},
    ).set_display_name("Serving Container")
    region = settings.outputs["location"]
    uploaded = ModelUploadOp(
        project=project, location=region, display_name=model_display_name,
        unmanaged_container_model=serving_model.output,
        encryption_spec_key_name=encryption_spec_key_name,
    ).set_display_name("Upload Model")
    endpoint = EndpointCreateOp(
        project=project, location=region, display_name=model_display_name,
        encryption_spec_key_name=encryption_spec_key_name,
    ).set_display_name("Create Endpoint")
    ModelDeployOp(
        model=uploaded.outputs["model"], endpoint=endpoint.outputs["endpoint"],
        deployed_model_display_name=model_display_name, traffic_split={"0": 100},
        dedicated_resources_machine_type=SERVING_MACHINE.machine_type,
        dedicated_resources_accelerator_type=SERVING_MACHINE.accelerator_type,
        dedicated_resources_accelerator_count=SERVING_MACHINE.accelerator_count,
        dedicated_resources_min_replica_count=1, dedicated_resources_max_replica_count=1,
    ).set_display_name("Deploy Endpoint")
