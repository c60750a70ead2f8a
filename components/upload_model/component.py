"""The upload_model component: registers the selected checkpoint in the model registry."""
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

    Args:
        selected_model: The checkpoint select_checkpoint chose (a tuned model folder).
        validated_dataset: The validated training data, hashed for provenance.
        evaluation_results: evaluate's results (``results.json``), recorded as metrics.
        model_display_name: Display name of the uploaded model.
        project: Project id, recorded.
        location: Model upload region, recorded.
        dataset_uri: The training data's URI, recorded.
        registered_model: The registry entry; its metadata names the version and path.
    """
    import os

    from components.common.model_registry import register_model
    from components.upload_model.registration import evaluation_summary, file_sha256

    entry = register_model(selected_model.path, model_display_name, {
        "project": project,
        "location": location,
        "dataset_uri": dataset_uri,
        "dataset_sha256": file_sha256(os.path.join(validated_dataset.path, "train.jsonl")),
        "evaluation": evaluation_summary(os.path.join(evaluation_results.path, "results.json")),
    })
    registered_model.metadata.update({"display_name": entry.display_name,
                                      "version": entry.version,
                                      "registry_path": str(entry.path)})
    with open(registered_model.path, "w") as out:
        out.write(str(entry.path) + "\n")
    print(f"Registered {entry.resource_name} at {entry.path}")
