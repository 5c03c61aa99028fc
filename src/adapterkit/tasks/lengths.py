"""Input lengths: each task's default ``max_length``, and what truncation at a length costs.

A task's default length is declared in one place, its ``default_max_length``:
classification and NER take the length that fits 99% of the training examples
(measured, up to the model's limit); question answering 384 tokens in windows
with a 128-token stride, as the SQuAD recipes use; causal LM the model's
context up to 1024; seq2seq the 99% lengths of sources and targets.
"""

from __future__ import annotations

import math
import random
import sys
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from transformers import PreTrainedModel, PreTrainedTokenizerBase

COVERAGE = 0.99  # share of training examples the default length fits whole
SAMPLE = 5000  # examples measured at most (a seeded sample of larger data)
ROUND_TO = 8  # lengths round up to a multiple of this
FALLBACK_LIMIT = 512  # for models that state no limit
WARN_SHARE = 0.05  # above this share of scored tokens lost, results are not comparable


def model_limit(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """The longest input the model takes: its position table (RoBERTa reserves two rows), else the
    tokenizer's ``model_max_length``, else ``FALLBACK_LIMIT``."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            offset = 2 if getattr(config, "model_type", None) in ("roberta", "xlm-roberta", "camembert") else 0
            return value - offset
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**6 else FALLBACK_LIMIT


def covering_length(lengths: Sequence[int], limit: int) -> int:
    """The smallest multiple of ``ROUND_TO`` at least as long as ``COVERAGE`` of ``lengths``, up to ``limit``."""
    if not lengths:
        return min(limit, 64)
    ordered = sorted(lengths)
    needed = ordered[min(len(ordered) - 1, math.ceil(COVERAGE * len(ordered)) - 1)]
    return max(ROUND_TO, min(limit, math.ceil(needed / ROUND_TO) * ROUND_TO))


def sample(items: Sequence, size: int = SAMPLE) -> list:
    """At most ``size`` of ``items``, a fixed seeded choice, in their order."""
    if len(items) <= size:
        return list(items)
    keep = sorted(random.Random(0).sample(range(len(items)), size))
    return [items[i] for i in keep]


@contextmanager
def quiet_length_warning(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Measure untruncated lengths without transformers' "sequence is longer than ..." warning."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    key = "sequence-length-is-longer-than-the-specified-maximum"
    before = flags.get(key) if isinstance(flags, dict) else None
    if isinstance(flags, dict):
        flags[key] = True
    try:
        yield
    finally:
        if isinstance(flags, dict):
            if before is None:
                flags.pop(key, None)
            else:
                flags[key] = before


@dataclass(frozen=True)
class Truncation:
    """What cutting inputs at ``max_length`` loses on one data set.

    Attributes:
        unit: what is counted ("tokens", "response tokens", "target tokens").
        examples: examples measured; ``cut``: how many lose tokens.
        tokens: tokens of that unit in all examples; ``lost``: how many are cut.
        max_length: the length; ``flag``: the option that changes it.
    """

    unit: str
    examples: int
    cut: int
    tokens: int
    lost: int
    max_length: int
    flag: str = "--max-length"

    @property
    def share(self) -> float:
        """The share of ``unit`` lost."""
        return self.lost / self.tokens if self.tokens else 0.0

    def message(self, source: str) -> str:
        """One line for the user."""
        return (f"truncation ({source}): {self.cut:,} of {self.examples:,} examples are longer than "
                f"{self.flag} {self.max_length}; {self.lost:,} of {self.tokens:,} {self.unit} "
                f"({self.share:.1%}) are cut. {self.flag} N changes it")


def report_truncation(reports: Sequence[Truncation], source: str, scored_units: Sequence[str] = (),
                      show: bool = True) -> None:
    """Print each report that cut anything; warn when a scored unit loses more than ``WARN_SHARE``.

    ``scored_units``: the units whose loss makes figures incomparable (a
    causal LM's response tokens, a translation's target tokens).
    """
    for report in reports:
        if report.cut == 0:
            continue
        if show:
            print(report.message(source), file=sys.stderr)
        if report.unit in scored_units and report.share > WARN_SHARE:
            warnings.warn(
                f"{report.share:.1%} of the {report.unit} of {source} are cut at {report.flag} "
                f"{report.max_length}: the loss and perplexity are computed on what is left, so they are "
                f"not comparable with runs at other lengths; raise {report.flag}", stacklevel=3)


def truncation_of(lengths: Sequence[int], kept: Sequence[int], unit: str, max_length: int,
                  flag: str = "--max-length") -> Truncation:
    """A ``Truncation`` from each example's full and kept count of ``unit``."""
    return Truncation(unit=unit, examples=len(lengths), cut=sum(k < n for n, k in zip(lengths, kept)),
                      tokens=sum(lengths), lost=sum(n - k for n, k in zip(lengths, kept)),
                      max_length=max_length, flag=flag)
