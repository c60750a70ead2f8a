"""tune-large-chat-model: its Vertex parameters, its refusals, and a run end to end.

The end-to-end run executes the compiled template through the KFP local runner on a tiny model
and the bundled chat sample, with the held-out check the run summary prints.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from components.deploy_endpoint import endpoints
from command.main import main
from command.run_summary import tunepipe_command
from pipelines.local_run import request_from_file
from pipelines.templates import read_template, template_path

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE_URI = ("https://us-kfp.pkg.dev/ml-pipeline/large-language-model-pipelines/"
                     "tune-large-chat-model/v3.0.0")
VERTEX_PARAMETERS = {  # tune-large-chat-model v3.0.0: name -> (type, default)
    "project": ("STRING", None), "location": ("STRING", ""),
    "model_display_name": ("STRING", None), "dataset_uri": ("STRING", None),
    "large_model_reference": ("STRING", "chat-bison@002"), "default_context": ("STRING", ""),
    "accelerator_type": ("STRING", "GPU"), "train_steps": ("NUMBER_INTEGER", 300),
    "learning_rate_multiplier": ("NUMBER_DOUBLE", 1.0),
    "tensorboard_resource_id": ("STRING", ""), "encryption_spec_key_name": ("STRING", ""),
    "max_context_length": ("STRING", ""),
}


def make_samples_module():
    spec = importlib.util.spec_from_file_location("make_samples", REPO / "samples" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parameters_are_vertex_s_chat_template():
    name, parameters = read_template(template_path("tune-large-chat-model"))
    assert name == "tune-large-chat-model"
    assert {n: (p.type, p.default) for n, p in parameters.items()} == VERTEX_PARAMETERS
    assert all(p.description for p in parameters.values()), "every parameter is documented"
    assert {n for n, p in parameters.items() if p.required} == {"project", "model_display_name",
                                                                "dataset_uri"}


@pytest.mark.parametrize("name, value", [("evaluation_data_uri", "gs://b/eval.jsonl"),
                                         ("enable_checkpoint_selection", "default")])
def test_evaluation_parameters_are_refused_before_any_work(tmp_path, capsys, sample_dir, name,
                                                           value):
    code = main(["run", "tune-large-chat-model", "--pipeline-root", str(tmp_path),
                 "--param", "project=p", "--param", "model_display_name=m",
                 "--param", f"dataset_uri={sample_dir / 'support_chat_train.jsonl'}",
                 "--param", f"{name}={value}"])
    assert code == 2
    assert (f"parameter {name!r}: chat tuning has no evaluation data: tune-large-chat-model "
            f"takes no {name} (Vertex's chat template has no evaluation parameters); remove it"
            ) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_sample_request_body_is_read_as_is():
    request = request_from_file(REPO / "samples" / "chat_request.json")
    assert request.template == template_path(CHAT_TEMPLATE_URI)
    assert request.template == template_path("tune-large-chat-model")
    samples = make_samples_module()
    assert request.parameters["default_context"] == samples.DEFAULT_CONTEXT
    makefile = (REPO / "Makefile").read_text()
    assert f"CHAT_SIGN_OFF := {samples.SIGN_OFF}\n" in makefile


def test_held_out_file_must_be_chat_data(tmp_path, capsys, sample_dir):
    bad = tmp_path / "held_out.jsonl"
    bad.write_text('{"messages": [{"author": "user", "content": "hi"}]}\n')
    code = main(["run", "--request-file", str(REPO / "samples" / "chat_request.json"),
                 "--pipeline-root", str(tmp_path / "runs"), "--held-out", str(bad)])
    assert code == 2
    assert (f"{bad}:1: messages[0].author: the conversation must end with \"assistant\", not "
            "\"user\"; held-out conversations use the chat format") in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir, sample_dir):
    """The run's output folder and what ``tunepipe run`` printed."""
    root = tmp_path_factory.mktemp("chat-pipeline-root")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["run", "--request-file", str(sample_dir / "chat_request.json"),
                     "--pipeline-root", str(root),
                     "--param", "model_display_name=tiny-chat",
                     "--param", f"dataset_uri={sample_dir / 'support_chat_train.jsonl'}",
                     "--param", f"large_model_reference={tiny_model_dir}",
                     "--param", "train_steps=2",
                     "--held-out", str(sample_dir / "support_chat_heldout.jsonl"),
                     "--expect-ending", make_samples_module().SIGN_OFF])
    assert code == 0, printed.getvalue()[-3000:]
    (run_dir,) = root.iterdir()
    yield run_dir, printed.getvalue()
    endpoints.stop_endpoint("tiny-chat", missing_ok=True)


def test_chat_data_is_tokenized_with_the_default_context(chat_run, tiny_model_dir):
    from components.common.model_loading import load_tokenizer
    from components.common.artifacts.token_dataset import TokenDataset

    run_dir, _ = chat_run
    context = make_samples_module().DEFAULT_CONTEXT
    validated = run_dir / "validate-dataset" / "validated_dataset"
    assert len((validated / "train.jsonl").read_text().splitlines()) == 240
    assert not (validated / "eval.jsonl").exists()
    train = TokenDataset(run_dir / "transform" / "tokenized_dataset" / "train")
    # Validation counted the tokens with the default context: transform reused them.
    assert len(train) == 240
    assert train.meta["encoding_key"] == TokenDataset(validated / "tokens" / "train").meta[
        "encoding_key"]
    tokenizer = load_tokenizer(tiny_model_dir)
    lines = (validated / "train.jsonl").read_text().splitlines()
    for line, (ids, mask) in zip(lines, train):
        example = json.loads(line)
        text = tokenizer.decode(ids)
        own = example.get("context")
        assert text.startswith(f"<|im_start|>system\n{own or context}<|im_end|>\n")
        answers = [m["content"] for m in example["messages"] if m["author"] == "assistant"]
        assert tokenizer.decode(ids[mask == 1]) == "".join(f"{a}<|im_end|>\n" for a in answers)


def test_the_final_checkpoint_is_registered_and_served(chat_run):
    from components.common.model_registry import get_model

    run_dir, _ = chat_run
    selected = json.loads((run_dir / "select-checkpoint" / "selected_model" /
                           "tunepipe_model.json").read_text())
    assert selected["step"] == 2
    metadata = json.loads((get_model("tiny-chat").path / "tunepipe_model.json").read_text())
    assert metadata["step"] == 2 and metadata["project"] == "local-project"
    results = json.loads((run_dir / "evaluate" / "evaluation_results" / "results.json").read_text())
    assert results["evaluated"] is False
    record = json.loads((run_dir / "deploy-endpoint" / "endpoint").read_text())
    assert record["model_dir"] == str(get_model("tiny-chat").path)


def test_summary_compares_base_and_tuned_on_held_out_conversations(chat_run, sample_dir):
    summary = chat_run[1].split("Outputs of this run:", 1)[1]
    assert f"Held-out conversations: {sample_dir / 'support_chat_heldout.jsonl'} (20)" in summary
    assert re.search(r"rule followed +\d+/20 = \d\.\d\d -> +\d+/20 = \d\.\d\d", summary)
    assert re.search(r"conversation \d+, side by side:\n    user:  .+\n    base:  ", summary)
    first_message = json.loads((sample_dir / "support_chat_train.jsonl").open().readline()
                               )["messages"][0]["content"]
    context = make_samples_module().DEFAULT_CONTEXT
    assert (f"Chat with it:\n  {tunepipe_command()} endpoints predict tiny-chat --message "
            f"{shlex.quote(first_message)} --context {shlex.quote(context)}\n") in summary
    phases = summary.split("Time by phase (", 1)[1].splitlines()[1]
    names = [part.strip().rsplit(" ", 1)[0] for part in phases.split(",")]
    assert names == ["compile", "validate", "transform", "tune", "evaluate", "deploy",
                     "held-out check"]
