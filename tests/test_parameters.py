"""Pipeline parameter checks: values (typed or strings) and unknown names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.parameters import (DOCUMENTED_PARAMETERS, REGIONS, check_parameters,
                                          suggest_parameter, unknown_parameters)

# The request body of the curl example of Vertex's documentation (seed 001, docs/README.md),
# shell variables substituted as the page sets them: tests/seeds/001_70d06e170e6fa02c_request.json.
SEED_REQUEST = Path(__file__).resolve().parent / "seeds" / "001_70d06e170e6fa02c_request.json"

TEXT = "tune-large-model"
CHAT = "tune-large-chat-model"
DISTILLATION = "distillation"
KEY = "projects/p/locations/us-central1/keyRings/r/cryptoKeys/k"

CASES = [
    # (id, pipeline, values, the errors)
    ("defaults", TEXT, {}, []),
    ("all-fine-typed", TEXT, {"location": "europe-west4", "accelerator_type": "TPU",
                              "train_steps": 300, "learning_rate_multiplier": 1,
                              "evaluation_data_uri": "gs://b/eval.jsonl",
                              "evaluation_interval": 10, "enable_early_stopping": False,
                              "enable_checkpoint_selection": "true",
                              "max_context_length": "32k"}, []),
    ("all-fine-strings", TEXT, {"location": "us-central1", "accelerator_type": "GPU",
                                "train_steps": "300", "learning_rate_multiplier": "0.5",
                                "evaluation_data_uri": "gs://b/e.jsonl",
                                "evaluation_interval": "20", "enable_early_stopping": "True",
                                "enable_checkpoint_selection": "default",
                                "max_context_length": "", "encryption_spec_key_name": KEY}, []),
    ("bad-region", TEXT, {"location": "us-central2"},
     [f"location 'us-central2' is not a supported region; use one of: {', '.join(REGIONS)}"]),
    ("empty-location-means-pipeline-region", TEXT, {"location": ""}, []),
    ("accelerator-lowercase", TEXT, {"accelerator_type": "tpu"},
     ["accelerator_type 'tpu' is not 'GPU' or 'TPU' (write 'TPU')"]),
    ("accelerator-unknown", TEXT, {"accelerator_type": "CPU"},
     ["accelerator_type 'CPU' is not 'GPU' or 'TPU'"]),
    ("cmek-outside-us-central1", TEXT, {"location": "europe-west4",
                                        "encryption_spec_key_name": KEY},
     ["encryption_spec_key_name (CMEK) is only supported in us-central1, not in location "
      "'europe-west4'"]),
    ("cmek-with-tpu", TEXT, {"location": "us-central1", "accelerator_type": "TPU",
                             "encryption_spec_key_name": KEY},
     ["encryption_spec_key_name (CMEK) is not supported with accelerator_type 'TPU' (TPU tuning "
      "runs in europe-west4); use 'GPU' or drop the key"]),
    ("empty-cmek-is-no-cmek", TEXT, {"location": "asia-northeast3", "accelerator_type": "TPU",
                                     "encryption_spec_key_name": ""}, []),
    ("steps-zero", TEXT, {"train_steps": 0},
     ["train_steps must be an integer from 1 to 100000, not 0"]),
    ("steps-negative-string", TEXT, {"train_steps": "-5"},
     ["train_steps must be an integer from 1 to 100000, not '-5'"]),
    ("steps-fraction", TEXT, {"train_steps": 2.5},
     ["train_steps must be an integer from 1 to 100000, not 2.5"]),
    ("steps-bool", TEXT, {"train_steps": True},
     ["train_steps must be an integer from 1 to 100000, not True"]),
    ("steps-float-integer-ok", TEXT, {"train_steps": 300.0}, []),
    ("learning-rate-zero", TEXT, {"learning_rate_multiplier": 0},
     ["learning_rate_multiplier must be a number above 0 and at most 100, not 0"]),
    ("learning-rate-text", TEXT, {"learning_rate_multiplier": "fast"},
     ["learning_rate_multiplier must be a number above 0 and at most 100, not 'fast'"]),
    ("learning-rate-nan", TEXT, {"learning_rate_multiplier": "nan"},
     ["learning_rate_multiplier must be a number above 0 and at most 100, not 'nan'"]),
    ("steps-beyond-the-maximum", TEXT, {"train_steps": 1e12},
     ["train_steps must be an integer from 1 to 100000, not 1000000000000.0"]),
    ("steps-maximum-ok", TEXT, {"train_steps": "100000"}, []),
    ("steps-full-width-digits", TEXT, {"train_steps": "\uff13\uff10\uff10"},
     ["train_steps must be an integer from 1 to 100000, not '\uff13\uff10\uff10'"]),
    ("steps-huge-string", TEXT, {"train_steps": "9" * 5000},
     ["train_steps must be an integer from 1 to 100000, not '" + "9" * 56 + "..."]),
    ("interval-beyond-the-maximum", TEXT, {"evaluation_interval": 100001,
                                           "evaluation_data_uri": "gs://b/e.jsonl"},
     ["evaluation_interval must be an integer from 1 to 100000, not 100001"]),
    ("learning-rate-infinite", TEXT, {"learning_rate_multiplier": float("inf")},
     ["learning_rate_multiplier must be a number above 0 and at most 100, not inf"]),
    ("learning-rate-beyond-the-maximum", TEXT, {"learning_rate_multiplier": "100.5"},
     ["learning_rate_multiplier must be a number above 0 and at most 100, not '100.5'"]),
    ("learning-rate-huge-integer", TEXT, {"learning_rate_multiplier": 10 ** 400},
     ["learning_rate_multiplier must be a number above 0 and at most 100, not " +
      str(10 ** 400)[:57] + "..."]),
    ("learning-rate-full-width", TEXT, {"learning_rate_multiplier": "\uff11"},
     ["learning_rate_multiplier must be a number above 0 and at most 100, not '\uff11'"]),
    ("learning-rate-exponent-ok", TEXT, {"learning_rate_multiplier": "1e-2"}, []),
    ("display-name-path", TEXT, {"model_display_name": "../../x"},
     ["model_display_name '../../x' is not valid: use 1 to 128 letters, digits, spaces or "
      ". _ @ -, starting with a letter or digit"]),
    ("display-name-trailing-newline", TEXT, {"model_display_name": "x\n"},
     ["model_display_name 'x\\n' is not valid: use 1 to 128 letters, digits, spaces or "
      ". _ @ -, starting with a letter or digit"]),
    ("display-name-ok", TEXT, {"model_display_name": "support bot v1.2"}, []),
    ("parameter-text-too-long", CHAT, {"default_context": "x" * 65_537},
     ["default_context has 65537 characters; at most 65536 are accepted"]),
    ("checkpoint-selection-bad", TEXT, {"enable_checkpoint_selection": "best",
                                        "evaluation_data_uri": "gs://b/e.jsonl"},
     ["enable_checkpoint_selection must be 'true', 'false' or 'default', not 'best'"]),
    ("checkpoint-selection-bool", TEXT, {"enable_checkpoint_selection": False}, []),
    ("context-length-bad", TEXT, {"max_context_length": "16k"},
     ["max_context_length must be '8k', '32k' or empty (implied by the model name), not '16k'"]),
    ("early-stopping-bad", TEXT, {"enable_early_stopping": "maybe"},
     ["enable_early_stopping must be true or false, not 'maybe'"]),
    ("interval-without-eval-data", TEXT, {"evaluation_interval": 50},
     ["evaluation_interval=50 needs evaluation_data_uri (there is no evaluation without "
      "evaluation data)"]),
    ("default-interval-without-eval-data-ok", TEXT, {"evaluation_interval": "20",
                                                      "enable_early_stopping": True,
                                                      "enable_checkpoint_selection": "default"},
     []),
    ("early-stopping-off-without-eval-data-ok", DISTILLATION, {"enable_early_stopping": "false",
                                                               "enable_checkpoint_selection":
                                                                   "false"}, []),
    ("checkpoint-selection-without-eval-data", DISTILLATION,
     {"enable_checkpoint_selection": "true", "evaluation_data_uri": ""},
     ["enable_checkpoint_selection='true' needs evaluation_data_uri (the best checkpoint is "
      "chosen by its evaluation)"]),
    ("chat-eval-data", CHAT, {"evaluation_data_uri": "gs://b/eval.jsonl"},
     ["parameter 'evaluation_data_uri': chat tuning has no evaluation data: tune-large-chat-model "
      "takes no evaluation_data_uri (Vertex's chat template has no evaluation parameters); "
      "remove it"]),
    ("chat-eval-settings-even-defaults", CHAT, {"evaluation_interval": 20,
                                                "enable_checkpoint_selection": "default"},
     ["parameter 'evaluation_interval': chat tuning has no evaluation data: tune-large-chat-model "
      "takes no evaluation_interval (Vertex's chat template has no evaluation parameters); "
      "remove it",
      "parameter 'enable_checkpoint_selection': chat tuning has no evaluation data: "
      "tune-large-chat-model takes no enable_checkpoint_selection (Vertex's chat template has no "
      "evaluation parameters); remove it"]),
    ("several-at-once", TEXT, {"location": "mars", "train_steps": "x"},
     [f"location 'mars' is not a supported region; use one of: {', '.join(REGIONS)}",
      "train_steps must be an integer from 1 to 100000, not 'x'"]),
]


@pytest.mark.parametrize("pipeline,values,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_check_parameters(pipeline, values, expected):
    assert check_parameters(pipeline, values) == expected


@pytest.mark.parametrize("region", REGIONS)
def test_every_documented_region_is_accepted(region):
    assert check_parameters(TEXT, {"location": region}) == []


def test_thirteen_regions():
    assert len(REGIONS) == len(set(REGIONS)) == 13


@pytest.mark.parametrize("name,suggestion", [
    ("accelerator_type:", "accelerator_type"),
    ("Accelerator_Type", "accelerator_type"),
    (" train_steps ", "train_steps"),
    ("trian_steps", "train_steps"),
    ("learning_rate", "learning_rate_multiplier"),
    ("evaluation_data", "evaluation_data_uri"),
    ("something_else", None),
])
def test_suggestions(name, suggestion):
    assert suggest_parameter(name, DOCUMENTED_PARAMETERS[TEXT]) == suggestion


def test_unknown_parameters_are_named():
    known = DOCUMENTED_PARAMETERS[CHAT]
    errors = unknown_parameters({"project": "p", "evaluation_interval": 20, "colour": "red"},
                                known)
    listing = ", ".join(sorted(known))
    assert errors == [f"unknown parameter 'evaluation_interval'; known parameters: {listing}",
                      f"unknown parameter 'colour'; known parameters: {listing}"]
    assert unknown_parameters({"project": "p"}, known) == []


def test_seed_request_typo_is_caught_and_named():
    values = json.loads(SEED_REQUEST.read_text())["runtimeConfig"]["parameterValues"]
    assert unknown_parameters(values, DOCUMENTED_PARAMETERS[TEXT]) == [
        "unknown parameter 'accelerator_type:'; did you mean 'accelerator_type'?"]
    # The rest of that request is valid: CMEK with GPU in us-central1.
    known = {k: v for k, v in values.items() if k in DOCUMENTED_PARAMETERS[TEXT]}
    assert known["location"] == "us-central1" and known["encryption_spec_key_name"]
    assert check_parameters(TEXT, known) == []
