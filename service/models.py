"""models: list and get the local model registry's models as Vertex Model resources.

Every registered display name is one model; its latest version answers unless the ID names one
(``models/ID@2``). A model's ID is a number derived from its display name
(:func:`resource_id`), stable across restarts and machines; the display name itself is accepted
as an ID too. The registry is this machine's, so it answers under every project and location.
"""
from __future__ import annotations

import hashlib

from components.common.model_registry import RegisteredModel, get_model, list_models
from service.http_api import ApiError, Call, Route, paginate, route
from service.records import timestamp


def resource_id(display_name: str) -> str:
    """The numeric resource ID of a local model or endpoint (Vertex IDs are int64 numbers)."""
    digest = hashlib.sha256(display_name.encode()).digest()
    return str(int.from_bytes(digest[:8], "big") >> 1)


def model_name(parent: str, display_name: str) -> str:
    """The resource name of a registered model under ``parent``."""
    return f"{parent}/models/{resource_id(display_name)}"


def model_resource(parent: str, model: RegisteredModel) -> dict:
    """The Vertex Model resource of one registered model version."""
    created = timestamp(model.path.stat().st_mtime)
    return {"name": model_name(parent, model.display_name), "displayName": model.display_name,
            "versionId": str(model.version), "versionAliases": ["default"],
            "artifactUri": str(model.path), "createTime": created, "updateTime": created,
            "versionCreateTime": created, "versionUpdateTime": created}


def find_model(model_id: str) -> RegisteredModel:
    """The registered model an ID (number or display name, ``@VERSION`` optional) names;
    ApiError 404 when none."""
    wanted, separator, version = model_id.rpartition("@")
    if not separator or not version.isdigit():
        wanted, version = model_id, ""
    for model in list_models():
        if wanted in (model.display_name, resource_id(model.display_name)):
            try:
                return get_model(model.display_name, int(version) if version else None)
            except LookupError as error:
                raise ApiError(404, str(error)) from None
    raise ApiError(404, f"model {model_id} not found in the local registry (registered: "
                        f"{', '.join(m.display_name for m in list_models()) or 'none'})")


class Models:
    """The models collection."""

    def routes(self) -> list[Route]:
        return [route("GET", "{parent}/models", self.list, ("pageSize", "pageToken")),
                route("GET", "{parent}/models/{id}", self.get)]

    def list(self, call: Call) -> dict:
        """The latest version of every registered model."""
        return paginate([model_resource(call.parent, m) for m in list_models()], call.query,
                        "models")

    def get(self, call: Call) -> dict:
        """One model (version)."""
        return model_resource(call.parent, find_model(call.params["id"]))
