"""The one error type for bad input data: it names the file, the row and the problem."""

from __future__ import annotations

from adapterkit.errors import UserError


class DataError(UserError, ValueError):
    """Input data that cannot be used, with where and what went wrong.

    Attributes:
        source: the file (or object description) the data came from.
        where: the position, e.g. ``"line 7"``, ``"record 3"``, or ``None``.
        problem: what is wrong and, where possible, what to do.
    """

    def __init__(self, source: str, problem: str, where: str | None = None) -> None:
        self.source = source
        self.where = where
        self.problem = problem
        location = f"{source}, {where}" if where else source
        super().__init__(f"{location}: {problem}")
