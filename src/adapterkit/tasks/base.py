"""The ``Task`` interface: everything the training and evaluation loops need
to know about a task, so that the loops themselves never branch on it.

A task turns examples into *features* (one or more per example: a long QA
context becomes several windows), pads features into a batch, computes the
training loss, turns model outputs back into one prediction per example,
scores predictions against the references, and prints a prediction.

Features are plain dicts. Keys that start with ``_`` are bookkeeping (which
example a feature came from, offsets...) and never reach the model; every
other key is a model input: lists are padded to the longest in the batch,
scalars are stacked.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.examples import TaskData
from adapterkit.errors import UnsupportedError, UsageError
from adapterkit.tasks import lengths

Feature = dict[str, Any]

# Padding value of each padded input; "labels" uses -100, the index that
# Hugging Face losses ignore. Inputs not listed pad with 0.
PAD_VALUES: dict[str, int | None] = {
    "input_ids": None,  # None: the tokenizer's pad token id
    "attention_mask": 0,
    "token_type_ids": 0,
    "labels": -100,
}

# Metrics where lower is better; every other metric is "higher is better".
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


def pad_features(
    features: Sequence[Feature], tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """Pad a list of features into a batch of tensors (dynamic padding).

    Lists are padded to the longest in *this* batch, on the tokenizer's
    padding side; ``_``-prefixed keys are dropped.
    """
    keys = [k for k in features[0] if not k.startswith("_")]
    left = tokenizer.padding_side == "left"
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [f[key] for f in features]
        if not isinstance(values[0], (list, tuple)):
            batch[key] = torch.tensor(values)
            continue
        pad = PAD_VALUES.get(key, 0)
        pad = tokenizer.pad_token_id if pad is None else pad
        width = max(len(v) for v in values)
        rows = [
            ([pad] * (width - len(v)) + list(v)) if left else (list(v) + [pad] * (width - len(v)))
            for v in values
        ]
        batch[key] = torch.tensor(rows)
    return batch


class Task(ABC):
    """How one kind of problem meets a model. Subclasses register in ``TASKS``.

    Class attributes:
        name: the task name used on the command line and in adapter metadata.
        default_metric: the metric that picks the best checkpoint by default.
        scored_units: what truncation must not cut for the metrics to stay
            comparable (a causal LM's response tokens); see ``tasks/lengths.py``.
    """

    name: ClassVar[str]
    default_metric: ClassVar[str]
    scored_units: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def encode(
        self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> list[Feature]:
        """Tokenize examples into features; each has ``_example`` (its example's index)."""

    def collate(
        self, features: Sequence[Feature], tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, torch.Tensor]:
        """Pad features into one batch of model inputs."""
        return pad_features(features, tokenizer)

    def loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar training loss of a batch; Hugging Face heads compute it from the labels."""
        loss = model(**batch).loss
        if loss is None:
            raise UsageError(f"{self.name}: the batch has no labels, so there is no loss to train on")
        return loss

    def narrowed(self, model: PreTrainedModel) -> contextlib.AbstractContextManager:
        """A context in which ``model`` computes only what this task's outputs read.

        Tasks whose outputs read every position (the default) change nothing;
        classification cuts the last block to the position its head reads
        (``tasks/head_reads.py``).
        """
        return contextlib.nullcontext()

    def relabel(self, data: TaskData, labels: Sequence[str] | None) -> TaskData:
        """``data`` with its label indices expressed in the vocabulary ``labels``.

        Evaluation data read on its own may order its labels differently from
        the training data; tasks with labels override this to re-index, and
        raise a ``DataError`` for a label the model never saw.
        """
        if labels is not None and data.labels is not None and list(data.labels) != list(labels):
            raise UsageError(f"{data.source}: labels {data.labels} differ from the model's {list(labels)}")
        return data

    @abstractmethod
    def infer(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> list[Any]:
        """Run the model on a batch without labels; one raw output per feature."""

    @abstractmethod
    def decode(self, data: TaskData, features: Sequence[Feature], outputs: Sequence[Any]) -> list[Any]:
        """Turn raw outputs (aligned with ``features``) into one prediction per example."""

    @abstractmethod
    def score(
        self, data: TaskData, predictions: Sequence[Any], outputs: Sequence[Any]
    ) -> dict[str, Any]:
        """Metrics of the predictions against the references in ``data``.

        ``outputs`` are the raw per-feature outputs, for metrics that need more
        than the decoded predictions (e.g. the evaluation loss).
        """

    @abstractmethod
    def format(self, prediction: Any) -> str:
        """One human-readable line for a prediction."""

    @abstractmethod
    def to_json(self, prediction: Any) -> dict[str, Any]:
        """A JSON-serialisable form of a prediction."""

    def pack(self, features: Sequence[Feature], max_length: int) -> list[Feature]:
        """Training features packed several to a row of at most ``max_length`` tokens.

        Only tasks whose examples can share a row without seeing each other
        (``causal-lm``) support this.
        """
        raise UsageError(f"task {self.name!r} does not support packing; train it with packing off")

    def from_texts(self, texts: Sequence[str], labels: Sequence[str] | None) -> TaskData:
        """Unlabelled examples from raw input strings (what ``predict`` receives)."""
        raise UnsupportedError(f"task {self.name!r} cannot build examples from plain texts")

    # --- lengths -------------------------------------------------------------
    def input_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Each example's model input in tokens, untruncated (special tokens included)."""
        raise UnsupportedError(f"task {self.name!r} does not measure its inputs")

    def default_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase,
                        model: PreTrainedModel | None) -> dict[str, int]:
        """The length settings a run uses when it sets none (``{"max_length": ...}``; seq2seq
        adds ``max_target_length``). By default: the length that fits 99% of ``data``'s
        examples (a seeded sample of large data), up to the model's limit."""
        sample = TaskData(data.task, lengths.sample(data.examples), data.labels, data.source, dict(data.columns))
        limit = lengths.model_limit(model, tokenizer)
        return {"max_length": lengths.covering_length(self.input_lengths(sample, tokenizer), limit)}

    def truncation(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
                   **options: Any) -> list[lengths.Truncation]:
        """What encoding ``data`` at ``max_length`` cuts; tasks that window their inputs cut nothing."""
        full = self.input_lengths(data, tokenizer)
        return [lengths.truncation_of(full, [min(n, max_length) for n in full], "tokens", max_length)]

    def encode_options(self, config: Any) -> dict[str, Any]:
        """Extra ``encode`` keywords this task takes from a ``TrainConfig`` (seq2seq: the target length)."""
        return {}

    @staticmethod
    def length(feature: Feature) -> int:
        """The feature's length in tokens, used to group batches by length."""
        return len(feature["input_ids"])
