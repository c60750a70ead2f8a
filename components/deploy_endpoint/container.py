"""The project's image as a serving container: its command, port, routes and environment.

``components.deploy_endpoint.server`` follows Vertex AI's custom-container contract: with
``AIP_HTTP_PORT`` set it serves the model at ``AIP_STORAGE_URI`` on that port. Vertex sets that
environment itself (:mod:`pipelines.vertex` names the command and port); a KServe predictor is
given it (:mod:`components.deploy_endpoint.kserve`).
"""
from __future__ import annotations

SERVING_COMMAND = ["python", "-m", "components.deploy_endpoint.server"]
SERVING_PORT = 8080
HEALTH_ROUTE = "/health"  # the server answers health on any GET but /v1/models
PREDICT_ROUTE = "/predict"


def serving_environment(storage_uri: str) -> dict[str, str]:
    """The ``AIP_*`` environment that has the server serve the model at ``storage_uri``."""
    return {"AIP_HTTP_PORT": str(SERVING_PORT), "AIP_STORAGE_URI": storage_uri,
            "AIP_HEALTH_ROUTE": HEALTH_ROUTE, "AIP_PREDICT_ROUTE": PREDICT_ROUTE}
