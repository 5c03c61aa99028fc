"""JSON and JSON Lines text into records (dicts), with where each record is.

A ``.json`` file holds a list of objects, a ``{"data": [objects]}`` wrapper,
or a column-oriented object ``{"text": [...], "label": [...]}``; its records
are named "record N". A ``.jsonl`` file holds one object per line (blank
lines are skipped) and its records are named by their file line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from adapterkit.data.errors import DataError
from adapterkit.data.sources import line_at, split_lines
from adapterkit.data.values import kind


_SURROGATE = re.compile("[\ud800-\udfff]")
# An escape that may decode to a surrogate; without one in the text there is nothing to look for.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any) -> str | None:
    """The first unpaired surrogate in any string (or key) of parsed JSON ``value``, if any."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            match = _SURROGATE.search(item)
            if match:
                return match.group()
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _check_unicode(value: Any, text: str, source: str, line: int | None) -> None:
    """A ``DataError`` for a ``\\udxxx`` escape without its other half: not a character, and no
    UTF-8 text (nor pandas, nor Arrow) can hold it."""
    if not _SURROGATE_ESCAPE.search(text):
        return
    bad = _lone_surrogate(value)
    if bad is None:
        return
    escape = f"\\u{ord(bad):04x}"
    if line is None:
        at = text.lower().find(escape)
        line = line_at(text, at) if at >= 0 else None
    raise DataError(source, f"expected text of valid characters, found the escape {escape}, half of a "
                    "UTF-16 surrogate pair without its other half", where=f"line {line}" if line else None)


def _column(text: str, pos: int) -> int:
    """The 1-based column of character ``pos`` on its line."""
    return pos - max(text.rfind("\n", 0, pos), text.rfind("\r", 0, pos))


def loads(text: str, source: str, line: int | None = None) -> Any:
    """``json.loads`` with every way of failing turned into a ``DataError`` naming the line.

    ``line`` is the file line ``text`` sits on when it is one line of a JSON
    Lines file; ``None`` when ``text`` is the whole file.
    """
    first = 1 if line is None else line
    where = None if line is None else f"line {line}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        found = text[err.pos : err.pos + 12]
        found = f"found {found!r} at column {_column(text, err.pos)}" if found else "found the end of the text"
        raise DataError(source, f"invalid JSON: {err.msg.lower().replace('expecting', 'expected')}, {found}",
                        where=f"line {first - 1 + line_at(text, err.pos)}") from None
    except RecursionError:
        raise DataError(source, "invalid JSON: expected values nested at most a few hundred levels "
                        "deep, found deeper nesting", where=where) from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise DataError(source, f"invalid JSON: expected values Python can read, found: {err}",
                        where=where) from None
    _check_unicode(value, text, source, line)
    return value


def check_objects(records: list[Any], source: str, where: list[str]) -> list[dict[str, Any]]:
    """``records`` unchanged when every one is a JSON object, else a ``DataError`` at the first that is not."""
    for record, place in zip(records, where):
        if not isinstance(record, dict):
            raise DataError(source, f"expected a JSON object {{\"column\": value, ...}}, found "
                            f"{kind(record)}", where=place)
    return records


def parse_json(text: str, source: str) -> list[dict[str, Any]] | dict[str, list[Any]]:
    """The records of a ``.json`` file: a list of objects, or a dict of equal-length column lists."""
    data = loads(text, source)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]  # a {"data": [...]}-style wrapper
        elif data and len(lists) == len(data):
            _check_columns(data, source)
            return data
    if not isinstance(data, list):
        raise DataError(source, "expected a JSON list of objects, a {\"data\": [objects]} wrapper or "
                        f"an object of equal-length column lists, found {kind(data)}"
                        + ("" if not isinstance(data, dict) else f" with keys {sorted(data)[:8]}")
                        + "; a file of one object per line needs the .jsonl suffix")
    return check_objects(data, source, [f"record {i + 1}" for i in range(len(data))])


def _check_columns(data: dict[str, list[Any]], source: str) -> None:
    lengths = {name: len(values) for name, values in data.items()}
    first = next(iter(lengths))
    for name, length in lengths.items():
        if length != lengths[first]:
            raise DataError(source, f"expected column lists of equal length, found {lengths[first]} "
                            f"values in {first!r} but {length} in {name!r}")


def parse_jsonl(text: str, source: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of a JSON Lines file and the file line of each; blank lines are skipped."""
    records, lines = [], []
    for lineno, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        records.append(loads(line, source, line=lineno))
        lines.append(lineno)
    return check_objects(records, source, [f"line {n}" for n in lines]), lines
