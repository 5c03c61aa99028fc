"""Text classification data: pick the text, optional text-pair and label columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.tables import Table
from adapterkit.data.values import is_missing, kind, preview, text_value


def _label_key(value: Any, table: Table, i: int, column: str) -> str | None:
    """Labels are compared as strings; 1, 1.0 and "1" are the same label. ``None`` when missing."""
    if hasattr(value, "item") and not isinstance(value, str) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy scalars
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (str, int)):
        raise DataError(table.source, f"expected a label (a string or a whole number) in column {column!r}, "
                        f"found {kind(value)} {preview(value)}", where=table.where(i))
    text = str(value).strip()
    return text or None


def _sort_labels(found: set[str]) -> list[str]:
    """Integer-looking labels sort numerically ("2" before "10"), others alphabetically."""
    try:
        return sorted(found, key=int)
    except ValueError:
        return sorted(found)


def _require_columns(table: Table, wanted: dict[str, str | None]) -> None:
    present = [str(c) for c in table.frame.columns]
    for role, column in wanted.items():
        if column is not None and column not in table.frame.columns:
            raise DataError(
                table.source,
                f"no column {column!r} for the {role.replace('_column', '').replace('_', ' ')}; "
                f"the columns found are {present}. Choose one with --{role.replace('_', '-')} NAME",
            )


def _text(value: Any, table: Table, i: int, column: str) -> str:
    text = text_value(value, table.source, table.where(i), f"column {column!r}")
    if text is None:
        raise DataError(table.source, f"missing value in column {column!r}; expected a text",
                        where=table.where(i))
    if not text.strip():
        raise DataError(table.source, f"empty text in column {column!r}; expected a text, found "
                        f"{preview(text)}", where=table.where(i))
    return text


def _named_label(key: str, names: list[str], table: Table, i: int, column: str) -> str:
    """The class name of integer label ``key`` of a ``datasets`` ``ClassLabel`` column."""
    index = int(key) if key.lstrip("-").isdigit() else -1
    if not 0 <= index < len(names):
        raise DataError(table.source, f"expected a class index from 0 to {len(names) - 1} in column "
                        f"{column!r} ({names}), found {key}; -1 marks an unlabelled test split",
                        where=table.where(i))
    return names[index]


def classification_from_table(
    table: Table,
    text_column: str = "text",
    label_column: str | None = "label",
    text_pair_column: str | None = None,
    labels: Sequence[str] | None = None,
) -> TaskData:
    """Turn a table into classification examples.

    Args:
        table: the rows, from ``read_table`` or ``table_from_object``.
        text_column: the column with the text.
        label_column: the column with the label (string or integer); ``None``
            gives unlabelled examples (for prediction).
        text_pair_column: the second text of sentence-pair tasks.
        labels: the label vocabulary of the training data. When given, every
            label must be one of them (an unseen label is an error naming the
            row); when ``None`` the vocabulary is the sorted set of labels found.
    """
    columns = {"text_column": text_column, "label_column": label_column,
               "text_pair_column": text_pair_column}
    _require_columns(table, columns)
    frame = table.frame
    names = table.value_names.get(label_column or "", None)
    raw_labels: list[str | None] = [None] * len(frame)
    if label_column is not None:
        for i, value in enumerate(frame[label_column].tolist()):
            key = _label_key(value, table, i, label_column)
            if key is None:
                raise DataError(table.source, f"missing label in column {label_column!r}; expected a label",
                                where=table.where(i))
            raw_labels[i] = _named_label(key, names, table, i, label_column) if names else key
    vocabulary = list(labels) if labels is not None else _sort_labels(
        {label for label in raw_labels if label is not None})
    index = {label: i for i, label in enumerate(vocabulary)}
    texts = frame[text_column].tolist()
    pairs = frame[text_pair_column].tolist() if text_pair_column else None
    examples = []
    for i, text in enumerate(texts):
        example: dict[str, Any] = {"text": _text(text, table, i, text_column), "where": table.where(i)}
        if pairs is not None:
            example["text_pair"] = _text(pairs[i], table, i, text_pair_column)
        label = raw_labels[i]
        if label is not None and label not in index:
            raise DataError(
                table.source,
                f"label {label!r} was never seen in training; expected one of the known labels {vocabulary}",
                where=table.where(i),
            )
        example["label"] = None if label is None else index[label]
        examples.append(example)
    if label_column is not None and labels is None and len(vocabulary) < 2:
        raise DataError(table.source, f"expected at least two labels in column {label_column!r} for "
                        f"classification, found only {vocabulary}")
    return TaskData("classification", examples, vocabulary, table.source, columns)


def classification_from_texts(texts: Sequence[str], labels: Sequence[str] | None = None) -> TaskData:
    """Unlabelled classification examples from plain strings (for ``predict``)."""
    examples = [{"text": str(t), "label": None, "where": f"text {i + 1}"} for i, t in enumerate(texts)]
    return TaskData("classification", examples, list(labels) if labels else None, "<texts>")
