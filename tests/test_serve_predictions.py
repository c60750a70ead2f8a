"""`tunepipe serve`: models, endpoints and predictions, driven by the real SDKs
(``aiplatform.Model``, ``aiplatform.Endpoint.predict``,
``vertexai.generative_models.GenerativeModel.generate_content``) and OpenAI's chat shape, on an
endpoint serving a tiny tuned model."""
from __future__ import annotations

import pytest

from components.common.model_registry import register_model
from components.deploy_endpoint import endpoints
from service.models import resource_id
from service.server import ServeConfig, Service
from tests.test_serve import call

NAME = "tiny-served"
PARENT = "projects/my-project/locations/us-central1"


@pytest.fixture(scope="module")
def served(tuned_checkpoint):
    """The server, with the tuned tiny model registered (twice) and its endpoint running."""
    register_model(tuned_checkpoint, NAME, {})
    registered = register_model(tuned_checkpoint, NAME, {})
    endpoints.start_endpoint(NAME, registered.path)
    try:
        with Service(ServeConfig(port=0)) as service:
            yield service
    finally:
        endpoints.stop_endpoint(NAME, missing_ok=True)


@pytest.fixture
def sdk(served):
    """The Vertex SDK pointed at the server."""
    import vertexai
    from google.auth.credentials import AnonymousCredentials

    vertexai.init(project="my-project", location="us-central1", api_endpoint=served.url,
                  api_transport="rest", credentials=AnonymousCredentials())


def test_models_come_from_the_registry(served, sdk):
    from google.cloud import aiplatform

    model = aiplatform.Model(resource_id(NAME))
    assert model.display_name == NAME and model.version_id == "2"
    assert aiplatform.Model(f"{resource_id(NAME)}@1").version_id == "1"
    status, listed = call(served.url, "GET", f"/v1/{PARENT}/models")
    assert status == 200 and NAME in [m["displayName"] for m in listed["models"]]
    assert call(served.url, "GET", f"/v1/{PARENT}/models/{NAME}")[1]["versionId"] == "2"
    status, reply = call(served.url, "GET", f"/v1/{PARENT}/models/{NAME}@7")
    assert status == 404 and "has no version 7" in reply["error"]["message"]


def test_the_sdk_predicts_text_and_chat_through_the_endpoint(served, sdk):
    from google.cloud import aiplatform

    endpoint = aiplatform.Endpoint(resource_id(NAME))
    assert endpoint.display_name == NAME
    assert endpoint.gca_resource.deployed_models[0].model == f"{PARENT}/models/{resource_id(NAME)}"
    text = endpoint.predict(instances=[{"prompt": "Where is my parcel?"}],
                            parameters={"maxOutputTokens": 4, "temperature": 0.0})
    assert isinstance(text.predictions[0]["content"], str)
    assert text.deployed_model_id == resource_id(NAME) and text.model_version_id == "2"
    chat = endpoint.predict(instances=[{"context": "Be brief.", "messages": [
        {"author": "user", "content": "Hi"}]}], parameters={"maxOutputTokens": 3})
    assert chat.predictions[0]["candidates"][0]["author"] == "assistant"


def test_generate_content_answers_in_gemini_s_shape(served, sdk):
    from vertexai.generative_models import GenerationConfig, GenerativeModel

    model = GenerativeModel(f"{PARENT}/endpoints/{resource_id(NAME)}",
                            system_instruction="Answer in one word.")
    response = model.generate_content(
        "Where is my parcel?",
        generation_config=GenerationConfig(temperature=0.0, top_p=0.9, top_k=5,
                                           max_output_tokens=3))
    candidate = response.candidates[0]
    assert isinstance(candidate.content.parts[0].text, str)
    usage = response.usage_metadata
    assert 0 < usage.candidates_token_count <= 3 and usage.prompt_token_count > 0
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert candidate.finish_reason.name == ("MAX_TOKENS" if usage.candidates_token_count == 3
                                            else "STOP")


def test_openai_chat_completions_name_the_endpoint(served):
    status, models = call(served.url, "GET", "/v1/models")
    assert status == 200 and NAME in [m["id"] for m in models["data"]]
    status, reply = call(served.url, "POST", "/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("path, body, code, message", [
    (f"endpoints/{NAME}:predict", {"instances": [{"prompt": "x"}], "parameter": {}}, 400,
     "unknown fields in the request: ['parameter']"),
    (f"endpoints/{NAME}:predict", {"instances": [{"prompt": "x"}],
                                   "parameters": {"topP": 2}}, 400, "parameters.topP=2"),
    ("endpoints/nope:predict", {"instances": []}, 404, "endpoint nope not found"),
    (f"endpoints/{NAME}:generateContent",
     {"contents": [{"role": "user", "parts": [{"inlineData": {}}]}]}, 400,
     'contents[0].parts[0] must be {"text": "..."}'),
    (f"endpoints/{NAME}:generateContent",
     {"contents": [{"role": "model", "parts": [{"text": "x"}]}]}, 400,
     'contents[0].role must be "user"'),
    (f"endpoints/{NAME}:generateContent",
     {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"stopSequences": ["."]}},
     400, "unknown fields in generationConfig: ['stopSequences']"),
])
def test_bad_prediction_requests_are_explained(served, path, body, code, message):
    status, reply = call(served.url, "POST", f"/v1/{PARENT}/{path}", body)
    assert status == code and message in reply["error"]["message"], reply


def _genai(served):
    """google-genai's client in Vertex mode, pointed at the server."""
    from google import genai
    from google.genai.types import HttpOptions
    from google.oauth2.credentials import Credentials

    return genai.Client(vertexai=True, project="my-project", location="us-central1",
                        credentials=Credentials(token="local"),
                        http_options=HttpOptions(base_url=served.url))


def test_stream_generate_content_streams_what_generate_content_answers(served):
    from google.genai.types import GenerateContentConfig

    client = _genai(served)
    model = f"{PARENT}/endpoints/{resource_id(NAME)}"
    config = GenerateContentConfig(system_instruction="Answer in one word.", temperature=0.0,
                                   max_output_tokens=6)
    whole = client.models.generate_content(model=model, contents="Where is my parcel?",
                                           config=config)
    chunks = list(client.models.generate_content_stream(model=model,
                                                        contents="Where is my parcel?",
                                                        config=config))
    assert len(chunks) > 2  # the text came in pieces, then the finish
    assert "".join(chunk.text or "" for chunk in chunks) == whole.text and whole.text
    last = chunks[-1]
    assert last.candidates[0].finish_reason == whole.candidates[0].finish_reason
    assert last.usage_metadata.candidates_token_count == \
        whole.usage_metadata.candidates_token_count
    assert last.usage_metadata.prompt_token_count == whole.usage_metadata.prompt_token_count

    # Without alt=sse: one JSON array of the same responses.
    status, array = call(served.url, "POST", f"/v1/{model}:streamGenerateContent", {
        "contents": [{"role": "user", "parts": [{"text": "Where is my parcel?"}]}],
        "systemInstruction": {"parts": [{"text": "Answer in one word."}]},
        "generationConfig": {"temperature": 0.0, "maxOutputTokens": 6}})
    assert status == 200 and isinstance(array, list) and len(array) == len(chunks)
    assert "".join(part["text"] for response in array
                   for part in response["candidates"][0]["content"]["parts"]) == whole.text


def test_openai_requests_stream_through_the_server(served):
    from openai import OpenAI

    openai = OpenAI(base_url=f"{served.url}/v1", api_key="local", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    whole = openai.chat.completions.create(model=NAME, messages=messages, max_tokens=5,
                                           temperature=0)
    chunks = list(openai.chat.completions.create(model=NAME, messages=messages, max_tokens=5,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        whole.choices[0].message.content
    completion = openai.completions.create(model=NAME, prompt="Hi", max_tokens=5, temperature=0)
    assert completion.choices[0].text == whole.choices[0].message.content  # the same prompt
    pieces = list(openai.completions.create(model=NAME, prompt="Hi", max_tokens=5,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text
