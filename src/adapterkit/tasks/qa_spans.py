"""Answer spans from start/end logits: the n-best search of extractive QA.

A span is a pair of token positions ``start <= end`` inside the context (a
token whose character offsets are known) and at most ``max_answer_length``
tokens long. Its score is ``start_logit + end_logit``, the log of the product
of the start and end probabilities up to a per-window constant; the search
looks at the ``n_best`` highest start and end logits of a window, as the
reference SQuAD scripts do, and the best span over all windows of a question
wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

Offsets = Sequence[tuple[int, int] | None]  # per token; None outside the context


class Span(NamedTuple):
    """A candidate answer in one window: token positions and character offsets."""

    score: float  # start_logit + end_logit
    start_token: int
    end_token: int
    start_char: int
    end_char: int  # exclusive
    probability: float  # p(start) * p(end), softmax over the window's tokens


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: Offsets,
              max_answer_length: int = 30, n_best: int = 20) -> Span | None:
    """The highest-scoring valid span of one window, or ``None`` when there is none.

    Args:
        start_logits, end_logits: ``(seq,)`` logits of the window's real tokens.
        offsets: ``(seq,)`` character ``(start, end)`` of each context token,
            ``None`` for question, special and padding tokens.
        max_answer_length: longest answer in tokens.
        n_best: how many top start and top end positions to pair up.
    """
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    length = min(len(start_logits), len(offsets))
    starts = np.argsort(-start_logits[:length], kind="stable")[:n_best]
    ends = np.argsort(-end_logits[:length], kind="stable")[:n_best]
    best: tuple[float, int, int] | None = None
    for s in starts.tolist():
        if offsets[s] is None:
            continue
        for e in ends.tolist():
            if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, s, e)
    if best is None:
        return None
    score, s, e = best
    probability = float(_softmax(start_logits[:length])[s] * _softmax(end_logits[:length])[e])
    return Span(score, s, e, offsets[s][0], offsets[e][1], probability)  # type: ignore[index]


def best_span_over_windows(windows: Sequence[tuple[np.ndarray, np.ndarray, Offsets]],
                           max_answer_length: int = 30, n_best: int = 20) -> tuple[int, Span] | None:
    """``(window index, span)`` of the best span across the windows of one question."""
    best: tuple[int, Span] | None = None
    for w, (start_logits, end_logits, offsets) in enumerate(windows):
        span = best_span(start_logits, end_logits, offsets, max_answer_length, n_best)
        if span is not None and (best is None or span.score > best[1].score):
            best = (w, span)
    return best
