"""What the data-driven analyses need to know about a task, one small table per task.

- ``metric``: the task metric the ablation re-evaluates, and how it is built
  from per-example statistics, so that bootstrap resamples of examples give
  its confidence interval exactly (accuracy: the mean of right/wrong; entity
  F1: pooled counts of correct, predicted and reference entities; SQuAD F1:
  the mean of per-question F1).
- ``units``: what a confusion matrix of base against adapted predictions
  counts (labels of examples, tags of words, right/wrong answers).
- ``change``: how much one example's prediction moved, for "most changed".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from adapterkit.data.examples import TaskData
from adapterkit.data.tagging import entity_spans
from adapterkit.errors import UnsupportedError
from adapterkit.tasks.classification import softmax
from adapterkit.tasks.qa_metrics import exact_match, token_f1


@dataclass(frozen=True)
class TaskView:
    """How the analyses read one task's predictions (see the module docstring)."""

    metric: str
    stats: Callable[[TaskData, Sequence[Any]], np.ndarray]  # (examples, k)
    reduce: Callable[[np.ndarray], np.ndarray]  # (..., examples, k) -> (...) metric values
    units: Callable[[TaskData, Sequence[Any]], list[str]]
    change: Callable[[Any, Any, Any, Any], float]  # (base prediction, adapted, base output, adapted output)
    text: Callable[[dict[str, Any]], str]
    show: Callable[[Any], str]
    key: Callable[[Any], Any]  # what must differ for a prediction to count as changed
    points: float  # metric units per percentage point (100 for a 0-1 metric, 1 for one in percent)


def _probabilities(logits: Any) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64))


def _classification() -> TaskView:
    def stats(data: TaskData, predictions: Sequence[Any]) -> np.ndarray:
        labels = data.labels or []
        return np.array([[float(labels[e["label"]] == p.label)] for e, p in zip(data.examples, predictions)])

    def text(example: dict[str, Any]) -> str:
        pair = example.get("text_pair")
        return example["text"] + (f" [SEP] {pair}" if pair else "")

    return TaskView(
        metric="accuracy",
        stats=stats,
        reduce=lambda s: s[..., 0].mean(axis=-1),
        units=lambda data, predictions: [p.label for p in predictions],
        # total variation between the two predicted distributions
        change=lambda bp, ap, bo, ao: float(0.5 * np.abs(_probabilities(bo) - _probabilities(ao)).sum()),
        text=text,
        show=lambda p: f"{p.label} ({p.score:.2f})",
        key=lambda p: p.label,
        points=100.0,
    )


def _token_classification() -> TaskView:
    def stats(data: TaskData, predictions: Sequence[Any]) -> np.ndarray:
        rows = []
        for example, prediction in zip(data.examples, predictions):
            gold, guess = set(entity_spans(example["tags"])), set(entity_spans(prediction.tags))
            rows.append([len(gold & guess), len(guess), len(gold)])
        return np.array(rows, dtype=np.float64)

    def reduce(s: np.ndarray) -> np.ndarray:
        totals = s.sum(axis=-2)  # (..., 3)
        denominator = totals[..., 1] + totals[..., 2]
        return np.where(denominator > 0, 2 * totals[..., 0] / np.maximum(denominator, 1e-300), 0.0)

    def change(bp: Any, ap: Any, bo: Any, ao: Any) -> float:
        return float(np.mean([a != b for a, b in zip(bp.tags, ap.tags)])) if bp.tags else 0.0

    return TaskView(
        metric="f1",
        stats=stats,
        reduce=reduce,
        units=lambda data, predictions: [t for p in predictions for t in p.tags],
        change=change,
        text=lambda e: e.get("text") or " ".join(e["tokens"]),
        show=lambda p: " ".join(f"[{x.text}]{x.type}" for x in p.entities) or "(no entities)",
        key=lambda p: tuple(p.tags),
        points=100.0,
    )


def _question_answering() -> TaskView:
    def answers(example: dict[str, Any]) -> list[str]:
        return [a["text"] for a in example["answers"]]

    def stats(data: TaskData, predictions: Sequence[Any]) -> np.ndarray:
        return np.array([[100.0 * max(token_f1(p.answer, a) for a in answers(e))]
                         for e, p in zip(data.examples, predictions)])

    def units(data: TaskData, predictions: Sequence[Any]) -> list[str]:
        return ["right" if max(exact_match(p.answer, a) for a in answers(e)) else "wrong"
                for e, p in zip(data.examples, predictions)]

    return TaskView(
        metric="f1",
        stats=stats,
        reduce=lambda s: s[..., 0].mean(axis=-1),
        units=units,
        change=lambda bp, ap, bo, ao: 1.0 - token_f1(bp.answer, ap.answer),
        text=lambda e: e["question"],
        show=lambda p: repr(p.answer),
        key=lambda p: p.answer,
        points=1.0,
    )


VIEWS: dict[str, Callable[[], TaskView]] = {
    "classification": _classification,
    "token-classification": _token_classification,
    "question-answering": _question_answering,
}


def task_view(task: str) -> TaskView:
    """The view of ``task``; tasks without one cannot be analysed with data."""
    if task not in VIEWS:
        raise UnsupportedError(f"analysis with --data supports the tasks {sorted(VIEWS)}; this adapter's task is "
                               f"{task!r} (its weights can still be analysed without --data)")
    return VIEWS[task]()
