"""endpoints: the running local endpoints as Vertex Endpoint resources, and their predictions.

    GET  {parent}/endpoints, {parent}/endpoints/{id}
    POST {parent}/endpoints/{id}:predict          text and chat shapes, as the endpoint answers
    POST {parent}/endpoints/{id}:generateContent  Gemini's shape, as a chat prediction
    POST {parent}/endpoints/{id}:streamGenerateContent  the same, streamed
    POST /v1/chat/completions, /v1/completions    OpenAI's shapes; "model" names the endpoint
    GET  /v1/models                               OpenAI's list: the running endpoints

The model stays in its endpoint's process (``components/deploy_endpoint``): the service checks
the request's fields, forwards it, and shapes the answer. An endpoint's ID is derived from its
name as a model's is (:func:`service.models.resource_id`); the name is accepted as an ID too.

generateContent: ``contents`` turns (``user``, ``model``, alternating, ending with ``user``; text
parts only, concatenated), ``systemInstruction`` (the chat context), ``generationConfig``
{temperature, topP, topK, maxOutputTokens, candidateCount 1}. The answer has one candidate
and ``usageMetadata``; its ``finishReason`` is MAX_TOKENS when the reply used every allowed
token, else STOP.

streamGenerateContent: the same request, answered as the endpoint decodes it (the endpoint's
OpenAI stream, reshaped): ``GenerateContentResponse`` chunks of text, the last with the
``finishReason`` and ``usageMetadata``; server-sent events (``data: {...}``) with ``?alt=sse``,
as google-genai asks, else one JSON array sent as it grows. OpenAI requests with ``"stream":
true`` are streamed through as the endpoint streams them. A client that goes away closes the
stream from the endpoint, which frees its rows.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from http.client import HTTPResponse
from pathlib import Path
from typing import Iterator

from components.common.paths import endpoints_dir, registry_dir
from components.deploy_endpoint.endpoints import Endpoint, list_endpoints
from components.deploy_endpoint.server import DEFAULT_PARAMETERS
from service.http_api import ApiError, Call, Route, Stream, check_fields, paginate, route
from service.models import model_name, resource_id
from service.records import timestamp

PREDICT_TIMEOUT_SECONDS = 600
PREDICT_FIELDS = {"instances", "parameters"}
GENERATE_FIELDS = {"contents", "systemInstruction", "generationConfig"}
GENERATION_CONFIG_FIELDS = {"temperature", "topP", "topK", "maxOutputTokens", "candidateCount"}
GEMINI_AUTHORS = {"user": "user", "model": "assistant"}
INTEGER_PARAMETERS = ("maxOutputTokens", "topK")
GEMINI_FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS"}
OPENAI_ROLES = {"user": "user", "assistant": "assistant"}  # a chat instance's authors


def _started(endpoint: Endpoint) -> float:
    """When the endpoint started: the time its record was written."""
    return (endpoints_dir() / f"{endpoint.name}.json").stat().st_mtime


def endpoint_name(parent: str, name: str) -> str:
    """The resource name of the local endpoint ``name`` under ``parent``."""
    return f"{parent}/endpoints/{resource_id(name)}"


def endpoint_resource(parent: str, endpoint: Endpoint) -> dict:
    """The Vertex Endpoint resource of a running local endpoint, its one deployed model
    included (with its registry model when it serves one)."""
    created = timestamp(_started(endpoint))
    deployed = {"id": resource_id(endpoint.name), "displayName": endpoint.name,
                "createTime": created}
    model_dir = Path(endpoint.model_dir).resolve()
    if model_dir.parent.parent == registry_dir().resolve() and model_dir.name.isdigit():
        deployed.update(model=model_name(parent, model_dir.parent.name),
                        modelVersionId=model_dir.name)
    return {"name": endpoint_name(parent, endpoint.name),
            "displayName": endpoint.name, "deployedModels": [deployed],
            "trafficSplit": {deployed["id"]: 100}, "createTime": created, "updateTime": created}


def find_endpoint(endpoint_id: str) -> Endpoint:
    """The running endpoint an ID (number or name) names; ApiError 404 when none."""
    running = list_endpoints()
    for endpoint in running:
        if endpoint_id in (endpoint.name, resource_id(endpoint.name)):
            return endpoint
    raise ApiError(404, f"endpoint {endpoint_id} not found among the running endpoints "
                        f"({', '.join(e.name for e in running) or 'none'})")


def forward(endpoint: Endpoint, path: str, body: dict) -> dict:
    """POSTs ``body`` to the endpoint's ``path``; its JSON answer, or its refusal as ApiError."""
    with _post(endpoint, path, body) as response:
        return json.loads(response.read())


def forward_events(endpoint: Endpoint, path: str, body: dict) -> Iterator[str]:
    """POSTs ``body`` (a streamed request) to the endpoint's ``path``; the ``data`` of each
    server-sent event it answers, as it comes. Raises the endpoint's refusal as ApiError, at
    once; closing the iterator closes the connection (the endpoint frees the request's rows)."""
    response = _post(endpoint, path, body)

    def events() -> Iterator[str]:
        with response:
            for line in response:
                if line.startswith(b"data: "):
                    yield line[len(b"data: "):].decode().rstrip("\r\n")

    return events()


def _post(endpoint: Endpoint, path: str, body: dict) -> HTTPResponse:
    """The endpoint's answer to ``body`` at ``path``, unread; its refusal as ApiError."""
    if not endpoint.url:
        raise ApiError(503, f"endpoint {endpoint.name} is still starting; try again shortly "
                            f"(its log: {endpoint.log})")
    request = urllib.request.Request(endpoint.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=PREDICT_TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read()).get("error")
        except ValueError:
            detail = None
        message = detail.get("message") if isinstance(detail, dict) else detail
        raise ApiError(error.code, message or f"endpoint {endpoint.name} answered {error.code}")
    except (urllib.error.URLError, OSError) as error:
        raise ApiError(503, f"endpoint {endpoint.name} at {endpoint.url} does not answer "
                            f"({error}); its log: {endpoint.log}") from None


def integral(parameters: object) -> object:
    """Generation parameters with whole floats made integers where the endpoint expects
    integers: the SDK sends ``parameters`` as a protobuf Value, whose numbers are doubles
    (``maxOutputTokens`` 4 arrives as 4.0), and Gemini's ``topK`` is a float."""
    if not isinstance(parameters, dict):
        return parameters
    return {name: int(value) if name in INTEGER_PARAMETERS and isinstance(value, float)
            and value.is_integer() else value for name, value in parameters.items()}


def _text(parts: object, where: str) -> str:
    """The concatenated text of a Gemini ``parts`` list; ApiError 400 for other parts."""
    if not isinstance(parts, list) or not parts:
        raise ApiError(400, f'{where} must be a non-empty list of {{"text": "..."}}')
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or set(part) != {"text"} or not isinstance(part["text"], str):
            raise ApiError(400, f'{where}[{index}] must be {{"text": "..."}}: local endpoints '
                                "answer text only")
    return "".join(part["text"] for part in parts)


def chat_request(body: dict) -> dict:
    """The endpoint's chat predict request for a generateContent body."""
    check_fields(body, GENERATE_FIELDS, "the request")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise ApiError(400, 'contents must be a non-empty list of {"role": "user"|"model", '
                            '"parts": [{"text": "..."}]}')
    messages = []
    for index, content in enumerate(contents):
        if not isinstance(content, dict):
            raise ApiError(400, f"contents[{index}] must be an object")
        check_fields(content, {"role", "parts"}, f"contents[{index}]")
        role = content.get("role", "user")
        expected = "user" if index % 2 == 0 else "model"
        if role != expected:
            raise ApiError(400, f'contents[{index}].role must be "{expected}": turns alternate '
                                '"user" and "model", starting with "user"')
        messages.append({"author": GEMINI_AUTHORS[role],
                         "content": _text(content.get("parts"), f"contents[{index}].parts")})
    if messages[-1]["author"] != "user":
        raise ApiError(400, 'contents must end with a "user" turn, the one to answer')
    instance: dict = {"messages": messages}
    if "systemInstruction" in body:
        instruction = body["systemInstruction"]
        if not isinstance(instruction, dict):
            raise ApiError(400, 'systemInstruction must be {"parts": [{"text": "..."}]}')
        check_fields(instruction, {"role", "parts"}, "systemInstruction")
        instance["context"] = _text(instruction.get("parts"), "systemInstruction.parts")
    config = body.get("generationConfig", {})
    if not isinstance(config, dict):
        raise ApiError(400, "generationConfig must be an object")
    check_fields(config, GENERATION_CONFIG_FIELDS, "generationConfig")
    if config.get("candidateCount", 1) != 1:
        raise ApiError(400, "generationConfig.candidateCount: local endpoints answer one "
                            "candidate")
    parameters = {name: config[name] for name in ("temperature", "topP", "topK",
                                                  "maxOutputTokens") if name in config}
    return {"instances": [instance], "parameters": integral(parameters)}


def generate_content_reply(request: dict, reply: dict) -> dict:
    """Gemini's answer from the endpoint's answer to :func:`chat_request`'s request."""
    text = reply["predictions"][0]["candidates"][0]["content"]
    tokens = reply["metadata"]["tokenMetadata"]
    prompt = tokens["inputTokenCount"]["totalTokens"]
    output = tokens["outputTokenCount"]["totalTokens"]
    limit = request["parameters"].get("maxOutputTokens", DEFAULT_PARAMETERS["maxOutputTokens"])
    return {"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"text": text}]},
                            "finishReason": "MAX_TOKENS" if output >= limit else "STOP"}],
            "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": output,
                              "totalTokenCount": prompt + output}}


def openai_chat_body(endpoint: Endpoint, request: dict) -> dict:
    """The endpoint's streamed OpenAI chat request for :func:`chat_request`'s request, with
    the parameters generateContent answers with (the endpoint's ``/predict`` defaults)."""
    instance = request["instances"][0]
    parameters = {**DEFAULT_PARAMETERS, **request["parameters"]}
    context = [{"role": "system", "content": instance["context"]}] if "context" in instance else []
    return {"model": endpoint.name, "stream": True, "stream_options": {"include_usage": True},
            "messages": context + [{"role": OPENAI_ROLES[m["author"]], "content": m["content"]}
                                   for m in instance["messages"]],
            "temperature": parameters["temperature"], "top_p": parameters["topP"],
            "top_k": parameters["topK"], "max_tokens": parameters["maxOutputTokens"]}


def gemini_chunks(events: Iterator[str]) -> Iterator[dict]:
    """``GenerateContentResponse`` chunks from the endpoint's OpenAI chat stream: the text as
    it comes, then the finish reason with the usage."""
    finish_reason = "STOP"
    for data in events:
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            yield ApiError(500, chunk["error"]["message"]).body()
            return
        for choice in chunk["choices"]:
            text = choice["delta"].get("content")
            if text:
                yield {"candidates": [{"index": 0, "content": {"role": "model",
                                                               "parts": [{"text": text}]}}]}
            if choice["finish_reason"]:
                finish_reason = GEMINI_FINISH_REASONS[choice["finish_reason"]]
        if chunk.get("usage"):
            usage = chunk["usage"]
            yield {"candidates": [{"index": 0, "content": {"role": "model",
                                                           "parts": [{"text": ""}]},
                                   "finishReason": finish_reason}],
                   "usageMetadata": {"promptTokenCount": usage["prompt_tokens"],
                                     "candidatesTokenCount": usage["completion_tokens"],
                                     "totalTokenCount": usage["total_tokens"]}}


def _server_sent(chunks: Iterator[dict]) -> Iterator[bytes]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\r\n\r\n".encode()


def _json_array(chunks: Iterator[dict]) -> Iterator[bytes]:
    separator = b"["
    for chunk in chunks:
        yield separator + json.dumps(chunk).encode()
        separator = b",\r\n"
    yield b"[]" if separator == b"[" else b"]"


class Endpoints:
    """The endpoints collection and the prediction routes."""

    def routes(self) -> list[Route]:
        return [route("GET", "{parent}/endpoints", self.list, ("pageSize", "pageToken")),
                route("GET", "{parent}/endpoints/{id}", self.get),
                route("POST", "{parent}/endpoints/{id}:predict", self.predict),
                route("POST", "{parent}/endpoints/{id}:generateContent", self.generate_content),
                route("POST", "{parent}/endpoints/{id}:streamGenerateContent",
                      self.stream_generate_content),
                route("POST", "/v1/chat/completions", self.chat_completions),
                route("POST", "/v1/completions", self.completions),
                route("GET", "/v1/models", self.openai_models)]

    def list(self, call: Call) -> dict:
        """The running endpoints."""
        return paginate([endpoint_resource(call.parent, e) for e in list_endpoints()],
                        call.query, "endpoints")

    def get(self, call: Call) -> dict:
        """One running endpoint."""
        return endpoint_resource(call.parent, find_endpoint(call.params["id"]))

    def predict(self, call: Call) -> dict:
        """A text or chat prediction, as the endpoint answers it, with Vertex's model fields."""
        check_fields(call.body, PREDICT_FIELDS, "the request")
        endpoint = find_endpoint(call.params["id"])
        deployed = endpoint_resource(call.parent, endpoint)["deployedModels"][0]
        body = {**call.body, **({"parameters": integral(call.body["parameters"])}
                                if "parameters" in call.body else {})}
        reply = forward(endpoint, "/predict", body)
        reply.update(deployedModelId=deployed["id"], modelDisplayName=endpoint.name,
                     **({"model": deployed["model"], "modelVersionId": deployed["modelVersionId"]}
                        if "model" in deployed else {}))
        return reply

    def generate_content(self, call: Call) -> dict:
        """Gemini's generateContent, answered as a chat prediction."""
        request = chat_request(call.body)
        reply = forward(find_endpoint(call.params["id"]), "/predict", request)
        return generate_content_reply(request, reply)

    def stream_generate_content(self, call: Call) -> Stream:
        """Gemini's streamGenerateContent: generateContent's answer as it is decoded."""
        endpoint = find_endpoint(call.params["id"])
        events = forward_events(endpoint, "/v1/chat/completions",
                                openai_chat_body(endpoint, chat_request(call.body)))
        if call.query.get("alt") == "sse":
            return Stream(_server_sent(gemini_chunks(events)), "text/event-stream")
        return Stream(_json_array(gemini_chunks(events)), "application/json")

    def chat_completions(self, call: Call) -> dict | Stream:
        """OpenAI's chat completions; ``model`` names the endpoint (name or ID)."""
        return self._openai(call, "/v1/chat/completions")

    def completions(self, call: Call) -> dict | Stream:
        """OpenAI's (legacy) completions; ``model`` names the endpoint (name or ID)."""
        return self._openai(call, "/v1/completions")

    def _openai(self, call: Call, path: str) -> dict | Stream:
        """An OpenAI request forwarded to the endpoint ``model`` names, streamed when asked."""
        model = call.body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model must name a running endpoint (GET /v1/models lists them)")
        endpoint = find_endpoint(model)
        body = {**call.body, "model": endpoint.name}
        if call.body.get("stream") is not True:
            return forward(endpoint, path, body)
        events = forward_events(endpoint, path, body)
        return Stream((f"data: {data}\n\n".encode() for data in events), "text/event-stream")

    def openai_models(self, call: Call) -> dict:
        """OpenAI's model list: one model per running endpoint."""
        return {"object": "list",
                "data": [{"id": e.name, "object": "model", "owned_by": "tunepipe",
                          "created": int(_started(e))} for e in list_endpoints()]}
