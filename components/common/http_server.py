"""The HTTP server under tunepipe's long-lived servers (``tunepipe serve`` and a model endpoint):
uvicorn (asyncio, HTTP/1.1 by h11) running an ASGI app, with the limits that make a server safe to
leave running on a laptop.

What every request meets, before the app sees it:

- **Connections.** The listen backlog is :attr:`Limits.backlog`; beyond
  :attr:`Limits.max_connections` open connections a new one is answered 503 and closed. A request's
  line and headers must arrive within :attr:`Limits.header_seconds` of the connection (or of the
  previous answer on a kept-alive one) and its body within :attr:`Limits.body_seconds` of the
  headers, however slowly the bytes trickle in; else the connection is closed. Idle connections
  close after :attr:`Limits.keep_alive_seconds`. A client that goes away leaves no traceback.
- **Load.** At most :attr:`Limits.max_in_flight` requests are answered at once; beyond, 503 with
  ``Retry-After``.
- **Browsers** (:class:`RequestGuard`). A page the user visits can send requests to a loopback
  port, and through DNS rebinding with a Host of its own. Refused with 403: a ``Host`` that is not
  the server's own loopback address (servers bound to loopback), an ``Origin`` other than the
  server's own or one the operator allows, a ``Sec-Fetch-Site`` of ``cross-site`` or
  ``same-site``; with 415, a request body that is not ``Content-Type: application/json``.
- **Bodies** (:func:`read_json_body`). Chunked bodies are refused (411), bodies over
  :attr:`Limits.max_body_bytes` are refused unread (413); JSON is parsed with its nesting depth,
  integer length and string contents bounded (:func:`parse_json`).

Errors are :class:`HttpError`; each server words them in its own JSON shape (``error_body``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import h11
from uvicorn import Config, Server as UvicornServer
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_JSON_DEPTH = 64
MAX_INTEGER_DIGITS = 20  # int64 and uint64 have at most 20 digits
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
ALLOWED_FETCH_SITES = ("same-origin", "none")  # the server's own pages; a typed URL
JSON_MEDIA_TYPE = "application/json"
RETRY_AFTER_SECONDS = 1
_FORBIDDEN_CHARACTERS = re.compile("[\x00\ud800-\udfff]")  # NUL, lone surrogates


@dataclass(frozen=True)
class Limits:
    """How much a server takes: bodies, time, connections and requests at once."""

    max_body_bytes: int = 16 * 2**20
    max_body_setting: str = ""  # where an operator sets max_body_bytes, for the 413 message
    header_seconds: float = 10.0
    body_seconds: float = 60.0
    keep_alive_seconds: float = 5.0
    max_connections: int = 4096
    max_in_flight: int = 64
    backlog: int = 2048
    max_header_bytes: int = 16 * 2**10  # the headers, and what h11 buffers of an unfinished
    # request line and headers
    max_url_bytes: int = 8 * 2**10


class HttpError(Exception):
    """A refused request: its status, message and extra response headers."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.headers = headers or {}


ErrorBody = Callable[[HttpError], dict]


def _has_forbidden_text(value: str) -> bool:
    return _FORBIDDEN_CHARACTERS.search(value) is not None


def _refuse_constant(name: str) -> None:
    raise HttpError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise HttpError(400, f"the request body has an integer of {len(text)} digits; at most "
                             f"{MAX_INTEGER_DIGITS} are accepted")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise HttpError(400, f"the request body has the number {text[:40]}, which is out of "
                             "range (larger than a double)")
    return value


def check_json_value(value: Any) -> None:
    """HttpError 400 when ``value`` nests deeper than :data:`MAX_JSON_DEPTH` or holds a string
    (key or value) with a NUL character or a lone surrogate."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _has_forbidden_text(item):
                raise HttpError(400, "the request body has a string with a NUL character or an "
                                     "unpaired surrogate (\\ud800-\\udfff); send valid Unicode "
                                     "text")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise HttpError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        else:
            stack.extend((child, depth + 1) for child in item)


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body: UTF-8, no NaN or Infinity, numbers that fit a double
    or an int64 and the rest of :func:`check_json_value`; HttpError 400 otherwise."""
    try:
        value = json.loads(raw, parse_int=_bounded_int, parse_float=_finite_float,
                           parse_constant=_refuse_constant)
    except UnicodeDecodeError as error:
        raise HttpError(400, f"the request body is not UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise HttpError(400, f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise HttpError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} "
                             "levels") from None
    check_json_value(value)
    return value


def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json_body(receive: Callable[[], Awaitable[dict]], headers: dict[str, str],
                         limits: Limits) -> Any:
    """The request's JSON body (None when it has none): 411 for a chunked body, 413 over
    :attr:`Limits.max_body_bytes` (unread), 415 unless ``Content-Type: application/json``, 400
    for bad JSON."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HttpError(411, "send the body with a Content-Length header (chunked transfer "
                             "encoding is not read)")
    length_header = headers.get("content-length", "0").strip() or "0"
    if not length_header.isascii() or not length_header.isdigit():
        raise HttpError(400, "Content-Length is not a number")
    length = int(length_header)
    if length > limits.max_body_bytes:
        setting = f" ({limits.max_body_setting})" if limits.max_body_setting else ""
        raise HttpError(413, f"the request body has {length} bytes; the limit is "
                             f"{limits.max_body_bytes}{setting}")
    if length == 0:
        return None
    if _media_type(headers) != JSON_MEDIA_TYPE:
        raise HttpError(415, f"send the body as JSON with the header 'Content-Type: "
                             f"{JSON_MEDIA_TYPE}' (got {headers.get('content-type') or 'none'!r})")
    chunks, received = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > length:
            raise HttpError(400, "the request body is longer than its Content-Length")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return parse_json(b"".join(chunks))


class ClientGone(Exception):
    """The client closed its connection before its answer."""


@dataclass(frozen=True)
class RequestGuard:
    """Which Hosts and Origins a server answers: requests a web page could make are refused.

    ``check_host`` (servers bound to loopback) holds ``Host`` to a loopback name with the
    server's port; ``allowed_origins`` are the operator's, e.g. ``http://127.0.0.1:3000``, beside
    the server's own origin."""

    check_host: bool
    allowed_origins: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, check_host: bool, allowed_origins: list[str] | tuple[str, ...] = ()
           ) -> RequestGuard:
        """The guard for origins as an operator writes them (case and a final / ignored)."""
        return cls(check_host, frozenset(origin.rstrip("/").lower()
                                         for origin in allowed_origins))

    def origin_allowed(self, origin: str) -> bool:
        """Whether cross-origin requests from ``origin`` are allowed by the operator."""
        return origin.rstrip("/").lower() in self.allowed_origins

    def check(self, headers: dict[str, str], port: int) -> None:
        """HttpError 403 for a request a web page made (see the module's doc); ``port`` is the
        one the request came to."""
        host = headers.get("host", "")
        if self.check_host and host.lower() not in {f"{name}:{port}" for name in LOOPBACK_NAMES}:
            raise HttpError(403, f"Host {host!r} is not this server's address (a web page "
                                 f"reached it through DNS rebinding?); use "
                                 f"http://127.0.0.1:{port}")
        origin = headers.get("origin")
        own_origin = f"http://{host}".lower()
        if origin is not None and origin.lower() != own_origin and \
                not self.origin_allowed(origin):
            raise HttpError(403, f"requests from web pages of {origin!r} are refused; start the "
                                 "server with --allow-origin ORIGIN to allow a page you trust")
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ALLOWED_FETCH_SITES and \
                not (origin is not None and self.origin_allowed(origin)):
            raise HttpError(403, f"requests from other sites' web pages (Sec-Fetch-Site: "
                                 f"{site}) are refused")

    def cors_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """The CORS headers for a request from an allowed origin (else none)."""
        origin = headers.get("origin")
        if origin is None or not self.origin_allowed(origin):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Allow-Methods": "GET, POST, DELETE, PATCH"}


def request_headers(scope: dict) -> dict[str, str]:
    """An ASGI request's headers, names lowercased (the last of repeated ones)."""
    return {name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]}


async def send_json(send: Callable[[dict], Awaitable[None]], status: int, payload: dict,
                    headers: dict[str, str] | None = None) -> None:
    """Answers ``payload`` as JSON with ``status`` and ``headers``."""
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            *((name.encode("latin-1"), value.encode("latin-1"))
                              for name, value in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})


async def start_stream(send: Callable[[dict], Awaitable[None]], content_type: str,
                       headers: dict[str, str] | None = None) -> None:
    """Starts a 200 answer whose body follows in pieces (``more_body`` messages)."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type.encode("latin-1")),
                            (b"cache-control", b"no-cache"),
                            *((name.encode("latin-1"), value.encode("latin-1"))
                              for name, value in (headers or {}).items())]})


async def until_disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client closes its connection (call it once the request's body is
    read; run it as a task beside a streamed answer)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _raw_response(status: int, reason: bytes, payload: dict) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers before any request."""
    body = json.dumps(payload).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, reason, len(body))
            + body)


def _protocol(limits: Limits, error_body: ErrorBody) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and deadlines for headers and bodies."""

    class BoundedProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: object = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(_raw_response(503, b"Service Unavailable", error_body(HttpError(
                    503, f"the server holds {limits.max_connections} connections; try again "
                         "later"))))
                transport.close()
                return
            self._follow_phase()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow_phase()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow_phase()

        def connection_lost(self, exc: Exception | None) -> None:
            self._set_deadline(None, None)
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_response(400, b"Bad Request", error_body(HttpError(
                400, "the request line or headers are malformed or longer than "
                     f"{limits.max_header_bytes} bytes"))))
            self.transport.close()

        def _follow_phase(self) -> None:
            """A deadline from the start of each phase: waiting for a request's headers, then
            for its body; none while the app answers."""
            state = self.conn.their_state
            if state is h11.IDLE and self.conn.our_state is h11.IDLE:
                self._set_deadline("headers", limits.header_seconds)
            elif state is h11.SEND_BODY:
                self._set_deadline("body", limits.body_seconds)
            else:
                self._set_deadline(None, None)

        def _set_deadline(self, phase: str | None, seconds: float | None) -> None:
            if phase == self._phase:
                return
            if self._deadline is not None:
                self._deadline.cancel()
            self._phase, self._deadline = phase, None
            if phase is not None and not self.transport.is_closing():
                self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _too_slow(self) -> None:
            if self._phase == "headers" and self.conn.their_state is h11.IDLE \
                    and self.conn.our_state is h11.IDLE and self.cycle is None:
                self.transport.write(_raw_response(408, b"Request Timeout", error_body(
                    HttpError(408, f"the request's headers did not arrive within "
                                   f"{limits.header_seconds:g} s"))))
            self.transport.close()

    return BoundedProtocol


App = Callable[[dict, Callable, Callable], Awaitable[None]]


def bounded_app(app: App, limits: Limits, error_body: ErrorBody,
                log: Callable[[str], None]) -> App:
    """``app`` answering at most :attr:`Limits.max_in_flight` requests at once (503 beyond),
    with an access log line per request and a JSON 500 for an unexpected error."""
    in_flight = 0

    async def bounded(scope: dict, receive: Callable, send: Callable) -> None:
        nonlocal in_flight
        if scope["type"] != "http":
            return
        status = 0

        async def send_logged(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        client = (scope.get("client") or ("-",))[0]
        too_large = _too_large(scope, limits)
        if too_large:
            await send_json(send_logged, too_large.code, error_body(too_large))
        elif in_flight >= limits.max_in_flight:
            error = HttpError(503, f"the server is answering {limits.max_in_flight} requests; "
                                   "try again shortly",
                              {"Retry-After": str(RETRY_AFTER_SECONDS)})
            await send_json(send_logged, 503, error_body(error), error.headers)
        else:
            in_flight += 1
            try:
                await app(scope, receive, send_logged)
            except ClientGone:
                pass
            except Exception as error:  # noqa: BLE001 (a bug must still answer in JSON)
                logging.getLogger(__name__).exception("internal error")
                if not status:
                    await send_json(send_logged, 500, error_body(HttpError(
                        500, f"{type(error).__name__}: {error}")))
            finally:
                in_flight -= 1
        path = scope.get("raw_path", b"").decode("latin-1")[:200]
        log(f'{client} "{scope["method"]} {path}" {status or "-"}')

    return bounded


def _too_large(scope: dict, limits: Limits) -> HttpError | None:
    """HttpError 414 or 431 for a URL or headers over the limits, else None."""
    url_bytes = len(scope["raw_path"]) + len(scope["query_string"])
    if url_bytes > limits.max_url_bytes:
        return HttpError(414, f"the URL has {url_bytes} bytes; at most {limits.max_url_bytes}")
    header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
    if header_bytes > limits.max_header_bytes:
        return HttpError(431, f"the headers have {header_bytes} bytes; at most "
                              f"{limits.max_header_bytes}")
    return None


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free one) and listening; OSError when the
    address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HttpServer:
    """An ASGI app served by uvicorn on a socket bound at construction, so the port is known
    (and a taken address fails) before serving starts."""

    def __init__(self, app: App, host: str, port: int, limits: Limits, error_body: ErrorBody,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr,
                                                                 flush=True)):
        self.socket = listening_socket(host, port, limits.backlog)
        config = Config(bounded_app(app, limits, error_body, log), http=_protocol(limits,
                                                                                  error_body),
                        ws="none", lifespan="off", log_config=None, access_log=False,
                        proxy_headers=False, server_header=False, backlog=limits.backlog,
                        timeout_keep_alive=limits.keep_alive_seconds,
                        timeout_graceful_shutdown=5,
                        h11_max_incomplete_event_size=limits.max_header_bytes)
        self._server = UvicornServer(config)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.socket.getsockname()[0]

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serves until :meth:`stop` (from another thread), or, on the main thread, until
        SIGINT or SIGTERM (which is then raised again, as the caller's handler takes it)."""
        self._server.run(sockets=[self.socket])

    def start(self) -> None:
        """Serves on a thread of its own."""
        self._thread = threading.Thread(target=self.serve_forever, name="http-server",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops serving (open requests get a few seconds to finish) and closes the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.socket.close()
