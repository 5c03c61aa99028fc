"""Read tabular files (CSV, TSV, JSON, JSONL, Parquet) into a ``Table``.

A ``Table`` is a pandas frame plus how to name a row of it in an error
message ("line 7" for line-based files, "record 3" otherwise). Text formats are
decoded strictly as UTF-8 so a bad byte is reported with its line and offset
instead of turning silently into replacement characters.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from adapterkit.data.errors import DataError

# Compression suffixes we undo before parsing, and how.
DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".bz2": bz2.decompress,
    ".gz": gzip.decompress,
    ".xz": lzma.decompress,
}


@dataclass
class Table:
    """Rows read from one source, with a way to describe row ``i`` (0-based)."""

    frame: pd.DataFrame
    source: str
    first_line: int | None = None  # file line of row 0, for line-based formats
    # Integer columns whose values have names (a datasets ``ClassLabel``).
    value_names: dict[str, list[str]] = field(default_factory=dict)

    def where(self, i: int) -> str:
        """A human position for row ``i``: a file line or a 1-based record number."""
        if self.first_line is not None:
            return f"line {self.first_line + i}"
        return f"record {i + 1}"


def decode_utf8(raw: bytes, source: str) -> str:
    """Strict UTF-8 decoding; a bad byte is a ``DataError`` with its line and offset."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        bad = raw[err.start : err.start + 4]
        raise DataError(
            source,
            f"bytes {bad!r} at byte offset {err.start} are not valid UTF-8; "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
            where=f"line {line}",
        ) from None
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the header
        text = text[1:]
    if not text.strip():
        raise DataError(source, "the file is empty")
    return text


_decode_utf8 = decode_utf8  # the earlier private name, still imported elsewhere


def _read_delimited(text: str, source: str, sep: str) -> Table:
    # Everything as strings, and no "NA"/"null" magic: a review that says
    # "NA" is text, not a missing value.
    frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False,
                        quoting=3 if sep == "\t" else 0)
    return Table(frame, source, first_line=2)


def _read_csv(text: str, source: str) -> Table:
    return _read_delimited(text, source, ",")


def _read_tsv(text: str, source: str) -> Table:
    return _read_delimited(text, source, "\t")


def _records_frame(records: list[Any], source: str, where: Callable[[int], str]) -> pd.DataFrame:
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(source, f"expected a JSON object, found {type(record).__name__}",
                            where=where(i))
    return pd.DataFrame.from_records(records)


def _read_json(text: str, source: str) -> Table:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(source, f"invalid JSON: {err.msg}", where=f"line {err.lineno}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists:
            data = lists[0]  # {"data": [...]}-style wrapper
        elif data and all(isinstance(v, list) for v in data.values()):
            return Table(pd.DataFrame(data), source)  # column-oriented
    if not isinstance(data, list):
        raise DataError(source, "expected a JSON list of objects (or JSON Lines in a .jsonl file)")
    table = Table(pd.DataFrame(), source)
    table.frame = _records_frame(data, source, table.where)
    return table


def _read_jsonl(text: str, source: str) -> Table:
    records = []
    lines = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(source, f"invalid JSON: {err.msg}", where=f"line {lineno}") from None
        lines.append(lineno)
    frame = _records_frame(records, source, lambda i: f"line {lines[i]}")
    # Blank lines are rare; when there are none, row i sits on line i + 1.
    return Table(frame, source, first_line=1 if lines == list(range(1, len(lines) + 1)) else None)


def _read_parquet(path: Path) -> Table:
    if path.stat().st_size == 0:
        raise DataError(str(path), "the file is empty")
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several unrelated types
        raise DataError(str(path), f"cannot read Parquet: {err}") from None
    return Table(frame, str(path))


# File suffix -> parser of the decoded text.
TEXT_READERS: dict[str, Callable[[str, str], Table]] = {
    ".csv": _read_csv,
    ".tsv": _read_tsv,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
}
SUPPORTED_SUFFIXES = sorted([*TEXT_READERS, ".parquet", ".pq"])


def read_table(path: str | Path) -> Table:
    """Read a CSV/TSV/JSON/JSONL/Parquet file (optionally .bz2/.gz/.xz compressed)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(source, "no such file")
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in DECOMPRESSORS else None
    fmt = suffixes[-2] if compression and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if fmt in (".parquet", ".pq") and compression is None:
        table = _read_parquet(path)
    elif fmt in TEXT_READERS:
        raw = path.read_bytes()
        if compression:
            raw = DECOMPRESSORS[compression](raw)
        table = TEXT_READERS[fmt](decode_utf8(raw, source), source)
    else:
        raise DataError(source, f"unknown file type {fmt or '(no suffix)'!r}; "
                        f"expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    if len(table.frame) == 0:
        raise DataError(source, "the file has no data rows")
    return table


def table_from_object(data: Any) -> Table:
    """Wrap an in-memory source: a ``datasets.Dataset``, a DataFrame or a list of dicts."""
    if isinstance(data, pd.DataFrame):
        return Table(data.reset_index(drop=True), "<DataFrame>")
    if isinstance(data, list):
        table = Table(pd.DataFrame(), "<list>")
        table.frame = _records_frame(data, "<list>", table.where)
        return table
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
