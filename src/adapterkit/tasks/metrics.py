"""Classification metrics in numpy: accuracy, precision/recall/F1, confusion matrix.

Conventions follow scikit-learn's: a class never predicted has precision 0,
a class absent from the references has recall 0, and F1 is 0 when precision
and recall are both 0. Macro averages are unweighted means over all labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(references: Sequence[int], predictions: Sequence[int], num_labels: int) -> np.ndarray:
    """``(num_labels, num_labels)`` counts; row = true label, column = predicted label."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(references, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def classification_metrics(
    references: Sequence[int], predictions: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1, and the confusion matrix."""
    matrix = confusion_matrix(references, predictions, len(labels))
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)  # per column
    actual = matrix.sum(axis=1).astype(np.float64)  # per row
    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, actual)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    total = matrix.sum()
    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, actual)
        },
        "confusion_matrix": matrix.tolist(),
        "labels": list(labels),
        "count": int(total),
    }


def mean_cross_entropy(logits: np.ndarray, references: Sequence[int]) -> float:
    """Mean negative log-likelihood of the references under softmax(logits)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(logits)), np.asarray(references)].mean())
