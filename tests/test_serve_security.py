"""`tunepipe serve` and the HTTP server under it treat every request as hostile: requests from
web pages are refused, JSON bodies are bounded, slow or many connections do not stop it, and
every refusal is in Google's JSON error shape. All over real HTTP on loopback."""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from components.common.http_server import HttpError, HttpServer, Limits, send_json
from service.server import ServeConfig, Service

PARENT = "/v1/projects/my-project/locations/us-central1"
JOBS = f"{PARENT}/pipelineJobs"
ALLOWED_ORIGIN = "http://127.0.0.1:3000"


@pytest.fixture(scope="module")
def service():
    with Service(ServeConfig(port=0, allow_origins=[ALLOWED_ORIGIN])) as running:
        yield running


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)`` of one request on a fresh connection; ``headers`` may
    replace Host."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        given = {"Content-Type": "application/json", **(headers or {})}
        connection.putrequest(method, path, skip_host="Host" in given,
                              skip_accept_encoding=True)
        for name, value in given.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def google_error(body: bytes) -> dict:
    """The ``error`` of Google's error shape (asserting the shape)."""
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "status"}, error
    return error


@pytest.mark.parametrize("headers, code, message", [
    ({"Origin": "https://evil.example"}, 403, "requests from web pages of 'https://evil.example'"),
    ({"Origin": "null"}, 403, "requests from web pages of 'null'"),
    ({"Host": "evil.example:80"}, 403, "Host 'evil.example:80' is not this server's address"),
    ({"Sec-Fetch-Site": "cross-site"}, 403, "Sec-Fetch-Site: cross-site"),
    ({"Sec-Fetch-Site": "same-site"}, 403, "Sec-Fetch-Site: same-site"),
    ({"Content-Type": "text/plain"}, 415, "Content-Type: application/json"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
])
def test_requests_a_web_page_can_make_are_refused(service, headers, code, message):
    status, _, body = request(service.url, "POST", JOBS, b'{"templateUri": "tune-large-model"}',
                              headers)
    error = google_error(body)
    assert status == error["code"] == code and message in error["message"], error
    assert error["status"] == ("PERMISSION_DENIED" if code == 403 else "INVALID_ARGUMENT")


def test_the_server_s_own_origin_and_allowed_origins_are_answered(service):
    port = service.url.rsplit(":", 1)[1]
    for headers in ({"Origin": service.url, "Sec-Fetch-Site": "same-origin"},
                    {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
                    {"Sec-Fetch-Site": "none"}, {}):
        status, reply_headers, body = request(service.url, "GET", JOBS, headers=headers)
        assert (status, json.loads(body)) == (200, {"pipelineJobs": []}), headers
        assert "access-control-allow-origin" not in reply_headers
    status, reply_headers, _ = request(service.url, "GET", JOBS, headers={
        "Origin": ALLOWED_ORIGIN, "Sec-Fetch-Site": "same-site"})
    assert status == 200 and reply_headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    status, reply_headers, _ = request(service.url, "OPTIONS", JOBS, headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert status == 200 and "Authorization" in reply_headers["access-control-allow-headers"]


def test_head_and_options_answer_in_google_s_shape(service):
    status, headers, body = request(service.url, "HEAD", JOBS)
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, headers, body = request(service.url, "HEAD", "/nope")
    assert status == 404 and body == b"" and headers["content-type"].startswith(
        "application/json")
    status, _, body = request(service.url, "OPTIONS", JOBS)
    assert status == 405 and "--allow-origin" in google_error(body)["message"]


@pytest.mark.parametrize("body, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64 levels"),
    (b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}", "nests deeper than 64 levels"),
    (b'{"displayName": ' + b"7" * 5000 + b"}", "an integer of 5000 digits"),
    (b'{"displayName": 1e309}', "out of range"),
    (b'{"displayName": NaN}', "NaN is not a JSON number"),
    (b'{"displayName": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"templateUri": "tune-large-model\\u0000.yaml"}', "NUL character"),
    (b'{"displayName": "\\ud800"}', "unpaired surrogate"),
    (b'{"\\udfff": 1}', "unpaired surrogate"),
    (b'{"displayName": "\xff"}', "not UTF-8"),
])
def test_json_bodies_are_bounded_before_any_handler_runs(service, body, message):
    for path in (JOBS, f"{PARENT}/endpoints/nope:predict",
                 f"{PARENT}/endpoints/nope:generateContent", "/v1/chat/completions"):
        status, _, reply = request(service.url, "POST", path, body)
        error = google_error(reply)
        assert status == 400 and message in error["message"], (path, error)


def test_a_paired_surrogate_is_text(service):
    status, _, reply = request(service.url, "POST", f"{PARENT}/endpoints/nope:predict",
                               b'{"instances": [{"prompt": "\\ud83d\\ude00"}]}')
    assert status == 404, reply  # parsed: the emoji reached the handler, which found no endpoint


@pytest.mark.parametrize("path, headers, code, message", [
    (f"{JOBS}/abc%00def", {}, 400, "has control characters"),
    (f"{JOBS}?pageToken=%00", {}, 400, "has control characters"),
    ("/v1/" + "x" * 9_000, {}, 414, "at most 8192"),
    (JOBS, {"X-Big": "x" * 17_000}, 431, "at most 16384"),
])
def test_bad_requests_are_refused_in_google_s_shape(service, path, headers, code, message):
    status, _, body = request(service.url, "GET", path, headers=headers)
    assert status == code and message in google_error(body)["message"]


def test_a_malformed_request_is_answered_in_google_s_shape(service):
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        reply = read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert "malformed" in google_error(body)["message"]


def test_two_hundred_concurrent_requests_are_all_answered(service):
    def get(_) -> int:
        return request(service.url, "GET", JOBS)[0]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=200) as pool:
        statuses = list(pool.map(get, range(200)))
    assert set(statuses) <= {200, 503} and statuses.count(200) > 0, statuses
    assert len(statuses) == 200
    print(f"200 concurrent GETs answered in {time.monotonic() - started:.2f} s: "
          f"{statuses.count(200)} 200s, {statuses.count(503)} 503s")


def test_a_thousand_slow_connections_do_not_stop_a_normal_request(service):
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    slow = []
    try:
        for _ in range(1000):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET " + JOBS.encode() + b" HTTP/1.1\r\nHost: x")  # never finished
            slow.append(sock)
        started = time.monotonic()
        status, _, body = request(service.url, "GET", JOBS)
        assert status == 200 and json.loads(body) == {"pipelineJobs": []}
        assert time.monotonic() - started < 30
    finally:
        for sock in slow:
            sock.close()


def test_a_client_that_goes_away_leaves_no_traceback(service, capfd):
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET {JOBS} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST {JOBS} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                         "application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
    assert request(service.url, "GET", JOBS)[0] == 200
    time.sleep(0.5)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out


def error_body(error: HttpError) -> dict:
    return {"error": {"code": error.code, "message": error.message}}


@pytest.fixture
def small_server():
    """An HttpServer with tight limits, whose app answers after ``release`` is set."""
    release = threading.Event()

    async def app(scope, receive, send):
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send_json(send, 200, {"ok": True})

    limits = Limits(header_seconds=0.5, body_seconds=0.5, max_connections=8, max_in_flight=2)
    server = HttpServer(app, "127.0.0.1", 0, limits, error_body, log=lambda line: None)
    server.start()
    server.release = release
    yield server
    release.set()
    server.stop()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_headers_and_bodies_have_deadlines_however_slowly_they_trickle(small_server):
    address = ("127.0.0.1", small_server.port)
    with socket.create_connection(address, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")
        for _ in range(20):  # a byte every 0.1 s: the deadline counts from the start
            time.sleep(0.1)
            try:
                sock.sendall(b"X")
            except OSError:
                break
        reply = read_all(sock)
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply
        assert time.monotonic() - started < 2.5
    with socket.create_connection(address, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert read_all(sock) == b"" and time.monotonic() - started < 2.5  # closed


def test_connections_and_requests_in_flight_are_capped_with_503(small_server):
    address = ("127.0.0.1", small_server.port)
    busy = [socket.create_connection(address, timeout=10) for _ in range(2)]
    for sock in busy:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower()
    assert b"answering 2 requests" in reply
    idle = [socket.create_connection(address, timeout=10) for _ in range(6)]
    with socket.create_connection(address, timeout=10) as sock:
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 503") and b"holds 8 connections" in reply
    small_server.release.set()
    for sock in busy:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()
    for sock in idle:
        sock.close()
