"""Which local files a request may name: the allowed roots rule.

A request's datasets, model folders and output folder are either ``gs://`` URIs (always
allowed: the bucket's own permissions apply) or local paths. A local path is allowed only when,
resolved (relative to the server's working directory, symbolic links followed), it lies inside
one of the allowed roots: the tunepipe home, the directory ``tunepipe serve`` was started in,
and each ``--allow-root`` folder. Any other URI scheme (``file://``, ``http://``, ...) is
refused, so a client can make the server read or write only where its operator said.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from components.common.paths import tunepipe_home

GCS_SCHEME = "gs://"


@dataclass(frozen=True)
class AllowedRoots:
    """The folders local paths in requests must lie in (resolved, absolute)."""

    roots: tuple[Path, ...]

    @classmethod
    def default(cls, extra: list[str] | tuple[str, ...] = ()) -> AllowedRoots:
        """The tunepipe home, the working directory, and ``extra`` folders."""
        folders = [tunepipe_home(), Path.cwd(), *map(Path, extra)]
        return cls(tuple(dict.fromkeys(Path(f).expanduser().resolve() for f in folders)))

    def problem(self, field: str, uri: str) -> str | None:
        """Why ``uri`` (the value of ``field``) may not be used, or None when it may."""
        if uri.startswith(GCS_SCHEME):
            return None
        if "://" in uri:
            return (f"{field} {uri!r}: only gs:// URIs and local paths are accepted (for a local "
                    "file give its path, not a file:// URI)")
        path = Path(os.path.expanduser(uri)).resolve()
        if any(path.is_relative_to(root) for root in self.roots):
            return None
        return (f"{field} {uri!r} is outside the folders this server may read and write "
                f"({', '.join(map(str, self.roots))}); move it there, or restart tunepipe serve "
                "with --allow-root FOLDER")
