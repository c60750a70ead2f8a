"""The registry and the local endpoint: a real server process answering over HTTP."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from components.common.model_catalog import resolve_model
from components.common.model_loading import load_tokenizer, read_tuned_model_metadata
from components.common.model_registry import get_model, list_models, register_model, resolve_model_dir
from components.deploy_endpoint import endpoints
from components.common.prompts import format_conversation_prompt
from components.deploy_endpoint.server import RequestError, parse_predict_request
from components.tune.trainer import TuneConfig, tune
from command import main as cli
from tests.tokenized import write_distillation_tokens


def test_registry_versions_each_upload(tuned_checkpoint):
    first = register_model(tuned_checkpoint, "intents-registry", {"project": "p"})
    second = register_model(tuned_checkpoint, "intents-registry", {"project": "p"})
    assert (first.version, second.version) == (1, 2)
    assert get_model("intents-registry").version == 2
    assert resolve_model_dir("intents-registry@1") == first.path
    metadata = read_tuned_model_metadata(second.path)
    assert metadata["display_name"] == "intents-registry" and metadata["project"] == "p"
    assert "intents-registry" in [m.display_name for m in list_models()]
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".upload-")]
    with pytest.raises(LookupError, match="No registered model named 'nope'"):
        get_model("nope")
    with pytest.raises(ValueError, match="model_display_name"):
        register_model(tuned_checkpoint, "bad/name", {})


@pytest.mark.parametrize("body, message", [
    (b"[1]", "request must be"),
    (b'{"instances": [{"prompt": "nul \\u0000"}]}', "NUL character"),
    (b'{"instances": []}', '"instances"'),
    (b'{"instances": [{"prompt": ""}]}', "instances[0].prompt"),
    (b'{"instances": [{"prompt": "hi"}], "parameters": {"temprature": 1}}', "unknown parameters ['temprature']"),
    (b'{"instances": [{"prompt": "hi"}], "parameters": {"maxOutputTokens": 0}}', "maxOutputTokens"),
    (b'{"instances": [{"prompt": "hi"}], "parameters": {"topP": 1.5}}', "topP"),
])
def test_bad_predict_requests_are_explained(body, message):
    with pytest.raises(RequestError) as error:
        parse_predict_request(json.loads(body))
    assert message in str(error.value)


def test_predict_request_defaults_and_overrides():
    request = parse_predict_request(
        {"instances": [{"prompt": "a"}, {"prompt": "b"}], "parameters": {"temperature": 0.5}})
    assert not request.chat
    assert request.conversations == [[{"role": "user", "content": "a"}],
                                     [{"role": "user", "content": "b"}]]
    assert request.parameters == {"temperature": 0.5, "maxOutputTokens": 128, "topP": 0.95,
                                  "topK": 40}


def test_endpoint_serves_predictions_over_http_until_stopped(tuned_checkpoint):
    registered = register_model(tuned_checkpoint, "intents-endpoint", {})
    endpoint = endpoints.start_endpoint("intents-endpoint", registered.path)
    try:
        assert "intents-endpoint" in [e.name for e in endpoints.list_endpoints()]
        reply = endpoints.predict("intents-endpoint", ["Where is my parcel?", "Reset my password"],
                                  {"maxOutputTokens": 5, "temperature": 0.0})
        assert len(reply["predictions"]) == 2
        assert all(isinstance(p["content"], str) for p in reply["predictions"])
        assert reply["deployedModelId"] == "intents-endpoint"
        assert 0 < reply["metadata"]["tokenMetadata"]["outputTokenCount"]["totalTokens"] <= 10

        # Greedy decoding is deterministic; Vertex-style REST paths work too.
        again = endpoints.predict("intents-endpoint", ["Where is my parcel?"], {"maxOutputTokens": 5})
        assert again["predictions"][0] == reply["predictions"][0]
        request = urllib.request.Request(
            endpoint.url + "/v1/projects/p/locations/us-central1/endpoints/intents-endpoint:predict",
            data=json.dumps({"instances": [{"prompt": "hi"}], "parameters": {"topK": -1}}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        assert error.value.code == 400 and "topK" in error.value.read().decode()

        # Requests a web page could make are refused.
        prompt = json.dumps({"instances": [{"prompt": "hi"}]}).encode()
        for headers, code in (({"Content-Type": "application/json",
                                "Origin": "https://evil.example"}, 403),
                              ({"Content-Type": "text/plain"}, 415)):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(urllib.request.Request(
                    endpoint.url + "/predict", data=prompt, headers=headers), timeout=60)
            assert error.value.code == code and "error" in json.loads(error.value.read())

        # Starting it again replaces the running server.
        replacement = endpoints.start_endpoint("intents-endpoint", registered.path)
        assert replacement.pid != endpoint.pid
        assert endpoints.get_endpoint("intents-endpoint").pid == replacement.pid
    finally:
        assert endpoints.stop_endpoint("intents-endpoint")
    assert "intents-endpoint" not in [e.name for e in endpoints.list_endpoints()]
    with pytest.raises(LookupError, match="No running endpoint named 'intents-endpoint'"):
        endpoints.predict("intents-endpoint", ["hi"])


# --- chat ------------------------------------------------------------------------------------

CHAT = "intents-chat"
CHAT_INSTANCE = {
    "context": "You sort customer messages into intents.",
    "examples": [{"input": {"content": "Where is my parcel?"},
                  "output": {"content": "track_order"}}],
    "messages": [{"author": "user", "content": "I forgot my password"},
                 {"author": "assistant", "content": "reset_password"},
                 {"author": "user", "content": "Cancel my order please"}],
}
# The conversation the chat template sees for CHAT_INSTANCE: context, example, messages.
CHAT_CONVERSATION = [
    {"role": "system", "content": "You sort customer messages into intents."},
    {"role": "user", "content": "Where is my parcel?"},
    {"role": "assistant", "content": "track_order"},
    {"role": "user", "content": "I forgot my password"},
    {"role": "assistant", "content": "reset_password"},
    {"role": "user", "content": "Cancel my order please"},
]


@pytest.fixture(scope="module")
def chat_endpoint(tuned_checkpoint):
    endpoint = endpoints.start_endpoint(CHAT, register_model(tuned_checkpoint, CHAT, {}).path)
    yield endpoint
    endpoints.stop_endpoint(CHAT, missing_ok=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def post(url: str, payload: dict) -> tuple[int, dict]:
    """POSTs JSON; the status and the JSON reply (errors included)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _user(content: str) -> dict:
    return {"author": "user", "content": content}


def prompt_tokens(tokenizer, conversation: list[dict]) -> int:
    prompt = format_conversation_prompt(tokenizer, conversation)
    return len(tokenizer(prompt, add_special_tokens=False).input_ids)


def test_chat_predictions_use_context_examples_and_messages(chat_endpoint, tokenizer):
    status, reply = post(chat_endpoint.predict_url, {
        "instances": [CHAT_INSTANCE, {"messages": [_user("Where is my parcel?")]}],
        "parameters": {"maxOutputTokens": 4, "temperature": 0.0}})
    assert status == 200
    assert reply["deployedModelId"] == CHAT
    assert [[c["author"] for c in p["candidates"]] for p in reply["predictions"]] == [
        ["assistant"], ["assistant"]]
    tokens = reply["metadata"]["tokenMetadata"]
    assert tokens["inputTokenCount"]["totalTokens"] == (
        prompt_tokens(tokenizer, CHAT_CONVERSATION)
        + prompt_tokens(tokenizer, [{"role": "user", "content": "Where is my parcel?"}]))
    assert 0 < tokens["outputTokenCount"]["totalTokens"] <= 8

    # A one-message chat is prompted exactly as the same text prompt.
    _, text = post(chat_endpoint.predict_url, {"instances": [{"prompt": "Where is my parcel?"}],
                                               "parameters": {"maxOutputTokens": 4}})
    assert text["predictions"] == [{"content": reply["predictions"][1]["candidates"][0]["content"]}]

    # The OpenAI route builds the same prompt: same greedy answer, same prompt token count.
    status, completion = post(chat_endpoint.url + "/v1/chat/completions", {
        "model": CHAT, "messages": CHAT_CONVERSATION, "max_tokens": 4, "temperature": 0})
    assert status == 200
    assert completion["choices"][0]["message"] == {
        "role": "assistant", "content": reply["predictions"][0]["candidates"][0]["content"]}
    assert completion["usage"]["prompt_tokens"] == prompt_tokens(tokenizer, CHAT_CONVERSATION)


@pytest.mark.parametrize("instances, message", [
    ([{"messages": []}],
     'instances[0].messages must be a non-empty list of {"author": "user"|"assistant", '
     '"content": "..."}'),
    ([{"context": "Be brief.", "examples": []}],
     'instances[0].messages must be a non-empty list of {"author": "user"|"assistant", '
     '"content": "..."}'),
    ([{"messages": [{"author": "model", "content": "hi"}]}],
     'instances[0].messages[0].author must be "user" or "assistant" ("bot" also accepted), '
     "got 'model'"),
    ([{"messages": [_user("hi"), _user("again")]}],
     'instances[0].messages[1].author must be "assistant": turns alternate "user" and '
     '"assistant", starting with "user"'),
    ([{"messages": [_user("hi"), {"author": "assistant", "content": "hello"}]}],
     'instances[0].messages must end with a "user" message, the one to answer'),
    ([{"messages": [_user("hi"), {"author": "assistant"}, _user("x")]}],
     'instances[0].messages[1] must be {"author": "user"|"assistant", "content": "..."} '
     "with a non-empty content"),
    ([{"messages": [_user("hi")], "examples": [{"input": {"content": "q"}, "output": "a"}]}],
     'instances[0].examples[0] must be {"input": {"content": "..."}, "output": {"content": '
     '"..."}} with non-empty contents'),
    ([{"messages": [_user("hi")], "context": 3}], "instances[0].context must be a string"),
    ([{"messages": [_user("hi")]}, {"prompt": "hi"}],
     'instances mix the chat shape (with "messages") and the text shape (with "prompt"); '
     "send one shape per request"),
])
def test_bad_chat_requests_are_answered_400(chat_endpoint, instances, message):
    assert post(chat_endpoint.predict_url, {"instances": instances}) == (400, {"error": message})


def test_openai_chat_completion(chat_endpoint, tokenizer):
    url = chat_endpoint.url + "/v1/chat/completions"
    messages = [{"role": "user", "content": "Where is my parcel?"}]
    status, reply = post(url, {"model": CHAT, "messages": messages, "max_tokens": 3,
                               "temperature": 0.9, "top_p": 0.9, "n": 1, "seed": 7})
    assert status == 200
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert isinstance(reply["created"], int) and reply["model"] == CHAT
    choice, = reply["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    usage = reply["usage"]
    assert usage["prompt_tokens"] == prompt_tokens(tokenizer, messages)
    assert 0 <= usage["completion_tokens"] <= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 3 else "stop")
    # Sampling with the same seed answers the same.
    again = post(url, {"model": CHAT, "messages": messages, "max_tokens": 3, "temperature": 0.9,
                       "top_p": 0.9, "seed": 7})[1]
    assert again["choices"] == reply["choices"] and again["id"] != reply["id"]

    with urllib.request.urlopen(chat_endpoint.url + "/v1/models", timeout=60) as response:
        models = json.loads(response.read())
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [CHAT]


@pytest.mark.parametrize("request_body, message", [
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]},
     "model must be 'intents-chat', the model this endpoint serves; got 'other'"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "n": 2},
     "n=2 is not supported; this endpoint answers n=1"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
     "unsupported fields ['logprobs']; supported: ['max_tokens', 'messages', 'model', 'n', "
     "'seed', 'stream', 'stream_options', 'temperature', 'top_k', 'top_p']"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     "max_tokens=0 is out of range; expected an integer in [1, 1024]"),
    ({"model": CHAT, "messages": []},
     'messages must be a non-empty list of {"role": "system"|"user"|"assistant", '
     '"content": "..."}'),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"},
                                  {"role": "system", "content": "late"}]},
     "messages[1].role must be one of ['user', 'assistant'] (system only first), got 'system'"),
    ({"model": CHAT, "messages": [{"role": "system", "content": "s"},
                                  {"role": "assistant", "content": "a"}]},
     'messages[1].role must be "user": turns alternate "user" and "assistant", starting with '
     '"user"'),
    ({"model": CHAT, "messages": [{"role": "system", "content": "s"}]},
     'messages must end with a "user" message, the one to answer'),
])
def test_bad_openai_requests_are_answered_400(chat_endpoint, request_body, message):
    assert post(chat_endpoint.url + "/v1/chat/completions", request_body) == (
        400, {"error": {"message": message, "type": "invalid_request_error"}})


def test_cli_predicts_chat_with_messages(chat_endpoint, capsys):
    turns = ["I forgot my password", "reset_password", "Cancel my order please"]
    context = "You sort customer messages into intents."
    assert cli.main(["endpoints", "predict", CHAT, *[f"--message={t}" for t in turns],
                     "--context", context, "--max-output-tokens", "4"]) == 0
    reply = endpoints.predict_chat(CHAT, turns, context, {"maxOutputTokens": 4})
    assert capsys.readouterr().out == reply["predictions"][0]["candidates"][0]["content"] + "\n"

    for arguments in (["--prompt", "hi", "--message", "hi"], []):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["endpoints", "predict", CHAT, *arguments])
        assert exit_.value.code == 2
        assert "--prompt" in capsys.readouterr().err
    assert cli.main(["endpoints", "predict", CHAT, "--prompt", "hi", "--context", "c"]) == 2
    assert "--context goes with a chat request (--message)" in capsys.readouterr().err


# --- a distilled student ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def distilled_student(tmp_path_factory, tiny_model_dir):
    """The tiny model tuned a step on the label and rationale tasks, then registered."""
    root = tmp_path_factory.mktemp("student")
    tokens = write_distillation_tokens(tiny_model_dir, root, examples=4)
    result = tune(resolve_model(str(tiny_model_dir)).to_dict(), tokens / "train", None,
                  root / "out", TuneConfig(train_steps=1, learning_rate=1e-3, batch_size=2))
    return register_model(root / "out" / result.checkpoints[-1]["dir"], "intents-student", {})


def _labelled(tokenizer, conversation: list[dict]) -> str:
    """The prompt of ``conversation`` with the label task's prefix on its last user message."""
    last = {"role": "user", "content": "[label] " + conversation[-1]["content"]}
    return format_conversation_prompt(tokenizer, [*conversation[:-1], last])


def test_a_distilled_student_is_asked_for_labels_only(distilled_student, tokenizer, monkeypatch):
    from components.deploy_endpoint.server import Predictor, serve_in_thread

    predictor = Predictor("intents-student", str(distilled_student.path))
    assert predictor.input_prefix == "[label] "  # the tuner's metadata, kept by the registry
    prompts, format_prompts = [], predictor.prompts

    def spy(conversations):
        prompts.extend(format_prompts(conversations))
        return prompts[-len(conversations):]

    monkeypatch.setattr(predictor, "prompts", spy)
    server = serve_in_thread(predictor)
    url = server.url
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Reset my password"}]
    try:
        parameters = {"maxOutputTokens": 2}
        text = post(url + "/predict", {"instances": [{"prompt": "Where is my parcel?"}],
                                       "parameters": parameters})
        chat = post(url + "/predict", {"instances": [CHAT_INSTANCE], "parameters": parameters})
        status, reply = post(url + "/v1/chat/completions", {
            "model": "intents-student", "messages": messages, "max_tokens": 2})
    finally:
        server.stop()
        predictor.worker.close()
    assert text[0] == chat[0] == status == 200
    assert prompts == [_labelled(tokenizer, [{"role": "user", "content": "Where is my parcel?"}]),
                       _labelled(tokenizer, CHAT_CONVERSATION), _labelled(tokenizer, messages)]
    assert reply["usage"]["prompt_tokens"] == len(tokenizer(
        prompts[-1], add_special_tokens=False).input_ids)
