"""Small helpers for the Markdown reports components write: one for the KFP UI, one for people."""
from __future__ import annotations

import base64
import os
import re

TABLE_CELL_CHARS = 300
VIEWER_SUFFIX = ".md"  # the report for Markdown viewers: <artifact path>.md
# An image inline as a data URI, as the KFP UIs need them (they show the artifact's file alone).
_INLINE_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\(data:image/(?P<kind>png|jpeg|gif);base64,"
                           r"(?P<data>[A-Za-z0-9+/=]+)\)")


def table_cell(value, limit: int = TABLE_CELL_CHARS) -> str:
    """Text made safe for one Markdown table cell: cut at ``limit`` characters, pipes and
    backslashes escaped, newlines shown as ⏎, HTML brackets escaped; ``(empty)`` for blank."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "⏎ ")
    text = text.replace("<", "&lt;").replace(">", "&gt;")
    return text if text.strip() else "(empty)"


def write_report(path: str | os.PathLike, markdown: str) -> list[str]:
    """Writes a report twice: ``path`` as given (the KFP Markdown output artifact, whose images
    stay inline for the Vertex and KFP UIs), and ``<path>.md`` beside it for any Markdown
    viewer, each inline image saved as a file beside that (``<name>-1.png``, ...) and linked by
    its file name. Local paths and gs:// URIs; returns what it wrote beside the artifact."""
    from components.common import storage

    path = os.fspath(path)
    folder, name = path.rsplit("/", 1) if "/" in path else (".", path)
    images: list[tuple[str, bytes]] = []

    def saved(match: re.Match) -> str:
        file_name = f"{name}-{len(images) + 1}.{match['kind'].replace('jpeg', 'jpg')}"
        images.append((file_name, base64.b64decode(match["data"])))
        return f"![{match['alt']}]({file_name})"

    viewable = _INLINE_IMAGE.sub(saved, markdown)
    storage.write_text(path, markdown)
    written = []
    for file_name, data in images:
        written.append(storage.join(folder, file_name))
        storage.write_bytes(written[-1], data)
    written.append(path + VIEWER_SUFFIX)
    storage.write_text(written[-1], viewable)
    return written
