"""generate_rationales: prompts and parsing, every teacher backend against a real local server
(tunepipe's endpoint, and plain http.servers in the OpenAI and Vertex shapes for failures),
resuming after a SIGKILL, and the local backend on a tiny model."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fake_teacher import EXPLAIN_MARK, FakeTeacher, last_input
from components.common.artifacts.validated_dataset import EVAL_FILE, TRAIN_FILE
from components.generate_rationales.examples import ExampleDataError, parse_examples
from components.generate_rationales.http_calls import RetryPolicy, retry_after_seconds
from components.generate_rationales.prompting import (ANSWER, EMPTY, EXPLAIN, MISSING_ANSWER,
                                                      MISSING_RATIONALE, OK, build_request,
                                                      choose_demonstrations, normalize_answer,
                                                      parse_teacher_output)
from components.generate_rationales.rationales import (CALLS_FILE, REPORT_FILE,
                                                       RationaleError, RationaleSettings,
                                                       generate_rationales_for_pipeline,
                                                       plan_requests)
from components.generate_rationales.report import render_markdown
from components.generate_rationales.teacher_reference import (LOCAL, OPENAI, VERTEX,
                                                              TeacherReferenceError,
                                                              parse_teacher_reference)
from components.generate_rationales.teachers import TeacherSettings

ROOT = Path(__file__).resolve().parent.parent
FAST = RetryPolicy(max_retries=2, timeout_seconds=5, initial_backoff_seconds=0.01)
SETTINGS = RationaleSettings(few_shot_count=2, agreement_examples=-1,
                             teacher=TeacherSettings(max_output_tokens=8, seed=7))
EXAMPLES = [
    {"input_text": "Review: I loved it", "output_text": "positive",
     "rationale": "Loving a thing is a positive feeling."},
    {"input_text": "Review: Terrible food", "output_text": "negative"},
    {"input_text": "Review: Great service", "output_text": "positive"},
    {"input_text": "Review: Cold and bland"},
    {"input_text": "Review: Wonderful staff", "output_text": None},
    {"input_text": "Review: ??? mumble"},
]
API_KEY = "sk-test-secret-123"


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


# --------------------------------------------------------------------------- prompts, parsing


@pytest.mark.parametrize("text, mode, rationale, answer, status", [
    ("Rationale: it says loved.\nAnswer: positive", ANSWER, "it says loved.", "positive", OK),
    ("  rationale :  spaced out\n\n   ANSWER:   Positive.  ", ANSWER, "spaced out", "Positive.", OK),
    ("**Rationale:** bold\n**Answer:** negative", ANSWER, "bold", "negative", OK),
    ("Reasoning: a\nb\nFinal answer: c\nd", ANSWER, "a\nb", "c\nd", OK),
    ("It is great, so the answer is positive.", ANSWER,
     "It is great, so the answer is positive.", "positive", OK),
    ("Some thinking first.\nAnswer: negative", ANSWER, "Some thinking first.", "negative", OK),
    ("Answer: negative\nRationale: late", ANSWER, "late", "negative", OK),
    ("Answer: negative", ANSWER, None, "negative", MISSING_RATIONALE),
    ("Rationale: thinking, no conclusion", ANSWER, "thinking, no conclusion", None, MISSING_ANSWER),
    ("I cannot help with that.", ANSWER, "I cannot help with that.", None, MISSING_ANSWER),
    ("Answer:", ANSWER, None, None, MISSING_ANSWER),
    ("   \n ", ANSWER, None, None, EMPTY),
    (None, EXPLAIN, None, None, EMPTY),
    ("Rationale: food described as terrible.", EXPLAIN, "food described as terrible.", None, OK),
    ("Plain reasoning without labels.", EXPLAIN, "Plain reasoning without labels.", None, OK),
    ("Rationale: r\nAnswer: negative", EXPLAIN, "r", "negative", OK),
    ("Rationale:\nAnswer: negative", EXPLAIN, None, "negative", MISSING_RATIONALE),
])
def test_parse_teacher_output(text, mode, rationale, answer, status):
    parsed = parse_teacher_output(text, mode)
    assert (parsed.rationale, parsed.answer, parsed.status) == (rationale, answer, status)


def test_answers_compare_without_case_quotes_or_trailing_punctuation():
    assert normalize_answer(' "Positive." ') == normalize_answer("positive")
    assert normalize_answer("over  21 million") == "over 21 million"
    assert normalize_answer("positive") != normalize_answer("negative")


def test_prompts_are_seeded_few_shot_without_the_example_asked_about():
    examples = parse_examples("".join(json.dumps(e) + "\n" for e in EXAMPLES), "data.jsonl")
    labeled = {e.index for e in examples if e.labeled}
    for example in examples:
        chosen = choose_demonstrations(examples, example.index, 2, seed=7)
        assert len(chosen) == 2 and example.index not in {d.index for d in chosen}
        assert {d.index for d in chosen} <= labeled
        if example.index != 0:  # the hand-written rationale is preferred
            assert chosen[0].index == 0
        assert chosen == choose_demonstrations(examples, example.index, 2, seed=7)
    assert len(choose_demonstrations(examples, 3, 10, seed=0)) == 3  # only 3 labeled examples

    unlabeled = build_request(examples, examples[3], ANSWER, 2, seed=7)
    assert unlabeled.key == "3:answer"
    system, user = unlabeled.messages
    assert system["role"] == "system" and user["role"] == "user"
    assert user["content"].startswith('Answer the last input the way the examples are answered. '
                                      'First write "Rationale:"')
    assert "Input: Review: I loved it\nRationale: Loving a thing is a positive feeling.\n" \
           "Answer: positive" in user["content"]
    assert user["content"].endswith("\n\nInput: Review: Cold and bland")

    explain = build_request(examples, examples[1], EXPLAIN, 2, seed=7)
    assert explain.messages[1]["content"].endswith("Input: Review: Terrible food\nAnswer: negative")
    assert "Explain it" in explain.messages[1]["content"]
    with pytest.raises(ValueError, match="no output_text to explain"):
        build_request(examples, examples[3], EXPLAIN, 2, seed=7)

    # An evaluation example shares index 0 with a training example, which stays a demonstration:
    # its requests are keyed apart and every labeled training example may be shown.
    (held_out,) = parse_examples('{"input_text": "Review: Meh", "output_text": "negative"}\n',
                                 "eval.jsonl")
    scored = build_request(examples, held_out, ANSWER, 3, seed=7, held_out=True)
    assert scored.key == "eval:0:answer" and scored.held_out
    assert scored.messages[1]["content"].count("Input:") == 4  # all 3 labeled examples, then it
    assert "Input: Review: I loved it\n" in scored.messages[1]["content"]

    zero_shot = parse_examples('{"input_text": "a"}\n{"input_text": "b"}\n', "u.jsonl")
    content = build_request(zero_shot, zero_shot[0], ANSWER, 3, 0).messages[1]["content"]
    assert content.count("Input:") == 1 and content.endswith("Input: a")


def test_requests_planned_per_example():
    examples = parse_examples("".join(json.dumps(e) + "\n" for e in EXAMPLES), "data.jsonl")
    keys = [r.key for r in plan_requests(examples, SETTINGS)]
    assert keys == ["0:explain", "0:answer", "1:explain", "1:answer", "2:explain", "2:answer",
                    "3:answer", "4:answer", "5:answer"]
    sampled = RationaleSettings(agreement_examples=1, teacher=TeacherSettings(seed=3))
    keys = [r.key for r in plan_requests(examples, sampled)]
    assert sum(k.endswith(":answer") for k in keys[:-3]) == 1 and len(keys) == 7
    assert keys == [r.key for r in plan_requests(examples, sampled)]


@pytest.mark.parametrize("text, message", [
    ('{"input_text": "a"}\nnot json\n', "data.jsonl:2: not valid JSON"),
    ('{"input_text": ""}\n', "data.jsonl:1: input_text must be a non-empty string"),
    ('["a"]\n', "data.jsonl:1: expected a JSON object"),
    ('{"input_text": "a", "output_text": 3}\n', "data.jsonl:1: output_text must be"),
    ("\n\n", "data.jsonl: no examples"),
])
def test_bad_data_is_reported_with_file_and_line(text, message):
    with pytest.raises(ExampleDataError, match=message):
        parse_examples(text, "data.jsonl")


@pytest.mark.parametrize("reference, kind, target, model", [
    ("text-unicorn@001", LOCAL, "text-unicorn@001", None),
    ("local:/models/teacher.gguf", LOCAL, "/models/teacher.gguf", None),
    ("openai:http://127.0.0.1:8000/v1#Qwen2.5-7B", OPENAI, "http://127.0.0.1:8000/v1", "Qwen2.5-7B"),
    ("openai:https://api.openai.com/v1/chat/completions#gpt-4o", OPENAI,
     "https://api.openai.com/v1/chat/completions", "gpt-4o"),
    ("openai:http://localhost:11434/v1", OPENAI, "http://localhost:11434/v1", None),
    ("projects/proj-1/locations/europe-west4/endpoints/123", VERTEX,
     "projects/proj-1/locations/europe-west4/endpoints/123", None),
    ("vertex:projects/proj-1/locations/us-central1/publishers/google/models/text-unicorn@001",
     VERTEX, "projects/proj-1/locations/us-central1/publishers/google/models/text-unicorn@001",
     None),
    ("publishers/google/models/text-unicorn@001", VERTEX,
     "projects/my-project/locations/us-central1/publishers/google/models/text-unicorn@001", None),
])
def test_teacher_references(reference, kind, target, model):
    parsed = parse_teacher_reference(reference, project="my-project")
    assert (parsed.kind, parsed.target, parsed.model) == (kind, target, model)


@pytest.mark.parametrize("reference, message", [
    ("", "teacher_model_reference is empty"),
    ("openai:localhost:8000", "openai: needs an http\\(s\\) base URL"),
    ("projects/p/endpoints/1", "is not a Vertex resource"),
    ("publishers/google/models/text-unicorn@001", "needs a project"),
    ("http://127.0.0.1:8000/v1", "say which API the URL speaks, e.g. openai:http"),
])
def test_bad_teacher_references_show_the_syntax(reference, message):
    with pytest.raises(TeacherReferenceError, match=message):
        parse_teacher_reference(reference)


def test_retry_after_header():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert 0 <= retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


# --------------------------------------------------------------------------- fake teachers


def fake_reply(prompt: str) -> str:
    """A rule-based teacher: explains given labels, labels reviews, rambles on '???'."""
    query = last_input(prompt)
    if EXPLAIN_MARK in prompt:
        return f"Rationale: The review says {query.split(': ', 1)[1].lower()}."
    if "???" in query:
        return "Hmm, hard to say."
    positive = any(w in query for w in ("loved", "Great", "Wonderful", "Terrible"))
    return f"Rationale: The words show the mood.\nAnswer: {'Positive.' if positive else 'negative'}"


@pytest.fixture
def fake_openai():
    servers = []

    def start(script=None) -> FakeTeacher:
        servers.append(FakeTeacher("openai", fake_reply, script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def fake_vertex(monkeypatch):
    servers = []

    def start(script=None) -> FakeTeacher:
        servers.append(FakeTeacher("vertex", fake_reply, script))
        monkeypatch.setenv("TUNEPIPE_VERTEX_API_ENDPOINT", servers[-1].url)
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openai_teacher_labels_explains_and_measures_agreement(fake_openai, data_file, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("TUNEPIPE_TEACHER_API_KEY", API_KEY)
    server = fake_openai(lambda n, _: (429, {"Retry-After": "0"}, {"error": "slow down"})
                         if n == 1 else None)
    out = tmp_path / "out"
    run = generate_rationales_for_pipeline(str(data_file), f"openai:{server.url}/v1#big-teacher",
                                           out, SETTINGS, concurrency=3, policy=FAST,
                                           show_progress=False)
    assert len(server.requests) == 9 + 1  # 9 requests, one of them answered 429 first
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert {r["authorization"] for r in server.requests} == {f"Bearer {API_KEY}"}
    body = server.requests[-1]["body"]
    assert body["model"] == "big-teacher" and body["max_tokens"] == 8 and body["seed"] == 7

    records = _read_jsonl(out / TRAIN_FILE)
    assert records == run.records and not (out / EVAL_FILE).exists()  # a JSONL file: no eval
    by_index = {r["index"]: r for r in records}
    assert sorted(by_index) == [0, 1, 2, 3, 4]  # "??? mumble" has no answer: excluded
    assert by_index[1] == {"index": 1, "input_text": "Review: Terrible food",
                           "output_text": "negative", "rationale": "The review says terrible food.",
                           "label_source": "gold", "parse_status": "ok",
                           "teacher_answer": "Positive."}
    assert by_index[3] == {"index": 3, "input_text": "Review: Cold and bland",
                           "output_text": "negative", "rationale": "The words show the mood.",
                           "label_source": "teacher", "parse_status": "ok", "teacher_answer": None}
    assert by_index[4]["output_text"] == "Positive." and by_index[4]["label_source"] == "teacher"

    report = json.loads((out / REPORT_FILE).read_text())
    assert report["examples"] == {"total": 6, "labeled": 3, "unlabeled": 3, "kept": 5,
                                  "excluded": 1, "with_rationale": 5, "label_only": 0}
    assert report["excluded"] == [{"index": 5, "line": 6, "status": MISSING_ANSWER,
                                   "reply": "Hmm, hard to say."}]
    assert report["agreement"]["checked"] == 3 and report["agreement"]["agreed"] == 2
    assert report["agreement"]["disagreements"] == [
        {"index": 1, "gold": "negative", "teacher": "Positive.", "status": OK}]
    assert report["calls"]["made"] == 9 and report["calls"]["retries"] == 1
    assert report["tokens"] == {"prompt": 900, "completion": 90}
    assert report["parse"]["answer"]["failures"] == 1
    markdown = render_markdown(report)
    assert "| teacher agrees with gold | 66.7% (2 of 3" in markdown
    assert "Hmm, hard to say." in markdown and "The review says terrible food." in markdown
    for path in out.iterdir():  # the key is never written anywhere
        assert API_KEY not in path.read_text()


def test_vertex_teacher_gives_up_after_retries_with_a_clear_error(fake_vertex, data_file,
                                                                  tmp_path, caplog):
    server = fake_vertex(lambda n, _: (500, {}, b"backend exploded: shard 7 down"))
    with pytest.raises(RationaleError) as error:
        generate_rationales_for_pipeline(str(data_file), "publishers/google/models/text-unicorn@001",
                                         tmp_path / "out", SETTINGS, project="proj-1",
                                         concurrency=1, policy=FAST, show_progress=False)
    message = str(error.value)
    assert ("example 0 (explain): http://127.0.0.1:" in message
            and "/v1/projects/proj-1/locations/us-central1/publishers/google/models/"
                "text-unicorn@001:predict failed 3 times, giving up; last: HTTP 500\n" in message)
    assert "0 of 9 teacher answers are saved" in message and "run again" in message
    # the body is the server's: this machine's log shows it, the message (a job's error) not
    assert "backend exploded" not in message and "backend exploded: shard 7 down" in caplog.text
    assert len(server.requests) == 3  # max_retries=2; nothing else started after the failure
    assert server.requests[0]["body"]["parameters"] == {"temperature": 0.0, "maxOutputTokens": 8,
                                                       "topP": 1.0}


def test_vertex_teacher_retries_a_timeout_then_reports_one_that_persists(fake_vertex, data_file,
                                                                        tmp_path):
    def slow_first(n, prompt):
        if n == 1:
            time.sleep(1.0)
        return None

    server = fake_vertex(slow_first)
    reference = "projects/proj-1/locations/europe-west4/endpoints/42"
    quick = RetryPolicy(max_retries=2, timeout_seconds=0.4, initial_backoff_seconds=0.01)
    run = generate_rationales_for_pipeline(str(data_file), reference, tmp_path / "a", SETTINGS,
                                           concurrency=2, policy=quick, show_progress=False)
    assert run.report["calls"]["retries"] == 1 and run.report["examples"]["kept"] == 5
    assert server.requests[0]["path"] == f"/v1/{reference}:predict"

    fake_vertex(lambda n, _: time.sleep(1.0))
    with pytest.raises(RationaleError, match=r"failed 2 times, giving up; last: no answer within "
                                             r"0.4 s"):
        generate_rationales_for_pipeline(str(data_file), reference, tmp_path / "b", SETTINGS,
                                         concurrency=1, show_progress=False,
                                         policy=RetryPolicy(max_retries=1, timeout_seconds=0.4,
                                                            initial_backoff_seconds=0.01))


@pytest.mark.parametrize("reply, message, attempts", [
    ((200, {}, b"<html>upstream proxy error</html>"),
     "failed 3 times, giving up; last: HTTP 200 with a body that is not JSON\n", 3),
    ((200, {}, {"object": "error"}), "answered without choices[0].message.content\n", 1),
    ((404, {}, {"error": {"message": "model 'big' not found"}}),
     "answered HTTP 404: \"model 'big' not found\" (not retried)", 1),
])
def test_garbage_and_client_errors_fail_clearly(fake_openai, data_file, tmp_path, reply, message,
                                                attempts):
    server = fake_openai(lambda n, _: reply)
    with pytest.raises(RationaleError) as error:
        generate_rationales_for_pipeline(str(data_file), f"openai:{server.url}/v1#big",
                                         tmp_path / "out", SETTINGS, concurrency=1, policy=FAST,
                                         show_progress=False)
    assert "example 0 (explain)" in str(error.value) and message in str(error.value)
    assert len(server.requests) == attempts


def _cli(data_file: Path, teacher: str, out: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "components.generate_rationales.cli", "--data", str(data_file),
         "--teacher", teacher, "--output", str(out), "--few-shot", "2", "--seed", "7",
         "--agreement-examples", "-1", "--max-output-tokens", "8", "--concurrency", "1",
         "--initial-backoff", "0.01", "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_a_killed_run_resumes_without_asking_again(fake_openai, data_file, tmp_path):
    hung, release = threading.Event(), threading.Event()

    def hang_on_fourth(n, prompt):
        if n == 4:
            hung.set()
            release.wait(60)
            return 503, {}, b"too late"
        return None

    server = fake_openai(hang_on_fourth)
    out = tmp_path / "out"
    teacher = f"openai:{server.url}/v1#big"
    first = _cli(data_file, teacher, out)
    try:
        assert hung.wait(60), first.communicate(timeout=10)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        release.set()
    assert len(_read_jsonl(out / CALLS_FILE)) == 3 and not (out / TRAIN_FILE).exists()

    second = _cli(data_file, teacher, out)
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    assert "5 of 6 examples kept" in stdout
    counts = server.keys()
    assert len(counts) == 9 and sum(counts.values()) == 10
    assert [key for key, count in counts.items() if count > 1] == [(ANSWER, "Review: Terrible food")]
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["calls"]["made"] == 6 and report["calls"]["reused"] == 3
    assert len(_read_jsonl(out / CALLS_FILE)) == 9

    # A third run asks nothing; a changed prompt (another seed) asks everything again.
    assert _cli(data_file, teacher, out).wait(60) == 0 and sum(server.keys().values()) == 10
    before = len(server.requests)
    generate_rationales_for_pipeline(str(data_file), teacher, out,
                                     RationaleSettings(few_shot_count=2, agreement_examples=-1,
                                                       teacher=TeacherSettings(seed=8)),
                                     policy=FAST, show_progress=False)
    assert len(server.requests) - before == 9
    assert json.loads((out / REPORT_FILE).read_text())["calls"]["stale_log_entries"] == 9


def test_component_writes_dataset_report_and_metrics(fake_openai, data_file, tmp_path):
    from kfp import compiler, dsl

    from components.generate_rationales.component import generate_rationales

    compiler.Compiler().compile(generate_rationales, str(tmp_path / "component.yaml"))
    validated = tmp_path / "validated"
    validated.mkdir()
    shutil.copy(data_file, validated / TRAIN_FILE)
    evaluation = '{"input_text": "Review: Awful", "output_text": "negative"}\n'
    (validated / EVAL_FILE).write_text(evaluation)
    server = fake_openai()
    outputs = {"rationale_dataset": dsl.Dataset(name="rationale_dataset",
                                                uri=str(tmp_path / "rationales")),
               "report": dsl.Markdown(name="report", uri=str(tmp_path / "report.md")),
               "metrics": dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))}
    generate_rationales.python_func(
        validated_dataset=dsl.Dataset(name="validated_dataset", uri=str(validated)),
        teacher_model_reference=f"openai:{server.url}/v1#big", few_shot_count=2, seed=7,
        agreement_examples=-1, max_output_tokens=8, **outputs)
    # The output is a validated dataset folder: transform and evaluate read it as they read
    # validate_dataset's (tests/test_transform.py tokenizes one).
    assert len(_read_jsonl(tmp_path / "rationales" / TRAIN_FILE)) == 5
    assert (tmp_path / "rationales" / EVAL_FILE).read_text() == evaluation
    # Again on the same examples as a JSONL file, without evaluation data: the answers are
    # reused, and the earlier eval.jsonl does not stay behind.
    calls = len(server.requests)
    generate_rationales_for_pipeline(str(data_file), f"openai:{server.url}/v1#big",
                                     tmp_path / "rationales", SETTINGS, policy=FAST,
                                     show_progress=False)
    assert len(server.requests) == calls and not (tmp_path / "rationales" / EVAL_FILE).exists()
    assert "# Teacher rationales" in (tmp_path / "report.md").read_text()
    metrics = outputs["metrics"].metadata
    assert metrics["kept_examples"] == 5.0 and metrics["excluded_examples"] == 1.0
    assert metrics["agreement_rate"] == pytest.approx(2 / 3)
    # 9 calls for the training examples, 1 for the evaluation example: the teacher's score there.
    assert outputs["rationale_dataset"].metadata["teacher_calls"] == 10.0
    assert metrics["teacher_eval_accuracy"] == 1.0
    assert "| teacher on the evaluation data | 100.0% (1 of 1 answers equal the label; 0 " \
           "unparseable) |" in (tmp_path / "report.md").read_text()


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def tiny_endpoint(tmp_path_factory, tiny_model_dir):
    """tunepipe's endpoint server (a real process) serving the tiny model."""
    from components.common.model_loading import FULL_MODEL_DIR, TUNED_MODEL_METADATA
    from components.deploy_endpoint import endpoints

    folder = tmp_path_factory.mktemp("tiny-endpoint-model")
    shutil.copytree(tiny_model_dir, folder / FULL_MODEL_DIR)
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)  # the tokenizer beside it
    (folder / TUNED_MODEL_METADATA).write_text(json.dumps(
        {"base_model": {"reference": str(tiny_model_dir), "checkpoint": str(tiny_model_dir)}}))
    endpoint = endpoints.start_endpoint("rationale-teacher", folder)
    yield endpoint
    endpoints.stop_endpoint("rationale-teacher", missing_ok=True)


def _check_real_teacher_run(run, total_calls: int) -> None:
    report = run.report
    examples = report["examples"]
    assert examples["kept"] + examples["excluded"] == examples["total"] == 6
    assert {r["index"] for r in run.records if r["label_source"] == "gold"} == {0, 1, 2}
    assert report["calls"]["made"] == total_calls
    assert report["tokens"]["prompt"] > 50 * total_calls and report["tokens"]["completion"] > 0
    assert report["parse"]["answer"]["requests"] == 6 and report["agreement"]["checked"] == 3
    assert len(report["excluded"]) == examples["excluded"]
    render_markdown(report)


def test_tunepipe_endpoint_as_openai_and_as_vertex_teacher(tiny_endpoint, data_file, tmp_path,
                                                           monkeypatch):
    # No model name: the endpoint's one model comes from GET /v1/models.
    openai_run = generate_rationales_for_pipeline(
        str(data_file), f"openai:{tiny_endpoint.url}/v1", tmp_path / "openai", SETTINGS,
        concurrency=4, policy=FAST, show_progress=False)
    assert openai_run.report["teacher"]["description"].endswith("model 'rationale-teacher'")
    _check_real_teacher_run(openai_run, 9)

    monkeypatch.setenv("TUNEPIPE_VERTEX_API_ENDPOINT", tiny_endpoint.url)
    vertex_run = generate_rationales_for_pipeline(
        str(data_file), "projects/proj-1/locations/us-central1/endpoints/rationale-teacher",
        tmp_path / "vertex", SETTINGS, concurrency=4, policy=FAST, show_progress=False)
    _check_real_teacher_run(vertex_run, 9)


def test_local_teacher_on_a_tiny_model(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    run = generate_rationales_for_pipeline(str(data_file), str(tiny_model_dir), out, SETTINGS,
                                           batch_size=4, show_progress=False)
    _check_real_teacher_run(run, 9)
    assert run.report["teacher"]["description"].startswith(f"local folder:{Path(tiny_model_dir).resolve()}")
    calls = _read_jsonl(out / CALLS_FILE)
    assert len(calls) == 9 and all(c["completion_tokens"] <= 8 for c in calls)
    again = generate_rationales_for_pipeline(str(data_file), f"local:{tiny_model_dir}", out,
                                             SETTINGS, show_progress=False)
    assert again.report["calls"]["made"] == 0 and again.records == run.records
