"""Checking single values from a data file: missing, what kind, and how to quote them in a message."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from adapterkit.data.errors import DataError


def is_missing(value: Any) -> bool:
    """``None``, NaN or ``pd.NA``: what pandas puts where a record lacks a key or a cell is empty."""
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or value is pd.NA or value is pd.NaT


def preview(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for quoting what was found in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind(value: object) -> str:
    """What a value is, in words for a message: ``"a list"``, ``"a number"``, ``"null"``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "a list", tuple: "a list", dict: "an object"}
    for base, name in names.items():
        if isinstance(value, base):
            return name
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return "a list" if getattr(value, "ndim", 0) else kind(value.tolist())
    return f"a {type(value).__name__}"


def text_value(value: Any, source: str, where: str, what: str) -> str | None:
    """``value`` as text: ``None`` when missing, else it must be a string.

    Raises:
        DataError: ``value`` is a list, an object, a number or another non-text.
    """
    if is_missing(value):
        return None
    if not isinstance(value, str):
        raise DataError(source, f"expected text in {what}, found {kind(value)} {preview(value)}", where=where)
    return value


def first_missing(values: list[Any]) -> int | None:
    """The index of the first ``None`` in ``values`` when some are not ``None``, else ``None``.

    A column filled in some rows and empty in others is a mistake in the data;
    one empty everywhere means the data is unlabelled.
    """
    if all(v is None for v in values):
        return None
    return next((i for i, v in enumerate(values) if v is None), None)
