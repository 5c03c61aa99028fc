"""Sequence classification (single texts or text pairs) as a ``Task``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.classification import classification_from_texts
from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.errors import UsageError
from adapterkit.tasks import lengths
from adapterkit.tasks.base import Feature, Task
from adapterkit.tasks.head_reads import first_position_only
from adapterkit.tasks.metrics import classification_metrics, mean_cross_entropy
from adapterkit.tasks.registry import register_task


class LabelPrediction(NamedTuple):
    """A predicted label and its softmax probability."""

    label: str
    score: float


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the maximum for stability."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@register_task
class ClassificationTask(Task):
    """One label per text (or text pair) from a fixed label set."""

    name = "classification"
    default_metric = "accuracy"

    @staticmethod
    def _texts(data: TaskData) -> tuple[list[str], list[str] | None]:
        texts = [e["text"] for e in data.examples]
        pairs = [e["text_pair"] for e in data.examples] if data.examples and "text_pair" in data.examples[0] else None
        return texts, pairs

    def input_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        if not data.examples:
            return []
        with lengths.quiet_length_warning(tokenizer):
            return [len(ids) for ids in tokenizer(*self._texts(data), truncation=False)["input_ids"]]

    def encode(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Feature]:
        texts, pairs = self._texts(data)
        # Truncate only; padding happens per batch in ``collate``.
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        features: list[Feature] = []
        for i, example in enumerate(data.examples):
            feature: Feature = {key: encoded[key][i] for key in encoded.keys()}
            if example.get("label") is not None:
                feature["labels"] = example["label"]
            feature["_example"] = i
            features.append(feature)
        return features

    def relabel(self, data: TaskData, labels: Sequence[str] | None) -> TaskData:
        if labels is None or data.labels is None or list(data.labels) == list(labels):
            return data
        index = {label: i for i, label in enumerate(labels)}
        examples = []
        for example in data.examples:
            if example.get("label") is None:
                examples.append(example)
                continue
            name = data.labels[example["label"]]
            if name not in index:
                raise DataError(data.source, f"label {name!r} was never seen in training; "
                                f"the known labels are {list(labels)}", where=example.get("where"))
            examples.append({**example, "label": index[name]})
        return TaskData(data.task, examples, list(labels), data.source, dict(data.columns))

    def from_texts(self, texts: Sequence[str], labels: Sequence[str] | None) -> TaskData:
        return classification_from_texts(texts, labels)

    def narrowed(self, model: PreTrainedModel) -> contextlib.AbstractContextManager:
        return first_position_only(model)

    def infer(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()  # (batch, num_labels)
        return list(logits.cpu().numpy())

    def decode(self, data: TaskData, features: Sequence[Feature], outputs: Sequence[Any]) -> list[LabelPrediction]:
        labels = data.labels or []
        predictions = []
        for logits in outputs:
            probabilities = softmax(np.asarray(logits, dtype=np.float64))
            best = int(probabilities.argmax())
            name = labels[best] if best < len(labels) else str(best)
            predictions.append(LabelPrediction(name, float(probabilities[best])))
        return predictions

    def score(self, data: TaskData, predictions: Sequence[LabelPrediction], outputs: Sequence[Any]) -> dict[str, Any]:
        labels = data.labels or []
        references = [e["label"] for e in data.examples]
        if any(r is None for r in references):
            raise UsageError(f"{data.source}: cannot score unlabelled examples")
        index = {label: i for i, label in enumerate(labels)}
        predicted = [index[p.label] for p in predictions]
        metrics = classification_metrics(references, predicted, labels)
        metrics["loss"] = mean_cross_entropy(np.stack(outputs), references)
        return metrics

    def format(self, prediction: LabelPrediction) -> str:
        return f"{prediction.label}\t{prediction.score:.4f}"

    def to_json(self, prediction: LabelPrediction) -> dict[str, Any]:
        return {"label": prediction.label, "score": prediction.score}
