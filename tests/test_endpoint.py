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
from components.deploy_endpoint.server import RequestError, parse_predict_request
from components.tune.trainer import TuneConfig, tune
from tests.tokenized import write_token_dataset


@pytest.fixture(scope="module")
def tuned_checkpoint(tmp_path_factory, tiny_model_dir, sample_dir):
    root = tmp_path_factory.mktemp("tuned")
    train = write_token_dataset(load_tokenizer(tiny_model_dir),
                                sample_dir / "support_intents_train.jsonl", root / "train", 16)
    result = tune(resolve_model(str(tiny_model_dir)).to_dict(), train, None, root / "out",
                  TuneConfig(train_steps=2, learning_rate=1e-3, batch_size=4))
    return root / "out" / result.checkpoints[-1]["dir"]


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
    (b"not json", "not valid JSON"),
    (b'{"instances": []}', '"instances"'),
    (b'{"instances": [{"prompt": ""}]}', "instances[0].prompt"),
    (b'{"instances": [{"prompt": "hi"}], "parameters": {"temprature": 1}}', "unknown parameters ['temprature']"),
    (b'{"instances": [{"prompt": "hi"}], "parameters": {"maxOutputTokens": 0}}', "maxOutputTokens"),
    (b'{"instances": [{"prompt": "hi"}], "parameters": {"topP": 1.5}}', "topP"),
])
def test_bad_predict_requests_are_explained(body, message):
    with pytest.raises(RequestError) as error:
        parse_predict_request(body)
    assert message in str(error.value)


def test_predict_request_defaults_and_overrides():
    prompts, parameters = parse_predict_request(
        b'{"instances": [{"prompt": "a"}, {"prompt": "b"}], "parameters": {"temperature": 0.5}}')
    assert prompts == ["a", "b"]
    assert parameters == {"temperature": 0.5, "maxOutputTokens": 128, "topP": 0.95, "topK": 40}


def test_endpoint_serves_predictions_over_http_until_stopped(tuned_checkpoint):
    registered = register_model(tuned_checkpoint, "intents-endpoint", {})
    endpoint = endpoints.start_endpoint("intents-endpoint", registered.path)
    try:
        assert [e.name for e in endpoints.list_endpoints()] == ["intents-endpoint"]
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
            data=json.dumps({"instances": [{"prompt": "hi"}], "parameters": {"topK": -1}}).encode())
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        assert error.value.code == 400 and "topK" in error.value.read().decode()

        # Starting it again replaces the running server.
        replacement = endpoints.start_endpoint("intents-endpoint", registered.path)
        assert replacement.pid != endpoint.pid
        assert [e.pid for e in endpoints.list_endpoints()] == [replacement.pid]
    finally:
        assert endpoints.stop_endpoint("intents-endpoint")
    assert endpoints.list_endpoints() == []
    with pytest.raises(LookupError, match="No running endpoint named 'intents-endpoint'"):
        endpoints.predict("intents-endpoint", ["hi"])
