"""Streaming from the endpoint: OpenAI's ``stream: true`` on ``/v1/chat/completions`` and
``/v1/completions``, driven by the real ``openai`` client; tokens sent as they are decoded, whole
characters, and a client that leaves freeing its rows."""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from concurrent.futures import Future

import pytest
from openai import OpenAI

from components.common.generation import DecodeBatch
from components.deploy_endpoint.server import AnswerStream, Predictor
from tests.test_endpoint_batching import NAME, model_dir, serving  # noqa: F401 (a fixture)

MESSAGES = [{"role": "system", "content": "You answer support questions."},
            {"role": "user", "content": "Where is my parcel?"}]


@pytest.fixture(scope="module")
def endpoint(model_dir):  # noqa: F811
    """The tiny random model behind a loopback endpoint: its predictor and address."""
    predictor = Predictor(NAME, str(model_dir))
    with serving(predictor) as address:
        yield predictor, address


def client(address) -> OpenAI:
    return OpenAI(base_url=f"http://{address[0]}:{address[1]}/v1", api_key="local",
                  max_retries=0)


def test_the_openai_client_streams_what_it_gets_whole(endpoint):
    predictor, address = endpoint
    openai = client(address)
    whole = openai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    chunks = list(openai.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == whole.usage

    # Legacy completions: the prompt as /predict's text prompt, streamed and not.
    prompt = "Where is my parcel?"
    completion = openai.completions.create(model=NAME, prompt=prompt, max_tokens=8,
                                           temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].logprobs is None
    assert completion.choices[0].text == predictor.predict(
        _text_request(prompt, 8))["predictions"][0]["content"]
    pieces = list(openai.completions.create(model=NAME, prompt=prompt, max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text
    assert pieces[-1].choices[0].finish_reason == completion.choices[0].finish_reason
    assert completion.usage.completion_tokens <= 8


def _text_request(prompt: str, max_tokens: int):
    from components.deploy_endpoint.server import parse_predict_request

    return parse_predict_request({"instances": [{"prompt": prompt}],
                                  "parameters": {"maxOutputTokens": max_tokens,
                                                 "temperature": 0.0, "topP": 1.0, "topK": 0}})


@pytest.mark.parametrize("body, message", [
    ({"stream": "yes"}, "stream must be true or false, got 'yes'"),
    ({"stream_options": {"include_usage": True}},
     'stream_options must be {"include_usage": true|false}, with "stream": true'),
    ({"stream": True, "stream_options": {"usage": True}},
     'stream_options must be {"include_usage": true|false}, with "stream": true'),
])
def test_bad_stream_settings_are_answered_400(endpoint, body, message):
    status, reply = _post(endpoint[1], "/v1/chat/completions",
                          {"model": NAME, "messages": MESSAGES, **body})
    assert (status, reply) == (400, {"error": {"message": message,
                                               "type": "invalid_request_error"}})
    status, reply = _post(endpoint[1], "/v1/completions", {"model": NAME, "prompt": ""})
    assert status == 400 and reply["error"]["message"] == "prompt must be a non-empty string"


def _post(address, path: str, body: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*address, timeout=60)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _stream(address, max_tokens: int) -> tuple[http.client.HTTPConnection,
                                              http.client.HTTPResponse]:
    """A streamed chat request, its response open."""
    connection = http.client.HTTPConnection(*address, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(
        {"model": NAME, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
         "stream": True}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    return connection, response


def _next_content(response: http.client.HTTPResponse) -> str:
    """The text of the next chunk with text."""
    for line in response:
        if line.startswith(b"data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise AssertionError("the stream ended without text")


def test_tokens_reach_the_client_as_they_are_decoded(endpoint, monkeypatch):
    """The first text arrives while the worker is held in its first decode step (the answer
    needs 5 more)."""
    _, address = endpoint
    release = threading.Event()
    step = DecodeBatch.step

    def held_step(self):
        assert release.wait(30)
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", held_step)
    connection, response = _stream(address, 6)
    try:
        assert _next_content(response)  # the prefill's token, before any step ran
    finally:
        release.set()
        connection.close()


def test_a_client_that_leaves_frees_its_rows(endpoint, monkeypatch):
    predictor, address = endpoint
    step = DecodeBatch.step

    def slow_step(self):  # 1000 tokens would take 20 s
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    connection, response = _stream(address, 1000)
    _next_content(response)
    _next_content(response)
    assert predictor.worker.describe()["running_rows"] == 1
    steps = predictor.worker.describe()["decode_steps"]
    connection.close()
    deadline = time.monotonic() + 10
    while predictor.worker.describe()["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    batching = _get(address)["batching"]
    assert batching["running_rows"] == 0 and batching["decode_steps"] - steps < 100, batching


def _get(address) -> dict:
    connection = http.client.HTTPConnection(*address, timeout=60)
    try:
        connection.request("GET", "/")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


class _Tokens:
    """A predictor and worker standing in for the real ones: token i decodes to byte i."""

    def __init__(self, text: str):
        self.bytes = text.encode()
        self.worker = self
        self.tokenizer = self

    def submit(self, prompts, sampling, seed, listener) -> Future:
        self.listener, self.future = listener, Future()
        return self.future

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        return bytes(self.bytes[i] for i in token_ids).decode(errors="replace")


def test_text_pieces_are_whole_characters():
    """A token that ends inside a UTF-8 character waits for the rest of it."""
    text = "né 🙂!"
    tokens = _Tokens(text)

    async def pieces() -> list[str]:
        stream = AnswerStream(tokens, [1, 2], None, 0, asyncio.get_running_loop())
        for index in range(len(tokens.bytes)):
            tokens.listener(0, [index])
        tokens.future.set_result([(list(range(len(tokens.bytes))), "stop")])
        received = [piece async for piece in stream.deltas()]
        assert stream.generation.text == text and stream.generation.finish_reason == "stop"
        return received

    received = asyncio.run(pieces())
    assert "".join(received) == text
    assert received == ["n", "é", " ", "🙂", "!"]
