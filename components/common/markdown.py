"""Small helpers for the Markdown reports components show in the KFP UI."""
from __future__ import annotations

TABLE_CELL_CHARS = 300


def table_cell(value, limit: int = TABLE_CELL_CHARS) -> str:
    """Text made safe for one Markdown table cell: cut at ``limit`` characters, pipes and
    backslashes escaped, newlines shown as ⏎, HTML brackets escaped; ``(empty)`` for blank."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "⏎ ")
    text = text.replace("<", "&lt;").replace(">", "&gt;")
    return text if text.strip() else "(empty)"
