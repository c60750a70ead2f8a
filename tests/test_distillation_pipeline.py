"""distillation: the sample request, and a run of the compiled template end to end.

The run executes the compiled template through the KFP local runner on a tiny student. The
teacher is a rule on loopback in the OpenAI chat-completions shape (tests/fake_teacher.py),
reached through the real OpenAI-compatible backend: a tiny random model writes no rationale,
and ``make run-distill`` shows the method with a real teacher.
"""
from __future__ import annotations

import contextlib
import io
import json
import urllib.request
from pathlib import Path

import pytest

from components.deploy_endpoint import endpoints
from command.main import main
from pipelines.local_run import request_from_file
from pipelines.templates import template_path
from tests.fake_teacher import EXPLAIN_MARK, FakeTeacher, last_input

REPO = Path(__file__).resolve().parent.parent
DISTILLATION_TEMPLATE_URI = "https://us-kfp.pkg.dev/ml-pipeline/distillation/distillation/v1.0.0"


TEAM_WORDS = {"billing": ("charg", "invoice", "refund", "bill", "fee", "card", "discount"),
              "shipping": ("deliver", "arriv", "ship", "courier", "parcel", "package", "box",
                           "tracking"),
              "technical": ("crash", "error", "wifi", "battery", "reset", "screen", "pair",
                            "firmware", "sync", "noise")}


def routing_reply(prompt: str) -> str:
    """The teacher's rule: explains a given team; answers by keywords (account by default) and
    shrugs at urgent messages (so some answers have no label)."""
    message = last_input(prompt).lower()
    if EXPLAIN_MARK in prompt:
        return "Rationale: The message names what the team handles."
    if "urgent" in message:
        return "Hard to say."
    team = next((team for team, words in TEAM_WORDS.items()
                 if any(word in message for word in words)), "account")
    return f"Rationale: The message is about {team} work.\nAnswer: {team}"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_sample_request_body_is_read_as_is(sample_dir):
    request = request_from_file(sample_dir / "distill_request.json")
    assert request.template == template_path(DISTILLATION_TEMPLATE_URI)
    assert request.template == template_path("distillation")
    assert request.parameters["teacher_model_reference"] == "tuned:support-router-teacher"
    teacher = request_from_file(sample_dir / "distill_teacher_request.json")
    assert teacher.template == template_path("tune-large-model")
    assert teacher.parameters["model_display_name"] == "support-router-teacher"


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory, sample_dir) -> tuple[Path, Path]:
    """24 training examples of the sample (4 labeled with a hand-written rationale, 12 labeled,
    8 unlabeled) and its first 10 held-out examples."""
    folder = tmp_path_factory.mktemp("distillation-data")
    train = (sample_dir / "distill_train.jsonl").read_text().splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(train[:4] + train[20:40]))
    held_out = (sample_dir / "distill_eval.jsonl").read_text().splitlines(keepends=True)
    (folder / "eval.jsonl").write_text("".join(held_out[:10]))
    return folder / "train.jsonl", folder / "eval.jsonl"


@pytest.fixture(scope="module")
def teacher():
    server = FakeTeacher("openai", routing_reply)
    yield server
    server.close()


@pytest.fixture(scope="module")
def distillation_run(tmp_path_factory, tiny_model_dir, sample_dir, small_sample, teacher):
    """The run's output folder and what ``tunepipe run`` printed."""
    root = tmp_path_factory.mktemp("distillation-pipeline-root")
    train, evaluation = small_sample
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["run", "--request-file", str(sample_dir / "distill_request.json"),
                     "--pipeline-root", str(root),
                     "--param", f"dataset_uri={train}", "--param", f"evaluation_data_uri={evaluation}",
                     "--param", "model_display_name=tiny-student",
                     "--param", f"teacher_model_reference=openai:{teacher.url}/v1#router",
                     "--param", f"student_model_reference={tiny_model_dir}",
                     "--param", "train_steps=4", "--param", "evaluation_interval=2"])
    assert code == 0, printed.getvalue()[-3000:]
    (run_dir,) = root.iterdir()
    yield run_dir, printed.getvalue()
    endpoints.stop_endpoint("tiny-student", missing_ok=True)


def _rule_answer(input_text: str) -> str | None:
    reply = routing_reply(f"Input: {input_text}")
    return reply.rsplit("Answer: ", 1)[1] if "Answer: " in reply else None


def test_the_teacher_labels_and_explains_and_unparseable_answers_are_counted(
        distillation_run, small_sample):
    run_dir, _ = distillation_run
    rationales = run_dir / "generate-rationales" / "rationale_dataset"
    records = _jsonl(rationales / "train.jsonl")
    given = _jsonl(small_sample[0])
    report = json.loads((rationales / "report.json").read_text())
    # Labeled examples keep their gold label and get the teacher's explanation; unlabeled ones
    # get the teacher's answer, or are left out and counted when it gave none.
    expected = [(e["output_text"], "gold") if "output_text" in e else
                (_rule_answer(e["input_text"]), "teacher") for e in given]
    kept = [label for label in expected if label[0] is not None]
    assert [(r["output_text"], r["label_source"]) for r in records] == kept
    assert report["examples"]["excluded"] == len(expected) - len(kept) > 0
    assert all(r["rationale"] for r in records)
    # The teacher was scored on the evaluation set, and the evaluation data came along.
    held_out = _jsonl(small_sample[1])
    assert report["held_out"]["correct"] == sum(_rule_answer(e["input_text"]) == e["output_text"]
                                                for e in held_out)
    assert (rationales / "eval.jsonl").read_bytes() == (
        run_dir / "validate-dataset" / "validated_dataset" / "eval.jsonl").read_bytes()


def test_the_student_is_tuned_on_label_and_rationale_tasks(distillation_run, tiny_model_dir):
    from components.common.model_loading import load_tokenizer
    from components.common.artifacts.token_dataset import TokenDataset

    run_dir, _ = distillation_run
    records = _jsonl(run_dir / "generate-rationales" / "rationale_dataset" / "train.jsonl")
    train = TokenDataset(run_dir / "transform" / "tokenized_dataset" / "train")
    assert len(train) == 2 * len(records)  # every kept example has a rationale
    assert train.meta["input_prefix"] == "[label] "
    assert [task["name"] for task in train.meta["tasks"]] == ["label", "rationale"]
    tokenizer = load_tokenizer(tiny_model_dir)
    first_ids, first_mask = train[0]
    assert "[label] " + records[0]["input_text"] in tokenizer.decode(first_ids)
    assert set(first_mask.tolist()) == {0, 1}
    metrics = _jsonl(run_dir / "tune" / "tuned_model" / "metrics.jsonl")
    steps = [m for m in metrics if "train_total_loss" in m]
    assert len(steps) == 4 and any("train_label_loss" in m and "train_rationale_loss" in m
                                   for m in steps)


def test_evaluation_and_the_endpoint_use_the_label_task_only(distillation_run, teacher):
    from components.common.model_registry import get_model

    run_dir, printed = distillation_run
    results = json.loads((run_dir / "evaluate" / "evaluation_results" / "results.json").read_text())
    assert results["evaluated"] is True and results["input_prefix"] == "[label] "
    metadata = json.loads((get_model("tiny-student").path / "tunepipe_model.json").read_text())
    assert metadata["input_prefix"] == "[label] "
    record = endpoints.get_endpoint("tiny-student")
    with urllib.request.urlopen(record.url, timeout=30) as response:
        assert json.loads(response.read())["input_prefix"] == "[label] "
    summary = printed.split("Outputs of this run:", 1)[1]
    assert f"Teacher:              openai:{teacher.url}/v1#router: " in summary
    assert "teacher = label (evaluation set)" in summary
    assert "Scores on the evaluation set (base -> tuned" in summary
    phases = summary.split("Time by phase (", 1)[1].splitlines()[1]
    assert [part.strip().rsplit(" ", 1)[0] for part in phases.split(",")] == [
        "compile", "validate", "teacher", "transform", "tune", "evaluate", "deploy"]
