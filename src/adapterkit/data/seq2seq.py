"""Source/target pairs for the ``seq2seq`` task (translation, summarisation, ...).

Examples are ``{"source": str, "target": str | None, "where": str}``. They
come from a table's source and target columns or from parallel text files
(``train.en`` + ``train.de``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.parallel import is_parallel_path, read_parallel
from adapterkit.data.tables import Table, read_table
from adapterkit.data.values import first_missing, is_missing, kind, preview

TASK = "seq2seq"
# (source, target) column pairs tried in order when none are named.
COLUMN_LAYOUTS = (("source", "target"), ("src", "tgt"), ("input", "output"), ("document", "summary"),
                  ("text", "summary"), ("en", "de"))


def _pick_columns(columns: list[str], chosen: dict[str, Any], source: str) -> tuple[str, str | None]:
    text = chosen.get("source_column") or chosen.get("text_column")
    target = chosen.get("target_column") or chosen.get("label_column")
    if text is None:
        for first, second in COLUMN_LAYOUTS:
            if first in columns and second in columns:
                return first, target or second
        if "source" in columns or "text" in columns:
            return ("source" if "source" in columns else "text"), target
        raise DataError(source, f"expected a source column ({', '.join(p[0] for p in COLUMN_LAYOUTS)}), "
                        f"found the columns {columns}; name it with source_column=... (and "
                        "target_column=...)")
    return text, target


def _target(value: Any, source: str, where: str) -> str | None:
    """A target as text (numbers are written out); ``None`` when missing or blank."""
    if is_missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(source, f"expected a target text, found {kind(value)} {preview(value)}", where=where)
    text = str(value)
    return text if text.strip() else None


def _examples(sources: Sequence[Any], targets: Sequence[Any] | None, where: Sequence[str],
              source: str, prefix: str) -> list[dict[str, Any]]:
    """Checked examples; targets are all given, or all missing (unlabelled data), never a mix."""
    examples = []
    for i, text in enumerate(sources):
        if not isinstance(text, str) or not text.strip():
            raise DataError(source, f"expected a non-empty source text, found {kind(text)} {preview(text)}",
                            where=where[i])
        target = _target(targets[i], source, where[i]) if targets is not None else None
        examples.append({"source": prefix + text, "target": target, "where": where[i]})
    gap = first_missing([e["target"] for e in examples])
    if gap is not None:
        raise DataError(source, "expected a target text, as other rows have, found none; fill it in "
                        "or drop the row", where=where[gap])
    return examples


def seq2seq_from_table(table: Table, labels: Sequence[str] | None = None, **columns: str | None) -> TaskData:
    """``seq2seq`` examples from a table.

    Args:
        table: rows from ``read_table`` or ``table_from_object``.
        labels: unused; accepted for a uniform reader signature.
        **columns: ``source_column`` (alias ``text_column``), ``target_column``
            (alias ``label_column``; without it the examples are unlabelled),
            ``source_prefix`` (text put before every source, e.g. T5's
            ``"translate English to German: "``).
    """
    names = [str(c) for c in table.frame.columns]
    source_column, target_column = _pick_columns(names, columns, table.source)
    missing = [c for c in (source_column, target_column) if c is not None and c not in names]
    if missing:
        raise DataError(table.source, f"missing column(s) {missing}; the columns found are {names}")
    frame = table.frame
    where = [table.where(i) for i in range(len(frame))]
    targets = frame[target_column].tolist() if target_column else None
    examples = _examples(frame[source_column].tolist(), targets, where, table.source,
                         columns.get("source_prefix") or "")
    chosen = {"source_column": source_column, "target_column": target_column,
              "source_prefix": columns.get("source_prefix")}
    return TaskData(TASK, examples, None, table.source, chosen)


def read_seq2seq_file(path: str | os.PathLike, labels: Sequence[str] | None = None,
                      **columns: str | None) -> TaskData:
    """``seq2seq`` examples from a table file or a parallel file pair (``train.en`` + ``train.de``)."""
    if is_parallel_path(path):
        pair = read_parallel(path, columns.get("target_language"))
        examples = _examples(pair.sources, pair.targets, pair.where, pair.source,
                             columns.get("source_prefix") or "")
        return TaskData(TASK, examples, None, pair.source,
                        {"target_language": pair.target_language, "source_prefix": columns.get("source_prefix")})
    return seq2seq_from_table(read_table(path), labels, **columns)


def seq2seq_from_texts(texts: Sequence[str], prefix: str = "") -> TaskData:
    """Unlabelled sources (what ``predict`` receives)."""
    where = [f"text {i + 1}" for i in range(len(texts))]
    return TaskData(TASK, _examples([str(t) for t in texts], None, where, "<texts>", prefix), None, "<texts>")
