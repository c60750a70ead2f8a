"""The HTTP layer: Vertex-style REST routes, errors in Google's JSON shape, the bearer token and
the body size limit.

A route is a method and a path template such as ``{parent}/pipelineJobs/{id}:cancel``, where
``{parent}`` stands for ``/v1/projects/{project}/locations/{location}`` (``/v1beta1`` alike) and
``{id}`` for one path segment (percent-decoded). Every refusal is answered as Google APIs answer
one, ``{"error": {"code": 404, "message": "...", "status": "NOT_FOUND"}}``:

    400 INVALID_ARGUMENT  malformed JSON (with the parser's reason), a body that is not an object,
                          unknown fields or query parameters (named), bad values
    401 UNAUTHENTICATED   the server has a token and the request lacks it
    404 NOT_FOUND         no such path, or no such resource
    405 UNIMPLEMENTED     a known path with another method (the ``Allow`` header lists them)
    409 ALREADY_EXISTS    a resource ID that is taken
    411 INVALID_ARGUMENT  a body without Content-Length (chunked bodies are not read)
    413 INVALID_ARGUMENT  a body over the size limit (it is not read)
"""
from __future__ import annotations

import hmac
import json
import re
import sys
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND",
                405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS", 411: "INVALID_ARGUMENT",
                413: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "UNAVAILABLE"}
PARENT = (r"/(?P<version>v1|v1beta1)/projects/(?P<project>[^/:]+)"
          r"/locations/(?P<location>[^/:]+)")
ALWAYS_ALLOWED_QUERY = frozenset({"$alt", "alt"})  # Google's REST clients send $alt=json;...


class ApiError(Exception):
    """A refused request: its HTTP status, message and Google status name."""

    def __init__(self, code: int, message: str, status: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


@dataclass
class Call:
    """One routed request: the path's named parts, the query and the decoded JSON body."""

    params: dict[str, str]  # version, project, location, id: as the route template names them
    query: dict[str, str]
    body: dict

    @property
    def parent(self) -> str:
        """``projects/P/locations/L`` of a Vertex path."""
        return f"projects/{self.params['project']}/locations/{self.params['location']}"


Handler = Callable[[Call], dict]


@dataclass(frozen=True)
class Route:
    """A method and path pattern, the handler, and the query parameters it takes."""

    method: str
    pattern: re.Pattern
    handler: Handler
    query: frozenset[str]


def route(method: str, template: str, handler: Handler, query: tuple[str, ...] = ()) -> Route:
    """A :class:`Route` from a path template (``{parent}``, ``{id}``; the rest literal)."""
    regex = re.escape(template).replace(re.escape("{parent}"), PARENT)
    regex = regex.replace(re.escape("{id}"), r"(?P<id>[^/:]+)")
    return Route(method, re.compile(f"^{regex}$"), handler, frozenset(query))


def find_route(routes: list[Route], method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for ``method`` and ``path`` with the path's named parts; ApiError 404 or 405."""
    allowed = []
    for candidate in routes:
        match = candidate.pattern.match(path)
        if not match:
            continue
        if candidate.method == method:
            return candidate, {k: unquote(v) for k, v in match.groupdict().items()}
        allowed.append(candidate.method)
    if allowed:
        methods = sorted(set(allowed))
        raise ApiError(405, f"{path} takes {' or '.join(methods)}, not {method}",
                       headers={"Allow": ", ".join(methods)})
    raise ApiError(404, f"no such path: {path} (paths start /v1/projects/PROJECT/locations/"
                        "LOCATION/, then pipelineJobs, tuningJobs, models or endpoints; or "
                        "they are /v1/chat/completions and /v1/models)")


def parse_query(text: str, allowed: frozenset[str]) -> dict[str, str]:
    """The query parameters (the last value of each); ApiError 400 naming unknown ones."""
    query = {name: values[-1] for name, values in parse_qs(text, keep_blank_values=True).items()}
    unknown = sorted(set(query) - allowed - ALWAYS_ALLOWED_QUERY)
    if unknown:
        takes = f"; this call takes {sorted(allowed)}" if allowed else "; this call takes none"
        raise ApiError(400, f"unknown query parameters {unknown}{takes}")
    return query


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body (an empty body is ``{}``); ApiError 400 otherwise."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def check_fields(value: dict, known: set[str] | frozenset[str], where: str) -> None:
    """ApiError 400 naming the fields of ``value`` that are not in ``known``."""
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ApiError(400, f"unknown fields in {where}: {unknown}; known: {sorted(known)}")


def authorized(header: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (compared in constant
    time)."""
    scheme, _, value = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              token.encode())


def make_handler(routes: list[Route], token: str | None, max_body_bytes: int):
    """The request handler class: checks the token and the body size, routes, answers JSON."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise ApiError(411, "send the body with a Content-Length header (chunked "
                                    "transfer encoding is not read)")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise ApiError(400, "Content-Length is not a number") from None
            if length > max_body_bytes:
                raise ApiError(413, f"the request body has {length} bytes; the limit is "
                                    f"{max_body_bytes} (tunepipe serve --max-body-bytes)")
            return self.rfile.read(length) if length > 0 else b""

        def _handle(self) -> None:
            try:
                if token is not None and not authorized(self.headers.get("Authorization", ""),
                                                        token):
                    raise ApiError(401, "this server needs a bearer token: send the header "
                                        "'Authorization: Bearer TOKEN' with the token "
                                        "tunepipe serve was given",
                                   headers={"WWW-Authenticate": 'Bearer realm="tunepipe"'})
                raw = self._body()
                target = urlsplit(self.path)
                found, params = find_route(routes, self.command, target.path)
                query = parse_query(target.query, found.query)
                body = parse_body(raw) if self.command in ("POST", "PUT", "PATCH") else {}
                payload = found.handler(Call(params, query, body))
            except ApiError as error:
                if error.code in (401, 411, 413):
                    self.close_connection = True  # the body was left unread
                self._reply(error.code, error.body(), error.headers)
                return
            except Exception as error:  # noqa: BLE001 (a bug must still answer in JSON)
                traceback.print_exc(file=sys.stderr)
                self._reply(500, ApiError(500, f"{type(error).__name__}: {error}").body())
                return
            self._reply(200, payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return Handler


DEFAULT_PAGE_SIZE = 100


def paginate(items: list, query: dict[str, str], field: str) -> dict:
    """A list reply: ``{field: [...], "nextPageToken": ...}`` for the ``pageSize`` and
    ``pageToken`` query parameters (the token is the offset of the next page)."""
    try:
        size = int(query.get("pageSize") or DEFAULT_PAGE_SIZE)
        start = int(query.get("pageToken") or 0)
    except ValueError:
        raise ApiError(400, "pageSize must be a number and pageToken one this server "
                            "answered") from None
    if size <= 0 or start < 0:
        raise ApiError(400, "pageSize must be positive and pageToken one this server answered")
    reply = {field: items[start:start + size]}
    if start + size < len(items):
        reply["nextPageToken"] = str(start + size)
    return reply
