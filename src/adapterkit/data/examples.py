"""``TaskData``: the examples of one task, as every layer above ``data/`` sees them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskData:
    """Examples for one task, read from one source.

    Attributes:
        task: the task name, e.g. ``"classification"``.
        examples: one dict per example; the keys are the task's own (for
            classification ``text``, optional ``text_pair``, ``label`` as an
            index into ``labels`` or ``None`` when unlabelled, and ``where``,
            the position in the source used in error messages).
        labels: the label vocabulary, kept with the adapter; ``None`` for tasks
            without one.
        source: the file or object the examples came from.
        columns: the column names used, so a later read can reuse them.
    """

    task: str
    examples: list[dict[str, Any]]
    labels: list[str] | None = None
    source: str = "<memory>"
    columns: dict[str, str | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    def subset(self, indices: list[int], source: str | None = None) -> "TaskData":
        """A new ``TaskData`` with the examples at ``indices`` (same labels)."""
        return TaskData(
            task=self.task,
            examples=[self.examples[i] for i in indices],
            labels=self.labels,
            source=source or self.source,
            columns=dict(self.columns),
        )
