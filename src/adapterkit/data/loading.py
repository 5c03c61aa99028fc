"""``load_data``: one entry point from a path, a built-in name or an object to ``TaskData``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adapterkit.data.builtin import BUILTIN_DATASETS, builtin_table
from adapterkit.data.classification import classification_from_table
from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.instructions import instructions_from_table, read_instruction_file
from adapterkit.data.seq2seq import read_seq2seq_file, seq2seq_from_table
from adapterkit.data.squad import qa_from_table, read_qa_file
from adapterkit.data.sources import read_text, split_lines
from adapterkit.data.tables import SUPPORTED_SUFFIXES, Table, read_table, table_from_object
from adapterkit.data.token_classification import (
    read_token_classification_file,
    token_classification_from_table,
)
from adapterkit.data.values import text_value

# Task name -> function(table, labels=..., **columns) -> TaskData.
TASK_READERS: dict[str, Callable[..., TaskData]] = {
    "classification": classification_from_table,
    "causal-lm": instructions_from_table,
    "seq2seq": seq2seq_from_table,
    "question-answering": qa_from_table,
    "token-classification": token_classification_from_table,
}

# Tasks whose files are not plain tables (SQuAD's nested JSON):
# task name -> function(path, labels=..., **columns) -> TaskData.
TASK_FILE_READERS: dict[str, Callable[..., TaskData]] = {
    "causal-lm": read_instruction_file,
    "question-answering": read_qa_file,
    "seq2seq": read_seq2seq_file,
    "token-classification": read_token_classification_file,
}


def load_data(
    source: str | os.PathLike | Any,
    task: str = "classification",
    split: str | None = None,
    labels: Sequence[str] | None = None,
    **columns: str | None,
) -> TaskData:
    """Read examples for ``task`` from a built-in name, a file, or an in-memory object.

    Args:
        source: a built-in data set name (``"rotten_tomatoes"``), a file path
            (CSV, TSV, JSON, JSONL, Parquet), a ``datasets.Dataset``, a pandas
            DataFrame, a list of dicts, or an existing ``TaskData`` (returned as is).
        task: which reader turns rows into examples (``TASK_READERS``).
        split: for built-in data sets: ``"train"``, ``"validation"`` or ``"test"``
            (default ``"train"``); files are used whole.
        labels: the training label vocabulary; labels outside it are errors.
        **columns: column names for the task reader, e.g. ``text_column="sentence"``.
            ``None`` values fall back to the reader's (or built-in data set's) defaults.
    """
    if isinstance(source, TaskData):
        return source
    if task not in TASK_READERS:
        raise DataError(_describe(source), f"no data reader for task {task!r}; expected one of "
                        f"{sorted(TASK_READERS)}")
    chosen = {k: v for k, v in columns.items() if v is not None}
    table: Table
    if isinstance(source, (str, os.PathLike)) and str(source) in BUILTIN_DATASETS:
        table, entry = builtin_table(str(source), split or "train")
        if entry.task != task:
            raise DataError(str(source), f"expected a {task} data set, found a {entry.task} one; "
                            f"pass task={entry.task!r} or choose another data set")
        chosen = {**entry.columns, **chosen}
    elif isinstance(source, (str, os.PathLike)):
        if split not in (None, "train", "validation", "test"):
            raise DataError(str(source), f"unknown split {split!r}; expected train, validation or test "
                            "(a file is used whole, whatever the split)")
        if task in TASK_FILE_READERS:
            return TASK_FILE_READERS[task](source, labels=labels, **chosen)
        table = read_table(source)
    else:
        table = table_from_object(source)
    return TASK_READERS[task](table, labels=labels, **chosen)


def _describe(source: Any) -> str:
    """A data source as it is named in messages: its path, or what kind of object it is."""
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def read_texts(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """Input texts from a file: a table's ``text_column`` for CSV/TSV/JSON/JSONL/Parquet,
    else one text per non-empty line."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if any(s in SUPPORTED_SUFFIXES for s in suffixes):
        table = read_table(path)
        if text_column not in table.frame.columns:
            raise DataError(str(path), f"no text column {text_column!r}; the columns found are "
                            f"{[str(c) for c in table.frame.columns]}")
        texts = [text_value(t, table.source, table.where(i), f"column {text_column!r}")
                 for i, t in enumerate(table.frame[text_column].tolist())]
        gap = next((i for i, t in enumerate(texts) if t is None), None)
        if gap is not None:
            raise DataError(table.source, f"missing value in column {text_column!r}; expected a text",
                            where=table.where(gap))
        return texts
    return [line for line in split_lines(read_text(path)) if line.strip()]
