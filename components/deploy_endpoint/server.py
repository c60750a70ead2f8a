"""A local prediction endpoint: one tuned model behind a Vertex-style HTTP API on loopback.

    POST /predict   (also any path ending in ``:predict``, as Vertex's REST paths do)

    text:  {"instances": [{"prompt": "..."}], "parameters": {"temperature": 0.0,
            "maxOutputTokens": 128, "topP": 0.95, "topK": 40}}
        -> {"predictions": [{"content": "..."}], "deployedModelId": ..., "metadata": {...}}
    chat:  {"instances": [{"context": "...",
                           "examples": [{"input": {"content": "..."},
                                         "output": {"content": "..."}}],
                           "messages": [{"author": "user", "content": "..."}, ...]}],
            "parameters": {...}}
        -> {"predictions": [{"candidates": [{"author": "assistant", "content": "..."}]}], ...}

    An instance with ``messages`` (or ``context``, ``examples``) is chat; one request holds one
    shape. Messages alternate ``user`` and ``assistant`` (``bot``, the Vertex SDK's name, is
    accepted), starting and ending with the user. The prompt is the model's chat template over
    the context (system turn), the examples (prior user and assistant turns) and the messages,
    as training formats chat data. Candidates are authored ``assistant`` (chat-bison answers
    ``"1"``), so a candidate can be appended to ``messages`` as it is.

    POST /v1/chat/completions   (OpenAI-compatible)
    {"model": NAME, "messages": [{"role": "system"|"user"|"assistant", "content": "..."}],
     "temperature": 1.0, "max_tokens": 128, "top_p": 1.0, "n": 1, "seed": 0, "stream": false}
        -> {"id", "object": "chat.completion", "created", "model", "choices": [{"index": 0,
            "message": {"role": "assistant", "content"}, "finish_reason": "stop"|"length"}],
            "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    POST /v1/completions   (OpenAI's legacy completions)
    {"model": NAME, "prompt": "...", ...the same parameters}
        -> {"id", "object": "text_completion", "created", "model", "choices": [{"text",
            "index": 0, "finish_reason", "logprobs": null}], "usage": {...}}
    Omitted fields take OpenAI's defaults, except ``max_tokens`` (128, as ``/predict``);
    ``top_k`` (0: off) is accepted besides, as vLLM accepts it. The prompt of ``/v1/completions``
    is formatted as ``/predict``'s text prompt (the chat template, as training formats it).

    With ``"stream": true`` both answer server-sent events, as OpenAI streams: ``data: {chunk}``
    (``"object": "chat.completion.chunk"``: a first ``delta`` with the role, then the text as
    it is decoded, then an empty ``delta`` with the ``finish_reason``; completions: ``text``
    pieces), a chunk with ``usage`` (and no choices) when ``"stream_options": {"include_usage":
    true}``, then ``data: [DONE]``. Text pieces are whole characters. A client that closes the
    connection frees its rows in the batch at the next decode step.

    GET /v1/models  -> the one model served, OpenAI-style
    GET /           -> health and model information

A model trained with an input prefix (a distillation student: ``input_prefix`` in its
``tunepipe_model.json``, ``[label] ``) gets it prepended to every prompt, the text shape's
``prompt`` and the last user message of a chat or OpenAI request, as it was trained: the
student answers with the label, without a rationale.

A bad request is answered 400 with what was expected: ``{"error": "..."}`` on ``/predict``,
``{"error": {"message": "...", "type": "invalid_request_error"}}`` on the OpenAI routes.

The server is :mod:`components.common.http_server`'s: bodies, slow clients, connections and
requests at once are bounded, and requests from web pages are refused (403; a body that is not
``Content-Type: application/json``: 415), on loopback a ``Host`` other than its own too.

Requests are generated together: every route queues its request to one generation worker, which
decodes all of them in one batch that requests join and leave between decode steps
(``components.deploy_endpoint.batching``; ``--max-batch-rows``, ``--no-batching``). A request
that finds ``--max-queued`` requests already waiting is answered 503 at once, with
``Retry-After: 1`` and ``{"error": "the endpoint is busy: ..."}`` (OpenAI routes: ``"type":
"server_error"``); ``GET /`` shows the batching settings and load under ``batching``. Prompts
that start as recent ones (every chat prompt's system turn, a conversation's earlier turns)
reuse their keys and values (``components.common.prefix_cache``; ``--prefix-cache-mb``).

Run it with ``python -m components.deploy_endpoint.server --name N --model-dir D --ready-file F``;
it binds a free port on 127.0.0.1 and writes ``{"port": ...}`` to the ready file once it serves.

As a Vertex AI custom serving container (``AIP_HTTP_PORT`` set, as Vertex sets it) it follows
Vertex's contract instead: it downloads the model from ``AIP_STORAGE_URI`` (``gs://`` or a local
path), binds 0.0.0.0:``AIP_HTTP_PORT``, answers health checks on ``AIP_HEALTH_ROUTE`` (any GET
but ``/v1/models``) and predict requests on ``AIP_PREDICT_ROUTE`` as on ``/predict``; the
model's name is ``--name`` or else ``AIP_DEPLOYED_MODEL_ID``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from components.common.http_server import (App, HttpError, HttpServer, Limits, RequestGuard,
                                           check_json_value, read_json_body, request_headers,
                                           send_json, start_stream, until_disconnected)
from components.common.prompts import chat_messages

if TYPE_CHECKING:
    from components.common.generation import Generation, SamplingParams

DEFAULT_PARAMETERS = {"temperature": 0.0, "maxOutputTokens": 128, "topP": 0.95, "topK": 40}
OPENAI_DEFAULT_PARAMETERS = {"temperature": 1.0, "maxOutputTokens": 128, "topP": 1.0, "topK": 0}
OPENAI_PARAMETER_NAMES = {"temperature": "temperature", "max_tokens": "maxOutputTokens",
                          "top_p": "topP", "top_k": "topK"}
MAX_OUTPUT_TOKENS_LIMIT = 1024
RETRY_AFTER_SECONDS = 1  # what a 503 (queue full) tells the client to wait
LIMITS = Limits()
PARAMETER_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 2, "a number in [0, 2]"),
    "maxOutputTokens": (lambda v: isinstance(v, int) and 1 <= v <= MAX_OUTPUT_TOKENS_LIMIT,
                        f"an integer in [1, {MAX_OUTPUT_TOKENS_LIMIT}]"),
    "topP": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
    "topK": (lambda v: isinstance(v, int) and 0 <= v <= 1000, "an integer in [0, 1000]"),
}
TEXT_SHAPE = '{"instances": [{"prompt": "..."}, ...], "parameters": {...}}'
CHAT_SHAPE = ('{"instances": [{"context": "...", "examples": [...], "messages": '
              '[{"author": "user", "content": "..."}, ...]}], "parameters": {...}}')
MESSAGE_SHAPE = '{"author": "user"|"assistant", "content": "..."}'
EXAMPLE_SHAPE = '{"input": {"content": "..."}, "output": {"content": "..."}}'
OPENAI_MESSAGE_SHAPE = '{"role": "system"|"user"|"assistant", "content": "..."}'
OPENAI_COMMON_FIELDS = {"model", "temperature", "max_tokens", "top_p", "top_k", "n", "seed",
                        "stream", "stream_options"}
OPENAI_CHAT_FIELDS = OPENAI_COMMON_FIELDS | {"messages"}
OPENAI_TEXT_FIELDS = OPENAI_COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = {"context", "examples", "messages"}  # an instance with any of them is chat
AUTHOR_ROLES = {"user": "user", "assistant": "assistant", "bot": "assistant"}
CANDIDATE_AUTHOR = "assistant"

Conversation = list[dict[str, str]]  # chat-template messages: {"role": ..., "content": ...}


class RequestError(ValueError):
    """A request that cannot be served; the message goes back to the client."""


@dataclass
class PredictRequest:
    """A parsed ``/predict`` request: one conversation per instance, in order."""

    conversations: list[Conversation]
    chat: bool
    parameters: dict


@dataclass
class OpenAIRequest:
    """A parsed ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` request."""

    chat: bool
    conversation: Conversation
    parameters: dict
    seed: int
    stream: bool
    include_usage: bool  # in a stream, a last chunk with the usage


def _json_object(request: Any, shape: str) -> dict:
    """The request's JSON object (raises unless it is one; values as the server checks them)."""
    if not isinstance(request, dict):
        raise RequestError(f"request must be {shape}")
    try:
        check_json_value(request)
    except HttpError as error:
        raise RequestError(error.message) from None
    return request


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _checked_parameters(parameters: dict, names: dict[str, str]) -> dict:
    """``parameters`` (Vertex names) once in range; errors call them as ``names`` says."""
    for name, (check, expected) in PARAMETER_CHECKS.items():
        value = parameters[name]
        if isinstance(value, bool) or not check(value):
            raise RequestError(f"{names.get(name, name)}={value!r} is out of range; "
                               f"expected {expected}")
    return parameters


def _check_turns(conversation: Conversation, where: str, key: str, first_index: int = 0) -> None:
    """Raises unless the turns go user, assistant, user, ... and end with the user's."""
    for offset, message in enumerate(conversation):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RequestError(
                f'{where}[{first_index + offset}].{key} must be "{expected}": turns alternate '
                f'"user" and "assistant", starting with "user"')
    if conversation[-1]["role"] != "user":
        raise RequestError(f'{where} must end with a "user" message, the one to answer')


def _vertex_chat_conversation(instance: dict, where: str) -> Conversation:
    """The chat-template messages of a Vertex chat instance: context, examples, messages."""
    context = instance.get("context", "")
    if not isinstance(context, str):
        raise RequestError(f"{where}.context must be a string")
    conversation = [{"role": "system", "content": context}] if context else []
    examples = instance.get("examples", [])
    if not isinstance(examples, list):
        raise RequestError(f"{where}.examples must be a list of {EXAMPLE_SHAPE}")
    for number, example in enumerate(examples):
        sides = [example.get(side) if isinstance(example, dict) else None
                 for side in ("input", "output")]
        if not all(isinstance(side, dict) and _is_text(side.get("content")) for side in sides):
            raise RequestError(f"{where}.examples[{number}] must be {EXAMPLE_SHAPE} "
                               "with non-empty contents")
        conversation += [{"role": "user", "content": sides[0]["content"]},
                         {"role": "assistant", "content": sides[1]["content"]}]
    messages = instance.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"{where}.messages must be a non-empty list of {MESSAGE_SHAPE}")
    turns = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not _is_text(message.get("content")):
            raise RequestError(f"{where}.messages[{number}] must be {MESSAGE_SHAPE} "
                               "with a non-empty content")
        author = message.get("author")
        if author not in AUTHOR_ROLES:
            raise RequestError(f'{where}.messages[{number}].author must be "user" or '
                               f'"assistant" ("bot" also accepted), got {author!r}')
        turns.append({"role": AUTHOR_ROLES[author], "content": message["content"]})
    _check_turns(turns, f"{where}.messages", "author")
    return conversation + turns


def parse_predict_request(body: Any) -> PredictRequest:
    """The conversations and generation parameters of a Vertex-style predict request (its JSON
    body)."""
    request = _json_object(body, f"{TEXT_SHAPE} or {CHAT_SHAPE}")
    instances = request.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError(f"request must be {TEXT_SHAPE} or {CHAT_SHAPE}")
    for number, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise RequestError(f'instances[{number}] must be an object: {{"prompt": ...}} or '
                               f'{{"messages": ...}}')
    chat = [bool(CHAT_FIELDS & set(instance)) for instance in instances]
    if any(chat) and not all(chat):
        raise RequestError("instances mix the chat shape (with \"messages\") and the text shape "
                           "(with \"prompt\"); send one shape per request")
    conversations = []
    for number, instance in enumerate(instances):
        where = f"instances[{number}]"
        if chat[0]:
            conversations.append(_vertex_chat_conversation(instance, where))
            continue
        prompt = instance.get("prompt", instance.get("content"))
        if not _is_text(prompt):
            raise RequestError(f"{where}.prompt must be a non-empty string "
                               f"(or send the chat shape {CHAT_SHAPE})")
        conversations.append(chat_messages(prompt))
    given = request.get("parameters") or {}
    if not isinstance(given, dict):
        raise RequestError("parameters must be an object")
    unknown = sorted(set(given) - set(DEFAULT_PARAMETERS))
    if unknown:
        raise RequestError(f"unknown parameters {unknown}; supported: {sorted(DEFAULT_PARAMETERS)}")
    parameters = _checked_parameters({**DEFAULT_PARAMETERS, **given},
                                     {name: f"parameters.{name}" for name in DEFAULT_PARAMETERS})
    return PredictRequest(conversations, chat[0], parameters)


def parse_openai_request(body: Any, model_name: str, chat: bool) -> OpenAIRequest:
    """An OpenAI chat completions (``chat``) or completions request (its JSON body), parsed."""
    what = f'"messages": [{OPENAI_MESSAGE_SHAPE}, ...]' if chat else '"prompt": "..."'
    request = _json_object(body, f'{{"model": "{model_name}", {what}, ...}}')
    fields = OPENAI_CHAT_FIELDS if chat else OPENAI_TEXT_FIELDS
    unknown = sorted(set(request) - fields)
    if unknown:
        raise RequestError(f"unsupported fields {unknown}; supported: {sorted(fields)}")
    if request.get("model") != model_name:
        raise RequestError(f"model must be {model_name!r}, the model this endpoint serves; "
                           f"got {request.get('model')!r}")
    if request.get("n", 1) != 1:
        raise RequestError(f"n={request['n']!r} is not supported; this endpoint answers n=1")
    seed = request.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise RequestError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    stream, options = request.get("stream", False), request.get("stream_options")
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}")
    if options is not None and not (stream and isinstance(options, dict) and set(options) <= {
            "include_usage"} and isinstance(options.get("include_usage", False), bool)):
        raise RequestError('stream_options must be {"include_usage": true|false}, with '
                           '"stream": true')
    if chat:
        conversation = _openai_conversation(request.get("messages"))
    elif _is_text(request.get("prompt")):
        conversation = chat_messages(request["prompt"])
    else:
        raise RequestError("prompt must be a non-empty string")
    parameters = {**OPENAI_DEFAULT_PARAMETERS,
                  **{OPENAI_PARAMETER_NAMES[name]: request[name]
                     for name in OPENAI_PARAMETER_NAMES if name in request}}
    names = {vertex: openai for openai, vertex in OPENAI_PARAMETER_NAMES.items()}
    return OpenAIRequest(chat, conversation, _checked_parameters(parameters, names), seed, stream,
                         bool((options or {}).get("include_usage")))


def _openai_conversation(messages: Any) -> Conversation:
    """The conversation of an OpenAI chat request's ``messages``."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"messages must be a non-empty list of {OPENAI_MESSAGE_SHAPE}")
    conversation = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not _is_text(message.get("content")):
            raise RequestError(f"messages[{number}] must be {OPENAI_MESSAGE_SHAPE} "
                               "with a non-empty string content")
        role = message.get("role")
        allowed = ("system", "user", "assistant") if number == 0 else ("user", "assistant")
        if role not in allowed:
            raise RequestError(f"messages[{number}].role must be one of {list(allowed)} "
                               f"(system only first), got {role!r}")
        conversation.append({"role": role, "content": message["content"]})
    system = conversation[:1] if conversation[0]["role"] == "system" else []
    if len(conversation) == len(system):
        raise RequestError('messages must end with a "user" message, the one to answer')
    _check_turns(conversation[len(system):], "messages", "role", first_index=len(system))
    return conversation


class Predictor:
    """The loaded model and its generation worker, which batches the requests of every thread
    (``components.deploy_endpoint.batching``)."""

    def __init__(self, name: str, model_dir: str, **batching):
        """``batching``: ``GenerationWorker``'s options (``batching``, ``max_rows``,
        ``max_queued``)."""
        from components.common.distillation_tasks import input_prefix
        from components.common.generation import stop_and_pad_token_ids
        from components.common.model_loading import load_tuned_model, select_device
        from components.common.serving_numerics import choose_serving_numerics
        from components.deploy_endpoint.batching import GenerationWorker

        self.name, self.model_dir = name, model_dir
        device = select_device()
        self.numerics = choose_serving_numerics(device)
        model, self.tokenizer, self.metadata = load_tuned_model(model_dir, device,
                                                                self.numerics.dtype)
        self.model = self.numerics.apply(model)
        self.input_prefix = input_prefix(self.metadata)
        stops, pad_id = stop_and_pad_token_ids(self.tokenizer)
        self.worker = GenerationWorker(self.model, stops, pad_id, **batching)
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe across threads

    def describe_compute(self) -> str:
        """The serving numerics and why, e.g. ``cpu float32: the int8 kernel's, ..., int8
        weights: int8 kernel (AVX2), ...`` (``components.common.serving_numerics``)."""
        return self.numerics.describe()

    def prompts(self, conversations: list[Conversation]) -> list[str]:
        """The prompt texts: each conversation in the model's chat template, with its input
        prefix on the last user message."""
        from components.common.prompts import format_conversation_prompt, with_input_prefix

        return [format_conversation_prompt(self.tokenizer,
                                           with_input_prefix(conversation, self.input_prefix))
                for conversation in conversations]

    def prompt_ids(self, conversations: list[Conversation]) -> list[list[int]]:
        """The conversations' prompts, tokenized."""
        from components.common.generation import prompt_token_ids

        with self._tokenizer_lock:
            return [prompt_token_ids(self.tokenizer, text)
                    for text in self.prompts(conversations)]

    def decode(self, token_ids: list[int]) -> str:
        """The text of output token ids."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate(self, conversations: list[Conversation], parameters: dict,
                 seed: int = 0) -> list[Generation]:
        """One ``Generation`` per conversation, generated by the worker with the requests of
        other threads. Raises ``QueueFull`` when the worker's queue is full."""
        from components.common.generation import decoded_generation

        prompts = self.prompt_ids(conversations)
        try:
            answers = self.worker.submit(prompts, _sampling(parameters), seed).result()
        except ValueError as error:  # e.g. maxOutputTokens beyond the model's context
            raise RequestError(str(error)) from None
        with self._tokenizer_lock:
            return [decoded_generation(self.tokenizer, prompt, answer)
                    for prompt, answer in zip(prompts, answers)]

    def stream(self, conversation: Conversation, parameters: dict, seed: int,
               loop: asyncio.AbstractEventLoop) -> AnswerStream:
        """The answer to ``conversation`` as the worker decodes it, heard on ``loop``. Raises
        ``RequestError`` or ``QueueFull`` as ``generate`` does."""
        prompt, = self.prompt_ids([conversation])
        try:
            return AnswerStream(self, prompt, _sampling(parameters), seed, loop)
        except ValueError as error:
            raise RequestError(str(error)) from None

    def predict(self, request: PredictRequest) -> dict:
        """The Vertex predict response to ``request``."""
        generations = self.generate(request.conversations, request.parameters)
        if request.chat:
            predictions = [{"candidates": [{"author": CANDIDATE_AUTHOR, "content": g.text}]}
                           for g in generations]
        else:
            predictions = [{"content": g.text} for g in generations]
        input_tokens = sum(g.prompt_tokens for g in generations)
        output_tokens = sum(len(g.token_ids) for g in generations)
        return {
            "predictions": predictions,
            "deployedModelId": self.name,
            "metadata": {"tokenMetadata": {"inputTokenCount": {"totalTokens": input_tokens},
                                           "outputTokenCount": {"totalTokens": output_tokens}}},
        }

    def complete(self, request: OpenAIRequest) -> dict:
        """The OpenAI (chat) completion answering ``request``, whole."""
        generation, = self.generate([request.conversation], request.parameters, request.seed)
        reply = _openai_head(request.chat, self.name, chunk=False)
        if request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": generation.text},
                      "finish_reason": generation.finish_reason}
        else:
            choice = {"text": generation.text, "index": 0, "logprobs": None,
                      "finish_reason": generation.finish_reason}
        return {**reply, "choices": [choice], "usage": _usage(generation)}

    def models(self) -> dict:
        """The OpenAI model list: this endpoint's one model."""
        return {"object": "list", "data": [{"id": self.name, "object": "model",
                                            "created": int(os.path.getmtime(self.model_dir)),
                                            "owned_by": "tunepipe"}]}


def _sampling(parameters: dict) -> SamplingParams:
    from components.common.generation import SamplingParams

    return SamplingParams(parameters["maxOutputTokens"], float(parameters["temperature"]),
                          float(parameters["topP"]), parameters["topK"])


class AnswerStream:
    """One prompt's answer as the worker decodes it (its listener, bridged to the event loop):
    :meth:`deltas` yields the text as it grows, then :attr:`generation` is the whole answer."""

    def __init__(self, predictor: Predictor, prompt: list[int], sampling: SamplingParams,
                 seed: int, loop: asyncio.AbstractEventLoop):
        self._predictor, self._prompt = predictor, prompt
        self._heard: asyncio.Queue[list[int] | None] = asyncio.Queue()

        def hear(tokens: list[int] | None) -> None:  # on the worker's thread
            try:
                loop.call_soon_threadsafe(self._heard.put_nowait, tokens)
            except RuntimeError:  # the loop is closed: the server stopped
                pass

        self.future = predictor.worker.submit([prompt], sampling, seed,
                                              lambda _, tokens: hear(list(tokens)))
        self.future.add_done_callback(lambda _: hear(None))
        self.generation: Generation | None = None

    async def deltas(self) -> AsyncIterator[str]:
        """The answer's text as it is decoded, in pieces of whole characters (a token that ends
        inside a UTF-8 character waits for the rest); raises what the worker raised."""
        from components.common.generation import decoded_generation

        tokens: list[int] = []
        sent = ""
        while (new := await self._heard.get()) is not None:
            tokens += new
            text = self._predictor.decode(tokens).rstrip(REPLACEMENT_CHARACTER)
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent):]
                sent = text
        answer, = self.future.result()
        self.generation = decoded_generation(self._predictor.tokenizer, self._prompt, answer)
        if len(self.generation.text) > len(sent):
            yield self.generation.text[len(sent):]


def _usage(generation: Generation) -> dict:
    completion_tokens = len(generation.token_ids)
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": generation.prompt_tokens + completion_tokens}


def _openai_head(chat: bool, model: str, chunk: bool) -> dict:
    """The fields every OpenAI answer (or chunk of one) starts with."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": model}


async def openai_chunks(request: OpenAIRequest, model: str,
                        answer: AnswerStream) -> AsyncIterator[dict]:
    """A streamed answer as OpenAI streams one: chunks of text, the finish reason, the usage
    when asked for."""
    head = _openai_head(request.chat, model, chunk=True)

    def chunk(text: str, finish_reason: str | None = None) -> dict:
        if request.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {},
                      "finish_reason": finish_reason}
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    if request.chat:
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
    async for text in answer.deltas():
        yield chunk(text)
    yield chunk("", answer.generation.finish_reason)
    if request.include_usage:
        yield {**head, "choices": [], "usage": _usage(answer.generation)}


def vertex_error(error: HttpError) -> dict:
    """An error as ``/predict`` answers it."""
    return {"error": error.message}


def openai_error(error: HttpError) -> dict:
    """An error as OpenAI's API answers it."""
    kind = "invalid_request_error" if 400 <= error.code < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind}}


def _post_route(path: str, predict_route: str = "/predict") -> str | None:
    """Which request a POST to ``path`` is: ``predict``, ``chat`` or ``text`` (the OpenAI
    routes); None for no route."""
    path = path.rstrip("/")
    if path == "/v1/chat/completions":
        return "chat"
    if path == "/v1/completions":
        return "text"
    if path == predict_route.rstrip("/") or path.endswith(("/predict", ":predict")):
        return "predict"
    return None


def make_app(predictor: Predictor, guard: RequestGuard, predict_route: str = "/predict",
             limits: Limits = LIMITS) -> App:
    """The ASGI app serving ``predictor``; ``predict_route`` answers predict requests besides
    ``/predict`` (Vertex's ``AIP_PREDICT_ROUTE``)."""
    from components.deploy_endpoint.batching import QueueFull

    workers = ThreadPoolExecutor(max_workers=limits.max_in_flight,
                                 thread_name_prefix="endpoint-request")

    def health() -> dict:
        return {"name": predictor.name, "model_dir": predictor.model_dir,
                "base_model": predictor.metadata.get("base_model", {}),
                "precision": predictor.numerics.precision.describe(),
                "weights": predictor.numerics.weights.describe(),
                "input_prefix": predictor.input_prefix,
                "batching": predictor.worker.describe(), "status": "ready"}

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        headers = request_headers(scope)
        method, path = scope["method"], scope["path"]
        kind = _post_route(path, predict_route) if method == "POST" else None
        error_payload = vertex_error if kind in (None, "predict") else openai_error
        try:
            guard.check(headers, scope["server"][1])
            if method in ("GET", "HEAD"):
                reply = predictor.models() if path.rstrip("/") == "/v1/models" else health()
            elif kind is None:
                raise HttpError(404 if method == "POST" else 405,
                                f"no route {method} {path}; POST {predict_route}, "
                                "/v1/chat/completions or /v1/completions, GET / or /v1/models",
                                {"Allow": "GET, HEAD, POST"})
            else:
                body = await read_json_body(receive, headers, limits)
                if kind == "predict":
                    reply = await _answer(predictor.predict, parse_predict_request, body)
                else:
                    request = await _answer(lambda r: r, parse_openai_request, body,
                                            predictor.name, kind == "chat")
                    if request.stream:
                        await _stream(request, receive, send)
                        return
                    reply = await _answer(predictor.complete, lambda r: r, request)
        except HttpError as error:
            await send_json(send, error.code, error_payload(error), error.headers)
            return
        await send_json(send, 200, reply)

    async def _answer(serve: Callable, parse: Callable, *arguments: Any) -> Any:
        """``serve(parse(*arguments))`` on a worker thread; its refusals as HttpError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(workers, lambda: serve(parse(*arguments)))
        except RequestError as error:
            raise HttpError(400, str(error)) from None
        except QueueFull as error:
            raise HttpError(503, str(error), {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

    async def _stream(request: OpenAIRequest, receive: Callable, send: Callable) -> None:
        """Streams the answer to ``request`` as server-sent events, a chunk as its tokens are
        decoded; a client that goes away frees its rows (the worker's ``cancel``)."""
        loop = asyncio.get_running_loop()
        answer = await _answer(lambda r: predictor.stream(r.conversation, r.parameters, r.seed,
                                                          loop), lambda r: r, request)
        await start_stream(send, SSE_CONTENT_TYPE)
        watcher = asyncio.create_task(until_disconnected(receive))
        watcher.add_done_callback(
            lambda task: task.cancelled() or predictor.worker.cancel(answer.future))
        try:
            async for chunk in openai_chunks(request, predictor.name, answer):
                if watcher.done():
                    return
                await send({"type": "http.response.body", "body": _event(chunk),
                            "more_body": True})
            await send({"type": "http.response.body", "body": _event("[DONE]")})
        except Exception as error:  # noqa: BLE001 - a failed step: the stream says so and ends
            await send({"type": "http.response.body",
                        "body": _event(openai_error(HttpError(500, f"{error}")))})
        finally:
            watcher.cancel()

    return app


SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
REPLACEMENT_CHARACTER = "\ufffd"  # what a token ending inside a UTF-8 character decodes to


def _event(data: dict | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def serve_in_thread(predictor: Predictor, port: int = 0) -> HttpServer:
    """An endpoint server for ``predictor`` on 127.0.0.1, serving on a thread (tests); stop it
    with ``.stop()``."""
    server = HttpServer(make_app(predictor, RequestGuard.of(check_host=True)), "127.0.0.1", port,
                        LIMITS, vertex_error, log=_log)
    server.start()
    return server


def _log(line: str) -> None:
    print(line, flush=True)


VERTEX_PORT_ENV = "AIP_HTTP_PORT"  # set by Vertex AI for a custom serving container


def serve_on_vertex(name: str | None, **batching) -> None:
    """Serves the model at ``AIP_STORAGE_URI`` under Vertex's custom-container contract;
    ``batching``: ``Predictor``'s batching options."""
    from components.common import storage

    storage_uri = os.environ.get("AIP_STORAGE_URI")
    if not storage_uri:
        raise SystemExit("AIP_STORAGE_URI is not set: Vertex sets it to the uploaded model's "
                         "artifact URI; set it to the model folder to serve")
    model_dir = os.path.join(tempfile.mkdtemp(prefix="tunepipe-model-"), "model")
    storage.download(storage_uri, model_dir)
    predictor = Predictor(name or os.environ.get("AIP_DEPLOYED_MODEL_ID", "model"), model_dir,
                          **batching)
    predict_route = os.environ.get("AIP_PREDICT_ROUTE", "/predict")
    # Vertex's front end sends its own Host; its requests carry no browser's Origin
    app = make_app(predictor, RequestGuard.of(check_host=False), predict_route)
    server = HttpServer(app, "0.0.0.0", int(os.environ[VERTEX_PORT_ENV]), LIMITS, vertex_error,
                        log=_log)
    print(f"endpoint {predictor.name} serving {storage_uri} on port {server.port}: "
          f"health {os.environ.get('AIP_HEALTH_ROUTE', '/')}, predict {predict_route}; "
          f"{predictor.describe_compute()}", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    # Before torch loads OpenMP: its threads sleep while they wait, instead of spinning. A
    # spinning thread holds a core that the HTTP threads, the clients or other work need: with
    # another process busy on a 2-core machine, the embedded model decoded 3.3 tokens/s
    # spinning against 11.7 passive (and about 15% faster spinning on an idle machine).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from components.common.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
    from components.deploy_endpoint.batching import DEFAULT_MAX_QUEUED, DEFAULT_MAX_ROWS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="the model's name (required but on Vertex)")
    parser.add_argument("--model-dir", help="the model folder (required but on Vertex)")
    parser.add_argument("--ready-file", help="where to write the port once serving (required "
                                             "but on Vertex)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-batch-rows", type=int, default=DEFAULT_MAX_ROWS,
                        help="rows (prompts) generated together (default %(default)s)")
    parser.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED,
                        help="requests waiting for a place in the batch before more are "
                             "answered 503 (default %(default)s)")
    parser.add_argument("--no-batching", action="store_true",
                        help="serve one request at a time (the benchmark's baseline)")
    parser.add_argument("--prefix-cache-mb", type=int,
                        default=DEFAULT_PREFIX_CACHE_BYTES // 2**20,
                        help="memory for the keys and values of recent prompts, which prompts "
                             "starting the same way reuse (0: none; default %(default)s)")
    args = parser.parse_args(argv)
    if args.prefix_cache_mb < 0:
        parser.error(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    batching = {"batching": not args.no_batching, "max_rows": args.max_batch_rows,
                "max_queued": args.max_queued, "prefix_cache_bytes": args.prefix_cache_mb * 2**20}
    if os.environ.get(VERTEX_PORT_ENV):
        serve_on_vertex(args.name, **batching)
        return
    if not (args.name and args.model_dir and args.ready_file):
        parser.error(f"--name, --model-dir and --ready-file are required (unless "
                     f"{VERTEX_PORT_ENV} is set, as on Vertex AI)")
    predictor = Predictor(args.name, args.model_dir, **batching)
    server = HttpServer(make_app(predictor, RequestGuard.of(check_host=True)), "127.0.0.1",
                        args.port, LIMITS, vertex_error, log=_log)
    staging = args.ready_file + ".partial"
    with open(staging, "w") as ready:
        json.dump({"port": server.port, "pid": os.getpid()}, ready)
    os.replace(staging, args.ready_file)
    print(f"endpoint {args.name} serving on {server.url}; {predictor.describe_compute()}",
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
