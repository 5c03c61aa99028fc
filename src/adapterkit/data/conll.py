"""Read token-tagged files (CoNLL columns, JSON Lines) into a table of sentences.

CoNLL style: one token per line, whitespace-separated columns, the token first
and its tag last (any columns between, such as part-of-speech or chunk tags,
are ignored); a blank (or whitespace-only) line ends a sentence and
``-DOCSTART-`` lines are skipped. JSON/JSONL/Parquet files go through
``read_table`` and give one row per sentence with list columns (``tokens``,
``tags``). Either way the result is a ``Table`` with one row per sentence,
which ``token_classification_from_table`` turns into examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from adapterkit.data.errors import DataError
from adapterkit.data.sources import DECOMPRESSORS, read_text, split_lines
from adapterkit.data.tables import Table, read_table
from adapterkit.data.tagging import split_tag

# Suffixes read by ``read_table``; every other file (.txt, .conll, .tsv, .bio...)
# is read as CoNLL columns.
TABLE_SUFFIXES = frozenset({".json", ".jsonl", ".ndjson", ".parquet", ".pq"})
DOCSTART = "-DOCSTART-"


@dataclass
class SentenceTable(Table):
    """A table of sentences; ``lines`` holds the file line each sentence starts on."""

    def where(self, i: int) -> str:
        """``"sentence starting at line N"`` for sentence ``i`` (0-based)."""
        if self.lines is not None and i < len(self.lines):
            return f"sentence starting at line {self.lines[i]}"
        return super().where(i)


def parse_conll(text: str, source: str) -> SentenceTable:
    """Parse CoNLL-style text into a ``SentenceTable`` with ``tokens`` and ``tags`` columns.

    Raises:
        DataError: a line with one column, or a tag that is neither ``O`` nor
            ``B-/I-/E-/S-TYPE``; the message names the line.
    """
    sentences: list[tuple[list[str], list[str]]] = []
    lines: list[int] = []
    tokens: list[str] = []
    tags: list[str] = []

    def close() -> None:
        nonlocal tokens, tags
        if tokens:
            sentences.append((tokens, tags))
        tokens, tags = [], []

    for lineno, line in enumerate(split_lines(text), start=1):
        columns = line.split()
        if not columns:
            close()
            continue
        if columns[0] == DOCSTART:
            close()
            continue
        if len(columns) < 2:
            raise DataError(source, f"expected a token and its tag separated by whitespace, found {line.strip()!r}",
                            where=f"line {lineno}")
        try:
            split_tag(columns[-1])
        except ValueError as err:
            raise DataError(source, f"{err}; the tag is the last column", where=f"line {lineno}") from None
        if not tokens:
            lines.append(lineno)
        tokens.append(columns[0])
        tags.append(columns[-1])
    close()
    if not sentences:
        raise DataError(source, "expected CoNLL-style 'token tag' lines, found no tagged tokens")
    frame = pd.DataFrame({"tokens": [s[0] for s in sentences], "tags": [s[1] for s in sentences]})
    return SentenceTable(frame, source, lines=lines)


def read_conll(path: str | Path) -> SentenceTable:
    """Read a CoNLL-style file (optionally .bz2/.gz/.xz compressed)."""
    return parse_conll(read_text(path), str(path))


def read_token_file(path: str | Path) -> Table:
    """A token-tagged file as a table of sentences: JSON/JSONL/Parquet by suffix, else CoNLL."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in DECOMPRESSORS:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in TABLE_SUFFIXES:
        return read_table(path)
    return read_conll(path)
