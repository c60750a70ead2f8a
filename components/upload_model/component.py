"""The upload_model component: registers the selected checkpoint in the model registry, or in
a Kubeflow Pipelines cluster stores it as its output artifact."""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def upload_model(
    selected_model: dsl.Input[dsl.Model],
    validated_dataset: dsl.Input[dsl.Dataset],
    evaluation_results: dsl.Input[dsl.Artifact],
    model_display_name: str,
    project: str,
    location: str,
    dataset_uri: str,
    registered_model: dsl.Output[dsl.Model],
):
    """Uploads the selected checkpoint to the model registry under ``model_display_name``.

    Locally the registry is ``$TUNEPIPE_HOME/registry/<model_display_name>/<version>/``: the LoRA
    adapter, the tokenizer and ``tunepipe_model.json`` (base checkpoint, tuning parameters,
    dataset hash, evaluation metrics, project and region).

    In a Kubeflow Pipelines cluster that registry would vanish with the task's pod: the same
    folder (without a version) is the ``registered_model`` artifact itself, which KFP uploads
    to its URI under the pipeline root (``gs://``, ``s3://`` or ``minio://``); its metadata
    names that URI (``model_uri``), which deploy_endpoint serves.

    Args:
        selected_model: The checkpoint select_checkpoint chose (a tuned model folder).
        validated_dataset: The validated training data, hashed for provenance.
        evaluation_results: evaluate's results (``results.json``), recorded as metrics.
        model_display_name: Display name of the uploaded model.
        project: Project id, recorded.
        location: Model upload region, recorded.
        dataset_uri: The training data's URI, recorded.
        registered_model: The registry entry; its metadata names the version and path (in a
            cluster: the model folder; its metadata names its URI).
    """
    from components.common.cluster import in_kfp_cluster
    from components.common.model_registry import export_model, register_model
    from components.upload_model.registration import dataset_sha256, evaluation_summary

    provenance = {
        "project": project,
        "location": location,
        "dataset_uri": dataset_uri,
        "dataset_sha256": dataset_sha256(validated_dataset.path),
        "evaluation": evaluation_summary(evaluation_results.path),
    }
    if in_kfp_cluster():
        export_model(selected_model.path, registered_model.path, model_display_name, provenance)
        registered_model.metadata.update({"display_name": model_display_name,
                                          "model_uri": registered_model.uri})
        print(f"Stored {model_display_name} at {registered_model.uri}")
        return
    entry = register_model(selected_model.path, model_display_name, provenance)
    registered_model.metadata.update({"display_name": entry.display_name,
                                      "version": entry.version,
                                      "registry_path": str(entry.path)})
    with open(registered_model.path, "w") as out:
        out.write(str(entry.path) + "\n")
    print(f"Registered {entry.resource_name} at {entry.path}")
