"""The deploy_endpoint component: serves the registered model on a local HTTP endpoint."""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def deploy_endpoint(
    registered_model: dsl.Input[dsl.Model],
    model_display_name: str,
    endpoint: dsl.Output[dsl.Artifact],
):
    """Deploys the registered model to an endpoint named ``model_display_name``.

    Locally the endpoint is a server process on 127.0.0.1 that outlives the pipeline run and
    answers Vertex-style predict requests; `tunepipe endpoints list|predict|stop` manage it. An
    endpoint of the same name is replaced.

    Args:
        registered_model: upload_model's registry entry.
        model_display_name: The endpoint's name (the model's display name).
        endpoint: A record of the endpoint: URL, process id, served model.
    """
    import json

    from components.deploy_endpoint.endpoints import start_endpoint

    running = start_endpoint(model_display_name, registered_model.metadata["registry_path"])
    endpoint.metadata.update({"name": running.name, "url": running.url,
                              "predict_url": running.predict_url, "pid": running.pid,
                              "model_dir": running.model_dir})
    with open(endpoint.path, "w") as out:
        json.dump(endpoint.metadata, out, indent=2)
    print(f"Endpoint {running.name} serving {running.model_dir} at {running.predict_url}")
