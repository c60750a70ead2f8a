"""A teacher on Vertex AI: an endpoint or a publisher text model, through the REST predict API.

Resources: ``projects/P/locations/L/endpoints/E`` (a deployed model: tunepipe's own endpoints
answer the same shape) and ``projects/P/locations/L/publishers/google/models/M`` (e.g.
``text-unicorn@001``). Each request is one call, made with urllib (no aiplatform SDK needed)::

    POST {api_endpoint}/v1/{resource}:predict
    {"instances": [{"prompt": "<system and user message, blank-line separated>"}],
     "parameters": {"temperature": ..., "maxOutputTokens": ..., "topP": ..., "topK": ...}}

``topK`` is sent only when set (> 0). The answer is ``predictions[0].content`` (text models), or
``predictions[0].candidates[0].content`` (chat shape), or ``predictions[0]`` when it is a string;
token counts come from ``metadata.tokenMetadata`` when present.

``api_endpoint`` is ``$TUNEPIPE_VERTEX_API_ENDPOINT`` when set, else Google's
``https://{L}-aiplatform.googleapis.com`` (``https://aiplatform.googleapis.com`` for ``global``),
with ``L`` checked as a location ID first (:mod:`.outbound`). Only calls to Google's endpoint
carry an OAuth token from Application Default Credentials (``google.auth.default``, refreshed as
it expires); any other endpoint (a local stand-in such as a tunepipe endpoint or a test server)
gets none.
"""
from __future__ import annotations

import json
import threading

from components.generate_rationales.call_log import Completion
from components.generate_rationales.http_calls import (RetryPolicy, TeacherCallError, log_reply,
                                                       reason, request_json)
from components.generate_rationales.outbound import google_vertex_endpoint, vertex_api_endpoint
from components.generate_rationales.prompting import TeacherRequest
from components.generate_rationales.teachers import HttpTeacher, TeacherSettings

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


def resource_location(resource: str) -> str:
    """``L`` of ``projects/P/locations/L/...``."""
    return resource.split("/")[3]


def vertex_resource_url(resource: str) -> str:
    """``{api_endpoint}/v1/{resource}``: every call of the teacher goes under it."""
    return f"{vertex_api_endpoint(resource_location(resource))}/v1/{resource}"


class _AccessToken:
    """Application Default Credentials, refreshed when expired; shared by the call threads."""

    def __init__(self):
        import google.auth

        self._credentials, _ = google.auth.default(scopes=list(SCOPES))
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        from google.auth.transport.requests import Request

        with self._lock:
            if not self._credentials.valid:
                self._credentials.refresh(Request())
            return {"Authorization": f"Bearer {self._credentials.token}"}


class VertexTeacher(HttpTeacher):
    """``resource``: a full ``projects/.../endpoints/E`` or ``.../publishers/google/models/M``."""

    kind = "vertex"

    def __init__(self, resource: str, concurrency: int = 8, policy: RetryPolicy = RetryPolicy()):
        super().__init__(concurrency, policy)
        self.resource = resource
        location = resource_location(resource)
        endpoint = vertex_api_endpoint(location)
        self.url = f"{vertex_resource_url(resource)}:predict"
        self._token = _AccessToken() if endpoint == google_vertex_endpoint(location) else None
        self.identity = resource
        self.description = f"Vertex AI {resource} (predict at {endpoint})"

    def call(self, request: TeacherRequest, settings: TeacherSettings) -> Completion:
        parameters = {"temperature": settings.temperature,
                      "maxOutputTokens": settings.max_output_tokens, "topP": settings.top_p}
        if settings.top_k:
            parameters["topK"] = settings.top_k
        payload = {"instances": [{"prompt": request.prompt_text}], "parameters": parameters}
        headers = self._token.headers() if self._token else {}
        what = f"example {request.index} ({request.mode})"
        reply, attempts = request_json(self.url, payload, headers, self.policy, what)
        text = _prediction_text(reply)
        if text is None:
            log_reply(what, self.url, json.dumps(reply))
            raise TeacherCallError(f"{what}: {self.url} answered without predictions[0].content"
                                   f"{reason(reply)}")
        tokens = (reply.get("metadata") or {}).get("tokenMetadata") or {}
        return Completion(text, _total(tokens, "inputTokenCount"),
                          _total(tokens, "outputTokenCount"), attempts=attempts)


def _prediction_text(reply: dict) -> str | None:
    predictions = reply.get("predictions")
    if not isinstance(predictions, list) or not predictions:
        return None
    first = predictions[0]
    if isinstance(first, str):
        return first
    if isinstance(first, dict):
        if isinstance(first.get("content"), str):
            return first["content"]
        candidates = first.get("candidates")
        if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict) \
                and isinstance(candidates[0].get("content"), str):
            return candidates[0]["content"]
    return None


def _total(tokens: dict, name: str) -> int | None:
    value = (tokens.get(name) or {}).get("totalTokens")
    return value if isinstance(value, int) else None
