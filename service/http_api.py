"""The HTTP layer: Vertex-style REST routes, errors in Google's JSON shape, the bearer token,
on the hardened server of :mod:`components.common.http_server` (body, connection and load limits;
requests from web pages refused).

A route is a method and a path template such as ``{parent}/pipelineJobs/{id}:cancel``, where
``{parent}`` stands for ``/v1/projects/{project}/locations/{location}`` (``/v1beta1`` alike) and
``{id}`` for one path segment (percent-decoded). ``HEAD`` is answered as ``GET`` without the body.
A handler answers a JSON object, or a :class:`Stream` of bytes sent as they come (chunked).
Every refusal is answered as Google APIs answer one,
``{"error": {"code": 404, "message": "...", "status": "NOT_FOUND"}}``:

    400 INVALID_ARGUMENT  malformed JSON (with the parser's reason), a body that is not an object,
                          unknown fields or query parameters (named), bad values, JSON nested too
                          deep, integers too long, NUL characters or lone surrogates
    401 UNAUTHENTICATED   the server has a token and the request lacks it
    403 PERMISSION_DENIED a request a web page made (foreign Origin or Host)
    404 NOT_FOUND         no such path, or no such resource
    405 UNIMPLEMENTED     a known path with another method (the ``Allow`` header lists them)
    408 DEADLINE_EXCEEDED the request's headers took too long
    409 ALREADY_EXISTS    a resource ID that is taken
    411 INVALID_ARGUMENT  a body without Content-Length (chunked bodies are not read)
    413 INVALID_ARGUMENT  a body over the size limit (it is not read)
    414 INVALID_ARGUMENT  a URL over 8 KiB
    415 INVALID_ARGUMENT  a body that is not ``Content-Type: application/json``
    431 INVALID_ARGUMENT  headers over 16 KiB
    503 UNAVAILABLE       too many connections or requests at once (``Retry-After``)
"""
from __future__ import annotations

import asyncio
import hmac
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import parse_qs, unquote

from components.common.http_server import (App, HttpError, Limits, RequestGuard, read_json_body,
                                           request_headers, send_json, start_stream,
                                           until_disconnected)

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED",
                409: "ALREADY_EXISTS", 411: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT",
                414: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT", 431: "INVALID_ARGUMENT",
                500: "INTERNAL", 503: "UNAVAILABLE"}
UNREAD_BODY_CODES = (401, 411, 413, 415)  # answered before the body is read: the connection
# closes rather than reading what may follow
PARENT = (r"/(?P<version>v1|v1beta1)/projects/(?P<project>[^/:]+)"
          r"/locations/(?P<location>[^/:]+)")
ALWAYS_ALLOWED_QUERY = frozenset({"$alt", "alt"})  # Google's REST clients send $alt=json;...


class ApiError(HttpError):
    """A refused request: its HTTP status, message and Google status name."""

    def __init__(self, code: int, message: str, status: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(code, message, headers)
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


def error_body(error: HttpError) -> dict:
    """Any refusal in Google's error shape."""
    status = error.status if isinstance(error, ApiError) else None
    return ApiError(error.code, error.message, status).body()


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


@dataclass
class Stream:
    """A handler's answer sent as it is produced: ``chunks`` (each sent as it comes, read on a
    worker thread); a generator is closed once all is sent or the client has gone."""

    chunks: Iterator[bytes]
    content_type: str


Handler = Callable[[Call], "dict | Stream"]


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
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            for name, value in params.items():
                if not value.isprintable():
                    raise ApiError(400, f"the path's {name} {value!r} has control characters")
            return candidate, params
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
    for name, value in query.items():
        if not (name + value).isprintable():
            raise ApiError(400, f"the query parameter {name!r} has control characters")
    unknown = sorted(set(query) - allowed - ALWAYS_ALLOWED_QUERY)
    if unknown:
        takes = f"; this call takes {sorted(allowed)}" if allowed else "; this call takes none"
        raise ApiError(400, f"unknown query parameters {unknown}{takes}")
    return query


def body_object(body: object) -> dict:
    """The request body as a JSON object (no body: ``{}``); ApiError 400 for another value."""
    if body is None:
        return {}
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


def make_app(routes: list[Route], token: str | None, limits: Limits,
             guard: RequestGuard) -> App:
    """The ASGI app: refuses web pages' requests and requests without the token, reads the
    body, routes, runs the handler on a worker thread and answers JSON."""
    workers = ThreadPoolExecutor(max_workers=limits.max_in_flight,
                                 thread_name_prefix="tunepipe-request")

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        headers = request_headers(scope)
        method = scope["method"]
        cors: dict[str, str] = {}
        try:
            guard.check(headers, scope["server"][1])
            cors = guard.cors_headers(headers)
            if method == "OPTIONS":
                if cors:  # a preflight from a page the operator allows
                    await send_json(send, 200, {}, cors)
                    return
                raise ApiError(405, "OPTIONS is answered only to web pages the server allows "
                                    "(tunepipe serve --allow-origin ORIGIN)")
            if token is not None and not authorized(headers.get("authorization", ""), token):
                raise ApiError(401, "this server needs a bearer token: send the header "
                                    "'Authorization: Bearer TOKEN' with the token tunepipe serve "
                                    "was given",
                               headers={"WWW-Authenticate": 'Bearer realm="tunepipe"'})
            body = None
            if method in ("POST", "PUT", "PATCH"):
                body = await read_json_body(receive, headers, limits)
            path = scope["raw_path"].decode("latin-1")
            found, params = find_route(routes, "GET" if method == "HEAD" else method, path)
            query = parse_query(scope["query_string"].decode("latin-1"), found.query)
            call = Call(params, query, body_object(body))
            payload = await asyncio.get_running_loop().run_in_executor(workers, found.handler,
                                                                       call)
        except HttpError as error:
            extra = {"Connection": "close"} if error.code in UNREAD_BODY_CODES else {}
            await send_json(send, error.code, error_body(error), {**error.headers, **cors,
                                                                  **extra})
            return
        if isinstance(payload, Stream):
            await send_stream(payload, receive, send, cors)
            return
        await send_json(send, 200, payload, cors)

    async def send_stream(stream: Stream, receive: Callable, send: Callable,
                          headers: dict[str, str]) -> None:
        """Sends ``stream``'s chunks as they come, until they end or the client goes away."""
        loop = asyncio.get_running_loop()
        await start_stream(send, stream.content_type, headers)
        watcher = asyncio.create_task(until_disconnected(receive))
        chunks = iter(stream.chunks)
        try:
            while not watcher.done():
                chunk = await loop.run_in_executor(workers, next, chunks, None)
                if chunk is None:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            if hasattr(chunks, "close"):
                await loop.run_in_executor(workers, chunks.close)

    return app


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
