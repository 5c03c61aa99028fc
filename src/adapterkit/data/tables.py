"""Read tabular files (CSV, TSV, JSON, JSONL, Parquet) into a ``Table``.

A ``Table`` is a pandas frame plus how to name a row of it in an error
message: "line 7" for line-based files (the physical line the row starts on,
counting the header and any line breaks inside quoted fields), "record 3"
otherwise. Text formats are decoded strictly as UTF-8 so a bad byte is
reported with its line and offset instead of turning silently into
replacement characters. Every way a file can fail to parse is a ``DataError``
naming the file.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adapterkit.data.delimited import parse_delimited
from adapterkit.data.errors import DataError
from adapterkit.data.jsontext import check_objects, parse_json, parse_jsonl
from adapterkit.data.sources import DECOMPRESSORS, decode_utf8, read_bytes, require_file

__all__ = ["DECOMPRESSORS", "SUPPORTED_SUFFIXES", "Table", "decode_utf8", "read_table", "table_from_object"]

# Columns pandas adds to a Parquet file to store a non-default index.
_INDEX_COLUMN = re.compile(r"__index_level_\d+__")


@dataclass
class Table:
    """Rows read from one source, with a way to describe row ``i`` (0-based)."""

    frame: pd.DataFrame
    source: str
    first_line: int | None = None  # file line of row 0, when rows sit one per line
    # Integer columns whose values have names (a datasets ``ClassLabel``).
    value_names: dict[str, list[str]] = field(default_factory=dict)
    # The file line each row starts on, for line-based formats (wins over ``first_line``).
    lines: list[int] | None = None

    def where(self, i: int) -> str:
        """A human position for row ``i``: a file line or a 1-based record number."""
        if self.lines is not None and i < len(self.lines):
            return f"line {self.lines[i]}"
        if self.first_line is not None:
            return f"line {self.first_line + i}"
        return f"record {i + 1}"


_decode_utf8 = decode_utf8  # the earlier private name, still imported elsewhere


def _read_csv(text: str, source: str) -> Table:
    frame, lines = parse_delimited(text, source, "csv")
    return Table(frame, source, lines=lines)


def _read_tsv(text: str, source: str) -> Table:
    frame, lines = parse_delimited(text, source, "tsv")
    return Table(frame, source, lines=lines)


def _read_json(text: str, source: str) -> Table:
    return Table(pd.DataFrame(parse_json(text, source)), source)


def _read_jsonl(text: str, source: str) -> Table:
    records, lines = parse_jsonl(text, source)
    return Table(pd.DataFrame(records), source, lines=lines)


def _read_parquet(raw: bytes, source: str) -> Table:
    if not raw:
        raise DataError(source, "expected a Parquet file, found an empty file")
    try:
        arrow = pq.read_table(io.BytesIO(raw))
        arrow.validate(full=True)  # e.g. strings that are not UTF-8, which pandas would hit later
        # Without pandas' metadata: a damaged copy of it must not stop the read.
        frame = arrow.to_pandas(ignore_metadata=True)
    except (pa.ArrowException, OSError) as err:
        raise DataError(source, f"expected a readable Parquet file, found one pyarrow rejects: {err}") from None
    except UnicodeDecodeError as err:  # a column name or string that is not UTF-8
        raise DataError(source, f"expected UTF-8 names and strings in the Parquet file, found the bytes "
                        f"{err.object[err.start:err.start + 4]!r}, which are not valid UTF-8") from None
    index = [c for c in frame.columns if _INDEX_COLUMN.fullmatch(str(c))]
    return Table(frame.drop(columns=index), source)


# File suffix -> parser of the decoded text.
TEXT_READERS: dict[str, Callable[[str, str], Table]] = {
    ".csv": _read_csv,
    ".tsv": _read_tsv,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
}
PARQUET_SUFFIXES = (".parquet", ".pq")
SUPPORTED_SUFFIXES = sorted([*TEXT_READERS, *PARQUET_SUFFIXES])


def table_format(path: str | Path) -> str:
    """The format suffix of ``path`` (``".csv"`` for ``data.csv.gz``), lower case; ``""`` if none."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in DECOMPRESSORS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_table(path: str | Path) -> Table:
    """Read a CSV/TSV/JSON/JSONL/Parquet file (optionally .bz2/.gz/.xz compressed).

    Raises:
        DataError: the file is missing, of an unknown type, unreadable in its
            format, or without data rows; the message names the file and,
            where there is one, the line or record.
    """
    path = require_file(path)
    source = str(path)
    fmt = table_format(path)
    if fmt in PARQUET_SUFFIXES:
        table = _read_parquet(read_bytes(path), source)
    elif fmt in TEXT_READERS:
        table = TEXT_READERS[fmt](decode_utf8(read_bytes(path), source), source)
    else:
        raise DataError(source, f"unknown file type {fmt or '(no suffix)'!r}; expected one of "
                        f"{', '.join(SUPPORTED_SUFFIXES)}, optionally compressed (+ .bz2/.gz/.xz)")
    if len(table.frame) == 0:
        raise DataError(source, "the file has no data rows; expected at least one record after the header")
    return table


def table_from_object(data: Any) -> Table:
    """Wrap an in-memory source: a ``datasets.Dataset``, a DataFrame or a list of dicts."""
    if isinstance(data, pd.DataFrame):
        twice = sorted({str(c) for c in data.columns[data.columns.duplicated()]})
        if twice:
            raise DataError("<DataFrame>", f"expected unique column names, found {twice} more than once")
        return Table(data.reset_index(drop=True), "<DataFrame>")
    if isinstance(data, list):
        where = [f"record {i + 1}" for i in range(len(data))]
        return Table(pd.DataFrame(check_objects(data, "<list>", where)), "<list>")
    if type(data).__module__.startswith("datasets") and hasattr(data, "to_pandas"):
        names = {
            column: list(feature.names)
            for column, feature in data.features.items()
            if getattr(feature, "names", None)
        }
        return Table(data.to_pandas(), "<datasets.Dataset>", value_names=names)
    raise TypeError(
        f"cannot read data from a {type(data).__name__}; give a file path, a "
        "datasets.Dataset, a pandas DataFrame or a list of dicts"
    )
