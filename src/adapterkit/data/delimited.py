"""CSV and TSV text into a ``Table``, with the file line of every row.

The parser is Python's ``csv`` module in strict mode, fed physical lines (see
``data.sources``), so the line a row starts on is known even when an earlier
quoted field spans several lines. Every value stays a string: a review that
says "NA" is text, not a missing value.

CSV fields may be quoted (``"a, b"``, with ``""`` for a quote inside); TSV
fields are never quoted (a quote is an ordinary character, as in the GLUE
files), so they cannot hold a tab or a line break. Blank lines are skipped.
A row with more or fewer fields than the header, or a quote that is never
closed, is a ``DataError`` naming the line; it is never merged or padded.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd

from adapterkit.data.errors import DataError
from adapterkit.data.values import preview

# The longest field read: a whole document, not the csv module's default of 128 KiB.
FIELD_LIMIT = 2**30

# (name used in messages, delimiter, quoting) per format.
FORMATS = {
    "csv": ("comma", ",", csv.QUOTE_MINIMAL),
    "tsv": ("tab", "\t", csv.QUOTE_NONE),
}


def _records(text: str, source: str, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """``(start line, fields)`` of every non-blank record, in file order."""
    _, delimiter, quoting = FORMATS[fmt]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(source, _problem(err, start, reader.line_num, fmt), where=f"line {start}") from None
        if len(fields) > 1 or (fields and fields[0].strip()):
            yield start, fields


def _problem(err: csv.Error, start: int, current: int, fmt: str) -> str:
    """A readable sentence for the ``csv`` module's error on the record starting at line ``start``."""
    text = str(err)
    if "unexpected end of data" in text:
        return ('expected a closing double quote (") for a quoted field of this record, found the end '
                "of the file; a quote inside a quoted field is written twice (\"\")")
    if "expected after" in text:
        return (f"expected a {FORMATS[fmt][0]} or the end of the line after the closing quote of a "
                f"field, found more text (line {current}); a quote inside a quoted field is written "
                'twice (""), and a field with a quote must itself be quoted')
    if "field larger than field limit" in text:
        return (f"expected fields of at most {csv.field_size_limit()} characters, found a longer one "
                f"(up to line {current}); this is most often a quote that is never closed")
    return f"expected {fmt.upper()} text, found a record the csv parser rejects: {text}"


@contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    """The csv module's (process-wide) field size limit raised to ``limit`` for a while."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(limit, previous))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _header(fields: list[str], source: str, line: int) -> list[str]:
    """Column names; empty ones become ``Unnamed: i`` (as pandas names them), duplicates are an error."""
    names = [name if name.strip() else f"Unnamed: {i}" for i, name in enumerate(fields)]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(source, f"expected unique column names in the header, found {name!r} "
                            f"as column {seen[name] + 1} and column {i + 1}", where=f"line {line}")
        seen[name] = i
    return names


def parse_delimited(text: str, source: str, fmt: str) -> tuple[pd.DataFrame, list[int]]:
    """Parse CSV (``fmt="csv"``) or TSV (``"tsv"``) text into a frame of strings.

    Returns:
        The frame, one row per record after the header, and the file line
        each row starts on.

    Raises:
        DataError: a record whose field count differs from the header's, a
            quote that is never closed, or duplicate column names.
    """
    rows, lines = [], []
    with _field_limit(FIELD_LIMIT):
        records = _records(text, source, fmt)
        first = next(records, None)
        if first is None:
            raise DataError(source, "expected a header line, found only blank lines")
        header = _header(first[1], source, first[0])
        for line, fields in records:
            if len(fields) != len(header):
                raise DataError(source, _count_problem(header, fields, fmt), where=f"line {line}")
            rows.append(fields)
            lines.append(line)
    return pd.DataFrame(rows, columns=header, dtype=object), lines


def _count_problem(header: list[str], fields: list[str], fmt: str) -> str:
    name = FORMATS[fmt][0]
    if len(fields) < len(header):
        hint = "a field is missing"
    elif fmt == "csv":
        hint = "a comma inside a text needs the whole field in double quotes"
    else:
        hint = "a tab inside a text splits it into two fields"
    shown = header if len(header) <= 8 else [*header[:8], "..."]
    return (f"expected {len(header)} {name}-separated fields (one per header column {shown}), "
            f"found {len(fields)}: {preview(fields)}; {hint}")
