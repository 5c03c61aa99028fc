"""SQuAD v1.1 exact match and F1, as the official evaluation script computes them.

Answers are normalised before comparison: lower-cased, punctuation removed,
the articles "a", "an" and "the" removed, whitespace collapsed. Each
prediction is scored against every reference answer and keeps the best score;
the data set score is the mean over questions, times 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bags of normalised tokens; 0.0 when they share none."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent: best over each question's references, averaged.

    Raises:
        ValueError: lengths differ, or a question has no reference answer.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    em = f1 = 0.0
    for i, (prediction, answers) in enumerate(zip(predictions, references)):
        if not answers:
            raise ValueError(f"question {i} has no reference answer to score against")
        em += max(exact_match(prediction, a) for a in answers)
        f1 += max(token_f1(prediction, a) for a in answers)
    count = max(len(predictions), 1)
    return {"exact_match": 100.0 * em / count, "f1": 100.0 * f1 / count}
