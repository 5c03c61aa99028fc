"""Entity-level precision, recall and F1 with the CoNLL (``conlleval``) semantics.

An entity is a (type, first word, last word) triple read from a tag sequence
by ``adapterkit.data.tagging.entity_spans``; a predicted entity counts only
when the same triple is in the reference. Counts are pooled over all sentences
(micro average), as ``conlleval`` and ``seqeval`` do. A type that is never
predicted has precision 0, one absent from the references has recall 0, and
F1 is 0 when precision and recall are both 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from adapterkit.data.tagging import entity_spans


def _prf(correct: int, predicted: int, actual: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_metrics(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Overall and per-type entity precision/recall/F1, and word accuracy.

    Args:
        references: one gold tag sequence per sentence.
        predictions: one predicted tag sequence per sentence, each as long as its reference.

    Returns:
        ``{"precision", "recall", "f1", "accuracy", "entities", "predicted_entities",
        "per_class": {entity type: {"precision", "recall", "f1", "support"}}}``
        (``per_class`` as in classification, so reports show the same table), where
        ``accuracy`` is the share of words whose tag is exactly right and
        ``support`` the number of reference entities of the type.
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference sentences but {len(predictions)} predicted")
    correct: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    actual: Counter[str] = Counter()
    right_words = total_words = 0
    for i, (gold, guess) in enumerate(zip(references, predictions)):
        if len(gold) != len(guess):
            raise ValueError(f"sentence {i + 1}: {len(gold)} reference tags but {len(guess)} predicted")
        gold_spans = set(entity_spans(gold))
        guess_spans = set(entity_spans(guess))
        actual.update(span.type for span in gold_spans)
        predicted.update(span.type for span in guess_spans)
        correct.update(span.type for span in gold_spans & guess_spans)
        right_words += sum(g == p for g, p in zip(gold, guess))
        total_words += len(gold)
    precision, recall, f1 = _prf(sum(correct.values()), sum(predicted.values()), sum(actual.values()))
    per_class = {}
    for type_ in sorted(set(actual) | set(predicted)):
        p, r, f = _prf(correct[type_], predicted[type_], actual[type_])
        per_class[type_] = {"precision": p, "recall": r, "f1": f, "support": actual[type_]}
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": right_words / total_words if total_words else 0.0,
        "entities": sum(actual.values()),
        "predicted_entities": sum(predicted.values()),
        "per_class": per_class,
    }
