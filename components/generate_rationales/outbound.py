"""Where a teacher may call out: the rules for teacher URLs, Vertex IDs and the serve allow-list.

A teacher URL (``openai:<URL>``, an allow-list entry) is ``http(s)://HOST[:PORT][/PATH]`` in
plain ASCII: no user info (``user@host``), query, fragment, percent-escapes, backslashes,
whitespace or control characters, and no empty, ``.`` or ``..`` path segments. Scheme and host
compare case-insensitively, a default port (80, 443) equals none, and a trailing ``/`` is
dropped.

``tunepipe serve`` calls out only under the prefixes its operator allows with
``--allow-teacher-url URL`` (:class:`TeacherAllowList`; none by default): a URL is allowed when
its scheme, host and port equal an entry's and its path starts with the entry's path at a
segment boundary (``http://h/v1`` allows ``http://h/v1/chat/completions``, not
``http://h/v10``). The URL checked is the OpenAI-compatible base URL (every call goes under it)
or the Vertex ``{api endpoint}/v1/{resource}``: ``https://us-central1-aiplatform.googleapis.com``
allows every Vertex teacher in us-central1, ``.../v1/projects/my-project`` only that project's.
``tunepipe run`` has no allow-list: there the user is the operator.

Vertex project and location IDs are checked before they become a host name or a path.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Iterable

ALLOW_FLAG = "--allow-teacher-url"
API_ENDPOINT_VARIABLE = "TUNEPIPE_VERTEX_API_ENDPOINT"
GLOBAL_LOCATION = "global"
_URL = re.compile(r"(?P<scheme>https?)://(?P<host>[a-z0-9._-]+|\[[0-9a-f:.]+\])"
                  r"(?::(?P<port>\d{1,5}))?(?P<path>(?:/[a-z0-9._~!$&'()*+,;=:@-]*)*)",
                  re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOCATION = re.compile(r"[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?")
_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]|[0-9]{1,20}")


def check_location(location: str) -> str:
    """``location`` when it is a Vertex AI location ID (``us-central1``, ``global``); else
    ValueError."""
    if not _LOCATION.fullmatch(location):
        raise ValueError(f"location {location!r} is not a Vertex AI location ID (lowercase "
                         "letters, digits and hyphens, e.g. us-central1, europe-west4, global)")
    return location


def check_project(project: str) -> str:
    """``project`` when it is a Google Cloud project ID (6-30 lowercase letters, digits and
    hyphens, starting with a letter) or project number; else ValueError."""
    if not _PROJECT.fullmatch(project):
        raise ValueError(f"project {project!r} is not a Google Cloud project ID (6-30 lowercase "
                         "letters, digits and hyphens, starting with a letter) or project number")
    return project


def google_vertex_endpoint(location: str) -> str:
    """Google's Vertex AI API endpoint for a (checked) location; the only host that gets the
    OAuth token."""
    if check_location(location) == GLOBAL_LOCATION:
        return "https://aiplatform.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


def vertex_api_endpoint(location: str) -> str:
    """``$TUNEPIPE_VERTEX_API_ENDPOINT`` (a stand-in, set by the operator) when set, else
    :func:`google_vertex_endpoint`."""
    override = os.environ.get(API_ENDPOINT_VARIABLE, "").rstrip("/")
    return override or google_vertex_endpoint(location)


@dataclass(frozen=True)
class TeacherUrl:
    """A checked teacher URL: lowercase scheme and host, the port (the default when none) and
    the path segments."""

    scheme: str
    host: str
    port: int
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, url: str) -> TeacherUrl:
        """The URL's parts; ValueError saying what is wrong."""
        match = _URL.fullmatch(url)
        if not match:
            raise ValueError(f"{url!r} is not a plain http(s)://HOST[:PORT][/PATH] URL (no "
                             "user@, query, fragment, percent-escapes, backslashes, spaces or "
                             "control characters)")
        scheme, host = match["scheme"].lower(), match["host"].lower()
        if host.startswith("["):
            try:
                host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
            except ValueError:
                raise ValueError(f"{url!r}: {host} is not an IPv6 address") from None
        port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[scheme]
        segments = tuple(match["path"].rstrip("/").split("/")[1:])
        if not 0 < port < 65536 or any(s in ("", ".", "..") for s in segments):
            raise ValueError(f"{url!r}: the port must be 1-65535 and the path may not hold "
                             "empty, '.' or '..' segments")
        return cls(scheme, host, port, segments)

    def __str__(self) -> str:
        port = "" if self.port == _DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}" + "".join(f"/{s}" for s in self.segments)

    def under(self, prefix: TeacherUrl) -> bool:
        """Whether this URL lies under ``prefix``: the same scheme, host and port, and a path
        that starts with the prefix's whole segments."""
        return ((self.scheme, self.host, self.port) == (prefix.scheme, prefix.host, prefix.port)
                and self.segments[:len(prefix.segments)] == prefix.segments)


@dataclass(frozen=True)
class TeacherAllowList:
    """The URL prefixes ``tunepipe serve`` may send teacher calls (and credentials) to."""

    prefixes: tuple[TeacherUrl, ...] = ()

    @classmethod
    def parse(cls, urls: Iterable[str]) -> TeacherAllowList:
        """The allow-list of ``--allow-teacher-url`` values; ValueError naming a bad one."""
        prefixes = []
        for url in urls:
            try:
                prefixes.append(TeacherUrl.parse(url))
            except ValueError as error:
                raise ValueError(f"{ALLOW_FLAG}: {error}") from None
        return cls(tuple(prefixes))

    def problem(self, reference: str, url: str) -> str | None:
        """Why teacher ``reference``, whose calls go under ``url``, may not be used; None when
        an entry allows it."""
        checked = TeacherUrl.parse(url)
        if any(checked.under(prefix) for prefix in self.prefixes):
            return None
        allowed = ", ".join(map(str, self.prefixes)) or "none"
        return (f"teacher_model_reference {reference!r} calls {checked}, which this server may "
                f"not call (allowed: {allowed}); the operator allows it by restarting tunepipe "
                f"serve with {ALLOW_FLAG} {checked} (or a shorter prefix of it)")
