"""Outbound teacher calls are the operator's choice: ``tunepipe serve`` refuses teacher URLs,
Vertex endpoints and local teacher paths its operator did not allow (over real HTTP on
loopback), credentials follow no redirect, and a remote reply reaches a message only as a short,
printable reason."""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from components.generate_rationales import vertex_teacher
from components.generate_rationales.examples import parse_examples
from components.generate_rationales.http_calls import (REASON_CHARS, RetryPolicy,
                                                       TeacherCallError, printable,
                                                       request_json)
from components.generate_rationales.openai_teacher import OpenAITeacher
from components.generate_rationales.outbound import (API_ENDPOINT_VARIABLE, TeacherAllowList,
                                                     TeacherUrl, google_vertex_endpoint)
from components.generate_rationales.prompting import ANSWER, build_request
from components.generate_rationales.teacher_reference import (TeacherReferenceError,
                                                              parse_teacher_reference)
from components.generate_rationales.teachers import TeacherSettings
from components.generate_rationales.vertex_teacher import VertexTeacher
from service.local_paths import AllowedRoots
from service.pipeline_jobs import teacher_problems
from service.records import RecordStore
from service.server import ServeConfig, Service

SEED = Path(__file__).parent / "seeds" / "002_e4cc4b91ade755bc_request.json"
JOBS = "/v1/projects/my-project/locations/us-central1/pipelineJobs"
KEY = "sk-outbound-secret"
FAST = RetryPolicy(max_retries=1, timeout_seconds=5, initial_backoff_seconds=0.01)
EXAMPLES = parse_examples('{"input_text": "Review: fine"}\n', "data.jsonl")
REQUEST = build_request(EXAMPLES, EXAMPLES[0], ANSWER, 0, seed=7)
SETTINGS = TeacherSettings(max_output_tokens=8)


def create(url: str, **parameters) -> tuple[int, str]:
    """``(status, error message)`` of creating the seed's distillation job with ``parameters``."""
    body = json.loads(SEED.read_text())
    body["runtimeConfig"]["parameterValues"].update(parameters)
    request = urllib.request.Request(url + JOBS, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, ""
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]["message"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server with the default rule: no teacher may call out."""
    roots = [str(tmp_path_factory.getbasetemp())]
    with Service(ServeConfig(port=0, allow_roots=roots)) as running:
        yield running


@pytest.mark.parametrize("teacher, message", [
    ("openai:http://attacker.example:9000/v1/#gpt", "teacher_model_reference 'openai:http://"
     "attacker.example:9000/v1/#gpt' calls http://attacker.example:9000/v1, which this server "
     "may not call (allowed: none); the operator allows it by restarting tunepipe serve with "
     "--allow-teacher-url http://attacker.example:9000/v1"),
    ("projects/my-project/locations/us-central1/endpoints/1", "calls https://us-central1-"
     "aiplatform.googleapis.com/v1/projects/my-project/locations/us-central1/endpoints/1, which "
     "this server may not call"),
    ("projects/my-project/locations/evil.com#/endpoints/1",
     "location 'evil.com#' is not a Vertex AI location ID"),
    ("openai:http://allowed.example@evil.example/v1#m", "is not a plain http(s)://HOST"),
    ("local:/opt/outside/teacher.gguf", "teacher_model_reference '/opt/outside/teacher.gguf' is "
     "outside the folders this server may read and write"),
])
def test_serve_refuses_teachers_the_operator_did_not_allow(service, monkeypatch, teacher,
                                                           message):
    monkeypatch.delenv(API_ENDPOINT_VARIABLE, raising=False)
    status, error = create(service.url, teacher_model_reference=teacher)
    assert status == 400 and message in error, error
    assert not RecordStore("pipelineJobs").list()


def test_serve_checks_the_location_a_short_vertex_reference_takes(service):
    status, error = create(service.url, teacher_model_reference="publishers/google/models/m",
                           location="x.evil.example")
    assert status == 400 and "location 'x.evil.example' is not a Vertex AI location ID" in error


def test_an_allowed_teacher_passes_the_teacher_check(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))  # a home of its own: one server a home
    roots = [str(tmp_path_factory.getbasetemp())]
    config = ServeConfig(port=0, allow_roots=roots,
                         allow_teacher_urls=["http://127.0.0.1:8000/v1"])
    with Service(config) as allowing:
        status, error = create(allowing.url, dataset_uri=f"{roots[0]}/missing.jsonl",
                               teacher_model_reference="openai:http://127.0.0.1:8000/v1#m")
    assert status == 400 and "missing.jsonl" in error and "teacher" not in error, error


def _problems(reference: str, *allowed: str, **values) -> list[str]:
    roots = AllowedRoots((Path("/srv/models"),))
    return teacher_problems(roots, TeacherAllowList.parse(allowed),
                            {"teacher_model_reference": reference, **values})


@pytest.mark.parametrize("reference, allowed, fine", [
    ("openai:http://127.0.0.1:8000/v1#m", ["http://127.0.0.1:8000/v1"], True),
    ("openai:HTTP://127.0.0.1:8000/v1/chat/completions#m", ["http://127.0.0.1:8000/v1/"], True),
    ("openai:https://API.openai.com:443/v1#gpt-4o", ["https://api.openai.com"], True),
    ("openai:http://127.0.0.1:8000/v10#m", ["http://127.0.0.1:8000/v1"], False),
    ("openai:http://127.0.0.1:8001/v1#m", ["http://127.0.0.1:8000"], False),
    ("openai:https://127.0.0.1:8000/v1#m", ["http://127.0.0.1:8000"], False),
    ("openai:http://api.openai.com.evil.example/v1#m", ["http://api.openai.com"], False),
    ("openai:http://[0:0::1]:8000/v1#m", ["http://[::1]:8000"], True),
    ("projects/my-project/locations/us-central1/endpoints/1",
     ["https://us-central1-aiplatform.googleapis.com"], True),
    ("projects/my-project/locations/europe-west4/endpoints/1",
     ["https://us-central1-aiplatform.googleapis.com"], False),
    ("projects/other-project/locations/us-central1/endpoints/1",
     ["https://us-central1-aiplatform.googleapis.com/v1/projects/my-project"], False),
    ("text-unicorn@001", [], True),
    ("tuned:my-teacher", [], True),
    ("/srv/models/teacher", [], True),
    ("/srv/models-other/teacher", [], False),
])
def test_the_teacher_rule(reference, allowed, fine):
    assert (_problems(reference, *allowed) == []) is fine


def test_a_vertex_stand_in_is_checked_where_it_is(monkeypatch):
    monkeypatch.setenv(API_ENDPOINT_VARIABLE, "http://127.0.0.1:9999")
    reference = "projects/my-project/locations/us-central1/endpoints/1"
    assert _problems(reference, "http://127.0.0.1:9999") == []
    assert _problems(reference, "https://us-central1-aiplatform.googleapis.com")


@pytest.mark.parametrize("url", [
    "http://allowed.example@evil.example/v1", "http://user:pw@allowed.example/v1",
    "http://evil.example\\@allowed.example/v1", "http://allowed.example /v1",
    "http://allowed.example/v1\n", "http://allowed.example/v1\x00", "http://allowed.example/v1?x",
    "http://allowed.example/v1/../admin", "http://allowed.example//v1",
    "http://allowed.example/%2e%2e/admin", "ftp://allowed.example", "http://allowed.example:0",
    "http://allowed.example:99999", "http://[::g]/v1", "http://allöwed.example/v1", "http://",
])
def test_teacher_urls_that_could_mean_another_host_are_refused(url):
    with pytest.raises(ValueError, match="is not a plain|port must be|IPv6"):
        TeacherUrl.parse(url)
    with pytest.raises(ValueError, match="--allow-teacher-url"):
        TeacherAllowList.parse([url])


@pytest.mark.parametrize("reference, message", [
    ("projects/my-project/locations/evil.example#/endpoints/1", "location 'evil.example#'"),
    ("projects/my-project/locations/US-CENTRAL1/endpoints/1", "location 'US-CENTRAL1'"),
    ("projects/evil.example/locations/us-central1/endpoints/1", "project 'evil.example'"),
    ("projects/short/locations/us-central1/endpoints/1", "project 'short'"),
    ("projects/my-project/locations/us-central1/publishers/../models/m", "not a Vertex resource"),
    ("openai:http://h.example@evil.example/v1#m", "openai: needs an http\\(s\\) base URL"),
])
def test_references_are_checked_on_the_command_line_too(reference, message):
    with pytest.raises(TeacherReferenceError, match=message):
        parse_teacher_reference(reference)


@pytest.mark.parametrize("project", ["my-project", "123456789012"])
def test_project_ids_and_numbers_and_global_are_accepted(project):
    reference = f"projects/{project}/locations/global/publishers/google/models/gemini-1.5-pro"
    assert parse_teacher_reference(reference).target == reference
    assert google_vertex_endpoint("global") == "https://aiplatform.googleapis.com"
    with pytest.raises(ValueError, match="not a Vertex AI location ID"):
        google_vertex_endpoint("evil.example#")


def test_the_oauth_token_goes_to_google_s_vertex_host_only(monkeypatch):
    made = []
    monkeypatch.setattr(vertex_teacher, "_AccessToken", lambda: made.append(1))
    resource = "projects/my-project/locations/europe-west4/endpoints/1"
    monkeypatch.setenv(API_ENDPOINT_VARIABLE, "https://vertex-proxy.example")
    VertexTeacher(resource)
    assert made == []
    monkeypatch.delenv(API_ENDPOINT_VARIABLE)
    google = VertexTeacher(resource)
    assert made == [1]
    assert google.url == f"https://europe-west4-aiplatform.googleapis.com/v1/{resource}:predict"


class Recorder:
    """A loopback HTTP server recording each request (method, path, Authorization) and answering
    ``answer(method, path) -> (status, headers, body)``."""

    def __init__(self, answer):
        self.requests: list[tuple[str, str, str | None]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                recorder.requests.append((self.command, self.path,
                                          self.headers.get("Authorization")))
                status, headers, body = answer(self.command, self.path)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = handle_any  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorders():
    started = []
    yield lambda answer: started.append(Recorder(answer)) or started[-1]
    for recorder in started:
        recorder.close()


MODELS = json.dumps({"data": [{"id": "m"}]}).encode()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("model", [None, "m"])  # None: GET /models first, else POST at once
def test_the_api_key_follows_no_redirect(recorders, monkeypatch, code, model):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    other = recorders(lambda method, path: (200, {}, MODELS))
    first = recorders(lambda method, path: (code, {"Location": other.url + path}, b""))
    with pytest.raises(TeacherCallError) as error:
        OpenAITeacher(first.url + "/v1", model, policy=FAST).call(REQUEST, SETTINGS)
    assert other.requests == []
    assert first.requests and {auth for _, _, auth in first.requests} == {f"Bearer {KEY}"}
    assert f"answered HTTP {code}, a redirect; teacher calls follow none" in str(error.value)


NOISE = "\x1b[2J\x07\r\n\u202eSECRET-ROW " * 600  # about 10 kB, with control characters


@pytest.mark.parametrize("status, body, reason", [
    (400, json.dumps({"error": {"message": "bad model\x1b[31m\n" + NOISE}}).encode(),
     "HTTP 400: 'bad model [31m [2J SECRET-ROW [2J SECRET-ROW"),
    (400, json.dumps({"error": "quota\texceeded"}).encode(), "HTTP 400: 'quota exceeded' (not"),
    (403, NOISE.encode(), "HTTP 403 (not retried)"),
    (500, NOISE.encode(), "last: HTTP 500"),
    (200, NOISE.encode(), "last: HTTP 200 with a body that is not JSON"),
    (200, b"[" + json.dumps(NOISE).encode() + b"]", "answered a JSON list, not an object"),
])
def test_a_remote_body_reaches_a_message_only_as_a_short_printable_reason(
        recorders, status, body, reason, caplog):
    server = recorders(lambda method, path: (status, {"Content-Type": "text/plain"}, body))
    with pytest.raises(TeacherCallError) as error:
        request_json(server.url + "/v1/chat/completions", {}, {}, FAST, "example 0 (answer)")
    message = str(error.value)
    assert reason in message, message
    assert len(message) < len(server.url) + 100 + REASON_CHARS
    assert message.isprintable() and "\u202e" not in message
    assert printable(body.decode())[:60] in caplog.text  # this machine's log shows more
    assert "\x1b" not in caplog.text


def test_a_banner_in_a_broken_reply_stays_out_of_the_message():
    listener = socket.create_server(("127.0.0.1", 0))

    def banner():
        for _ in range(2):
            connection, _ = listener.accept()
            connection.recv(65536)
            connection.sendall(b"SSH-2.0-OpenSSH_9.6 secret-banner\r\n")
            connection.close()

    threading.Thread(target=banner, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat/completions"
    try:
        with pytest.raises(TeacherCallError) as error:
            request_json(url, {}, {}, FAST, "example 0 (answer)")
    finally:
        listener.close()
    assert "connection failed: BadStatusLine" in str(error.value)
    assert "secret-banner" not in str(error.value)
