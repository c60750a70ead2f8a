"""JSON over HTTP for the teacher backends: per-call timeout, retries with backoff, clear errors.

A call is retried when it may succeed later: HTTP 408, 429 and 5xx, a timeout, a refused or
dropped connection, or a 200 reply whose body is not JSON. The wait before retry ``n`` (1, 2, ...)
is ``initial_backoff_seconds * 2**(n-1)``, at most ``max_backoff_seconds``, times a random factor
in [0.5, 1] (so that concurrent callers spread out); a ``Retry-After`` header (seconds or an HTTP
date) replaces it, also at most ``max_backoff_seconds``. Other 4xx replies (a bad request, a
wrong model name, a missing key) fail at once. A call that fails for good raises
:class:`TeacherCallError` naming what was asked, the URL, the attempts and the last status.

A reply body is the remote server's, and the message may reach a client of ``tunepipe serve``
(a job's ``error``), so a message holds at most :func:`reason`: the JSON ``error.message``,
without control characters, cut to ``REASON_CHARS``. The start of a failed reply's body goes to
this process's log (a warning) instead. Redirects are refused, not followed: urllib would copy
the request's headers (the API key, the OAuth token) to wherever the reply points. Request
headers never appear in messages or logs.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import logging
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

REASON_CHARS = 120
LOGGED_CHARS = 500
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]+")
log = logging.getLogger(__name__)


class TeacherCallError(RuntimeError):
    """A teacher call that failed for good (after its retries, or one not worth retrying)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long one call may take and how often it is retried."""

    max_retries: int = 5
    timeout_seconds: float = 120.0
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.timeout_seconds <= 0 or self.initial_backoff_seconds < 0:
            raise ValueError(f"invalid retry policy {self}: max_retries >= 0, timeout_seconds > 0 "
                             "and initial_backoff_seconds >= 0 are needed")

    def backoff(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...)."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff_seconds)
        delay = min(self.initial_backoff_seconds * 2 ** (retry - 1), self.max_backoff_seconds)
        return delay * random.uniform(0.5, 1.0)


def printable(text: str, limit: int = REASON_CHARS) -> str:
    """``text`` on one line without control (or bidi) characters, at most ``limit`` long."""
    text = " ".join(_UNPRINTABLE.sub(" ", text).split())
    return text[:limit] + ("…" if len(text) > limit else "")


def reason(reply: bytes | str | dict) -> str:
    """What a message may say of a reply: ``: 'its JSON error.message'`` (printable, at most
    ``REASON_CHARS``), or "" when it has none."""
    if not isinstance(reply, dict):
        try:
            reply = json.loads(reply)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""
    error = reply.get("error") if isinstance(reply, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    text = printable(message) if isinstance(message, str) else ""
    return f": {text!r}" if text else ""


def log_reply(what: str, url: str, body: bytes | str) -> None:
    """The start of a failed call's reply body, for this machine's log only."""
    if body:
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
        log.warning("%s: %s replied: %s", what, url, printable(text, LOGGED_CHARS))


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or HTTP date); None when absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Leaves a redirect as the HTTP error it is, so that no header goes to another URL."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def request_json(url: str, payload: dict | None, headers: dict[str, str], policy: RetryPolicy,
                 what: str) -> tuple[dict, int]:
    """``(reply, attempts)``: POSTs ``payload`` as JSON (GET when None) and reads a JSON object.

    ``what`` says which call this is in error messages (e.g. ``example 12 (answer)``).
    """
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request_headers = {"Accept": "application/json", **headers}
    if data is not None:
        request_headers["Content-Type"] = "application/json"
    attempt = 0
    while True:
        attempt += 1
        retry_after, body = None, b""
        request = urllib.request.Request(url, data=data, headers=request_headers,
                                         method="GET" if data is None else "POST")
        try:
            with _OPENER.open(request, timeout=policy.timeout_seconds) as response:
                body = response.read()
            try:
                reply = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem = f"HTTP {response.status} with a body that is not JSON"
            else:
                if isinstance(reply, dict):
                    return reply, attempt
                log_reply(what, url, body)
                raise TeacherCallError(f"{what}: {url} answered a JSON {type(reply).__name__}, "
                                       "not an object")
        except urllib.error.HTTPError as error:
            if 300 <= error.code < 400:
                log.warning("%s: %s redirects to %s", what, url,
                            printable(error.headers.get("Location") or "", LOGGED_CHARS))
                raise TeacherCallError(f"{what}: {url} answered HTTP {error.code}, a redirect; "
                                       "teacher calls follow none (they carry credentials): give "
                                       "the final URL in the teacher reference") from None
            body = error.read()
            problem = f"HTTP {error.code}{reason(body)}"
            if not _retryable(error.code):
                log_reply(what, url, body)
                raise TeacherCallError(f"{what}: {url} answered {problem} (not retried)") from None
            retry_after = retry_after_seconds(error.headers.get("Retry-After"))
        except (TimeoutError, socket.timeout):
            problem = f"no answer within {policy.timeout_seconds:g} s"
        except urllib.error.URLError as error:
            problem = (f"no answer within {policy.timeout_seconds:g} s"
                       if isinstance(error.reason, (TimeoutError, socket.timeout))
                       else f"connection failed: {error.reason}")
        except ConnectionError as error:
            problem = f"connection failed: {type(error).__name__}: {error}"
        except http.client.HTTPException as error:  # its text may hold the reply's bytes
            problem = f"connection failed: {type(error).__name__}"
        if attempt > policy.max_retries:
            log_reply(what, url, body)
            raise TeacherCallError(f"{what}: {url} failed {attempt} times, giving up; last: "
                                   f"{problem}")
        time.sleep(policy.backoff(attempt, retry_after))
