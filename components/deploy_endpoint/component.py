"""The deploy_endpoint component: serves the registered model on an HTTP endpoint, locally or
from a KServe InferenceService in a Kubeflow Pipelines cluster."""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def deploy_endpoint(
    registered_model: dsl.Input[dsl.Model],
    model_display_name: str,
    serving_image: str,
    endpoint: dsl.Output[dsl.Artifact],
):
    """Deploys the registered model to an endpoint named ``model_display_name``.

    Locally the endpoint is a server process on 127.0.0.1 that outlives the pipeline run and
    answers Vertex-style predict requests; `tunepipe endpoints list|predict|stop` manage it. An
    endpoint of the same name is replaced.

    In a Kubeflow Pipelines cluster it is a KServe InferenceService in the task's namespace,
    named after ``model_display_name``, whose predictor runs the server in ``serving_image``
    on the registered model's artifact URI; one of the same name is replaced, and the task
    waits until it is Ready (``components.deploy_endpoint.kserve``).

    Args:
        registered_model: upload_model's registered model.
        model_display_name: The endpoint's name (the model's display name).
        serving_image: The image a cluster endpoint runs: the template's own image.
        endpoint: A record of the endpoint: URL, served model, and locally the process id; in a
            cluster a folder with ``endpoint.json`` and the ``inferenceservice.yaml`` applied.
    """
    import json

    from components.common.cluster import in_kfp_cluster

    if in_kfp_cluster():
        from components.deploy_endpoint.kserve import deploy_inference_service

        record = deploy_inference_service(model_display_name, registered_model.uri,
                                          serving_image, endpoint.path)
        endpoint.metadata.update(record)
        print(f"Endpoint {record['name']} (InferenceService in {record['namespace']}) serving "
              f"{record['model_uri']} at {record['predict_url']}")
        return
    from components.deploy_endpoint.endpoints import start_endpoint

    running = start_endpoint(model_display_name, registered_model.metadata["registry_path"])
    endpoint.metadata.update({"name": running.name, "url": running.url,
                              "predict_url": running.predict_url, "pid": running.pid,
                              "model_dir": running.model_dir})
    with open(endpoint.path, "w") as out:
        json.dump(endpoint.metadata, out, indent=2)
    print(f"Endpoint {running.name} serving {running.model_dir} at {running.predict_url}")
