"""CSV files people write by hand (index.csv, train.csv, a list of image paths), read as text columns.

One place turns what goes wrong in them into one line naming the file and the
line: an unquoted comma in a caption, a ragged row, a file saved as Latin-1.
"""

from __future__ import annotations

import io
import re

import pandas as pd

from clipforge.errors import UserError
from clipforge.storage import uri as storage


def read_text_csv(uri: str, required: list[str], data: bytes | None = None, *, unsigned: bool = False) -> pd.DataFrame:
    """Every column as str ('' for empty cells). Header names are matched ignoring case and spaces
    around them; a missing required column, bad quoting or non-UTF-8 text is a UserError."""
    raw = storage.read_bytes(uri, unsigned=unsigned) if data is None else data
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{uri} line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8; "
                        "save the file as UTF-8") from None
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{uri} is empty; it needs a header row: {','.join(required)}") from None
    except pd.errors.ParserError as exc:
        raise UserError(f"{uri}: {describe_parser_error(str(exc))}") from None
    if not isinstance(frame.index, pd.RangeIndex):
        # Every row has one field more than the header: pandas takes the first column for the row labels
        # quietly, and a rewrite of the file would lose it.
        raise UserError(f"{uri}: line 2 has {len(frame.columns) + 1} fields, the header {len(frame.columns)}; "
                        'put double quotes around a value that contains a comma ("a dark, gloomy square")')
    frame.columns = [_header(column, required) for column in frame.columns]
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise UserError(f"{uri} has no column {missing[0]!r}; it needs columns {','.join(required)} "
                        f"(found: {', '.join(map(str, frame.columns))})")
    return frame


def _header(column: str, required: list[str]) -> str:
    name = str(column).strip()
    return name.lower() if name.lower() in required else name


def describe_parser_error(message: str) -> str:
    """pandas' tokenizer message, said the way a person fixes the file."""
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if fields:
        expected, line, saw = fields.groups()
        return (f"line {line} has {saw} fields, the header {expected}; "
                'put double quotes around a value that contains a comma ("a dark, gloomy square")')
    return message.strip().splitlines()[0]


def shown(value: str) -> str:
    """A value from a hand-written CSV as a message shows it: quoted when spaces around it (or nothing at all)
    would be invisible, as in `image "a.png " not found`."""
    return f'"{value}"' if not value or value != value.strip() else value
