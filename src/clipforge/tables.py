"""Plain-text tables for the CLI's listings: left-aligned columns two spaces apart, no trailing blanks."""

from __future__ import annotations

import json
from collections.abc import Callable


def text_table(rows: list[tuple]) -> str:
    """`rows[0]` is the header; cells are printed with `str`, a control character in one (a file name holding a
    newline or a tab) escaped, so that every row stays one line."""
    cells = [[escape_controls(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def escape_controls(text: str) -> str:
    """`text` with its control characters escaped as Python writes them (`\\n`, `\\t`, `\\x1b`)."""
    return "".join(char if char.isprintable() or char == " " else repr(char)[1:-1] for char in text)


def print_listing(items: list[dict], *, as_json: bool, table: Callable[[list[dict]], str], empty: str) -> None:
    """A listing command's output: JSON for scripts, else the table, else one line saying there is nothing."""
    if as_json:
        print(json.dumps(items, indent=2))
    else:
        print(table(items) if items else empty)
