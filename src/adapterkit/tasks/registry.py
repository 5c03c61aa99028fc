"""The task registry: task name -> ``Task`` class. Tasks add themselves with ``@register_task``."""

from __future__ import annotations

from typing import Any

from adapterkit.errors import UsageError
from adapterkit.tasks.base import Task

TASKS: dict[str, type[Task]] = {}

# When a model did not come from ``load_model``, its head class says the task.
HEAD_SUFFIX_TASKS: dict[str, str] = {
    "ForSequenceClassification": "classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForCausalLM": "causal-lm",
    "ForConditionalGeneration": "seq2seq",
}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator that makes a task reachable by its ``name``."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    """A fresh instance of the task called ``name``."""
    try:
        return TASKS[name]()
    except KeyError:
        raise UsageError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


def task_name_for_model(model: Any) -> str:
    """The task a model was loaded for (``load_model`` records it), else guessed from its head class."""
    source = getattr(model, "adapterkit_source", None) or {}
    if source.get("task"):
        return source["task"]
    cls_name = type(model).__name__
    for suffix, task in HEAD_SUFFIX_TASKS.items():
        if cls_name.endswith(suffix):
            return task
    raise UsageError(f"cannot tell the task of a {cls_name}; pass task=... explicitly")
