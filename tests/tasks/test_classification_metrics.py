"""Classification metrics against scikit-learn (when installed) and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterkit.tasks.metrics import classification_metrics, confusion_matrix, mean_cross_entropy


def test_hand_computed_example():
    # true:      a a a b b c
    # predicted: a a b b a a      (c is never predicted)
    refs, preds = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 0, 0]
    m = classification_metrics(refs, preds, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(3 / 6)
    # precision: a 2/4, b 1/2, c 0 (never predicted); recall: a 2/3, b 1/2, c 0
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_precision"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 4, 300)
    preds = np.where(rng.random(300) < 0.6, refs, rng.integers(0, 3, 300))  # label 3 rarely predicted
    m = classification_metrics(refs.tolist(), preds.tolist(), ["w", "x", "y", "z"])
    labels = [0, 1, 2, 3]
    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(refs, preds))
    assert m["macro_precision"] == pytest.approx(p.mean())
    assert m["macro_recall"] == pytest.approx(r.mean())
    assert m["macro_f1"] == pytest.approx(f.mean())
    assert [m["per_class"][k]["f1"] for k in "wxyz"] == pytest.approx(f.tolist())
    assert [m["per_class"][k]["support"] for k in "wxyz"] == s.tolist()
    assert m["confusion_matrix"] == sklearn_metrics.confusion_matrix(refs, preds, labels=labels).tolist()


def test_confusion_matrix_rows_are_true_labels():
    assert confusion_matrix([1, 1, 0], [0, 1, 0], 2).tolist() == [[1, 0], [1, 1]]


def test_mean_cross_entropy_matches_torch():
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0]])
    refs = [0, 2, 1]
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(refs)).item()
    assert mean_cross_entropy(logits, refs) == pytest.approx(expected)
