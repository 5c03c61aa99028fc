"""The one error type for bad input data: it names the file, the row and the problem."""

from __future__ import annotations

import re

from adapterkit.errors import UserError

_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


class DataError(UserError, ValueError):
    """Input data that cannot be used, with where and what went wrong.

    The message is one paragraph, ``"<source>, <where>: <problem>"``: line
    breaks in ``problem`` (such as those in a parser's own message) become
    spaces, so it prints as one line.

    Attributes:
        source: the file (or object description) the data came from.
        where: the position, e.g. ``"line 7"``, ``"record 3"``, or ``None``.
        problem: what is wrong and, where possible, what to do.
    """

    def __init__(self, source: str, problem: str, where: str | None = None) -> None:
        self.source = source
        self.where = where
        self.problem = _LINE_BREAKS.sub(" ", problem.strip())
        location = f"{source}, {where}" if where else source
        super().__init__(f"{location}: {self.problem}")
