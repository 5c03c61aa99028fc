"""Overlapping windows over long tagged sentences, and merging them back.

A sentence whose sub-tokens do not fit in ``max_length`` is cut into
windows by the fast tokenizer (``return_overflowing_tokens=True``): each
window holds up to ``content`` sub-tokens of the sentence (``max_length``
minus the special tokens), and consecutive windows share ``stride`` of them.
A word belongs to every window that holds its *first* sub-token, since that
is the sub-token that carries its label and its logits.

When windows overlap, a word has several candidate predictions. The one kept
is the one from the window where the word has the most context: its
*margin* in a window is the number of sub-tokens between it and the nearer
cut edge of that window. An edge that is the sentence's own start or end
cuts nothing, so it does not count (a word in a window that holds the whole
sentence has the largest margin possible). Ties go to the earlier window.
Every word whose first sub-token exists therefore gets exactly one
prediction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from transformers import BatchEncoding

from adapterkit.errors import UsageError


class Window(NamedTuple):
    """The words one window labels: the first sub-tokens that lie inside it.

    Attributes:
        example: index of the sentence the window was cut from.
        positions: index, in the window's ``input_ids``, of each word's first sub-token.
        words: the word index (into the sentence's tokens) at each of ``positions``.
        margins: each word's context margin in this window (see the module docstring).
    """

    example: int
    positions: list[int]
    words: list[int]
    margins: list[int]


def window_stride(content: int, stride: int | None) -> int:
    """Sub-tokens shared by consecutive windows of ``content`` sub-tokens each.

    ``None`` means half a window. Any stride is capped at ``content - 1`` so
    that each window starts at least one sub-token after the previous one
    (the tokenizer refuses anything larger).
    """
    if content < 1:
        raise UsageError("max_length leaves no room for a single sub-token next to the special tokens")
    wanted = content // 2 if stride is None else stride
    if wanted < 0:
        raise UsageError(f"the window stride must be 0 or more, not {stride}")
    return min(wanted, content - 1)


def _margin(token: int, start: int, end: int, total: int) -> int:
    """Context margin of the sub-token at ``token`` in the window ``[start, end)`` of a sentence of ``total``.

    An edge at the sentence's own start or end counts as ``total`` away,
    which is more than any real cut edge can be.
    """
    left = token - start if start > 0 else total
    right = end - 1 - token if end < total else total
    return min(left, right)


def word_windows(encoded: BatchEncoding, stride: int) -> list[Window]:
    """The labelled words of every window of ``encoded``.

    ``encoded`` is the output of a fast tokenizer called on pre-split words
    with ``return_overflowing_tokens=True``, right-side truncation and this
    ``stride``: the windows of each sentence come in order and each starts
    ``stride`` sub-tokens before the previous one ended.
    """
    samples = list(encoded["overflow_to_sample_mapping"])
    # Per window: (word id of each content sub-token, the window's position of each).
    content: list[tuple[list[int], list[int]]] = []
    for w in range(len(samples)):
        word_ids = encoded.word_ids(w)
        positions = [p for p, word in enumerate(word_ids) if word is not None]
        content.append(([word_ids[p] for p in positions], positions))
    # Where each window's content starts in its sentence's sub-tokens, and each sentence's length.
    starts: list[int] = []
    totals: dict[int, int] = {}
    for w, sample in enumerate(samples):
        if w > 0 and samples[w - 1] == sample:
            starts.append(starts[-1] + len(content[w - 1][0]) - stride)
        else:
            starts.append(0)
        totals[sample] = starts[-1] + len(content[w][0])
    # A word's first sub-token is the first sentence position holding the word.
    first: dict[tuple[int, int], int] = {}
    for w, sample in enumerate(samples):
        for offset, word in enumerate(content[w][0]):
            first.setdefault((sample, word), starts[w] + offset)
    windows = []
    for w, sample in enumerate(samples):
        word_ids, positions = content[w]
        start, end, total = starts[w], starts[w] + len(word_ids), totals[sample]
        window = Window(int(sample), [], [], [])
        for offset, (word, position) in enumerate(zip(word_ids, positions)):
            token = start + offset
            if first[(sample, word)] == token:
                window.positions.append(position)
                window.words.append(word)
                window.margins.append(_margin(token, start, end, total))
        windows.append(window)
    return windows


def merge_windows(
    windows: Iterable[tuple[int, Sequence[int], Sequence[int], np.ndarray]], num_examples: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One set of logits per word, from the window where the word has the largest margin.

    Args:
        windows: ``(example, words, margins, logits)`` per window, in window
            order; ``words`` and ``margins`` have one entry per row of
            ``logits`` (``(words, num_labels)``).
        num_examples: how many sentences there are.

    Returns:
        Per sentence, ``(words, logits)``: the word indices that got a
        prediction, ascending, ``(n,)``, and their logits, ``(n, num_labels)``.
        A sentence no window labelled gets ``(0,)`` and ``(0, 0)`` arrays.
    """
    best: list[dict[int, tuple[int, np.ndarray]]] = [{} for _ in range(num_examples)]
    for example, words, margins, logits in windows:
        chosen = best[example]
        for word, margin, row in zip(words, margins, logits):
            word, margin = int(word), int(margin)
            if word not in chosen or margin > chosen[word][0]:  # ties keep the earlier window
                chosen[word] = (margin, row)
    merged = []
    for chosen in best:
        order = sorted(chosen)
        if order:
            merged.append((np.asarray(order, dtype=np.int64), np.stack([chosen[w][1] for w in order])))
        else:
            merged.append((np.zeros(0, dtype=np.int64), np.zeros((0, 0))))
    return merged
