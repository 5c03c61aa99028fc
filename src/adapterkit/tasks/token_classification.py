"""Token classification (named entity recognition) as a ``Task``.

Words are split into sub-tokens by the fast tokenizer; ``word_ids()`` says
which word each sub-token came from. The first sub-token of a word carries the
word's label and the rest get -100, so the loss sees each word once. At
prediction time the logits at those first sub-tokens are the word's logits;
words cut off by ``max_length`` (or that tokenize to nothing) are tagged ``O``.
Entities are read from the predicted tags with the CoNLL semantics of
``adapterkit.data.tagging.entity_spans`` and scored at the entity level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.tagging import convert_tags, entity_spans, labels_scheme, split_tag
from adapterkit.data.token_classification import token_classification_from_texts
from adapterkit.errors import UsageError, WrongTypeError
from adapterkit.tasks.base import Feature, Task, pad_features
from adapterkit.tasks.entity_metrics import entity_metrics
from adapterkit.tasks.metrics import mean_cross_entropy
from adapterkit.tasks.registry import register_task


class Entity(NamedTuple):
    """A predicted entity: its type, character span ``text[start:end]``, and mean word probability."""

    type: str
    start: int
    end: int
    text: str
    score: float


class TagPrediction(NamedTuple):
    """The predicted tag of every word of an example and the entities they spell."""

    tags: list[str]
    entities: list[Entity]


class WordLogits(NamedTuple):
    """Raw output for one feature: the words that reached the model and their logits."""

    words: np.ndarray  # (n,) word indices into the example's tokens
    logits: np.ndarray  # (n, num_labels)


def _model_inputs(batch: dict[str, torch.Tensor], labels: bool = True) -> dict[str, torch.Tensor]:
    """The batch without bookkeeping keys (and without ``labels`` unless asked)."""
    return {k: v for k, v in batch.items() if not k.startswith("_") and (labels or k != "labels")}


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def word_offsets(example: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The example's text and word character spans; words read from a file are joined by spaces."""
    if example.get("text") is not None and example.get("offsets") is not None:
        return example["text"], [tuple(o) for o in example["offsets"]]
    offsets, position = [], 0
    for token in example["tokens"]:
        offsets.append((position, position + len(token)))
        position += len(token) + 1
    return " ".join(example["tokens"]), offsets


@register_task
class TokenClassificationTask(Task):
    """One tag per word (IOB2 or BIOES), scored by entity-level F1."""

    name = "token-classification"
    default_metric = "f1"

    def encode(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Feature]:
        if not getattr(tokenizer, "is_fast", False):
            raise WrongTypeError(f"token classification needs a fast tokenizer (for word_ids()); "
                            f"got {type(tokenizer).__name__}")
        index = {label: i for i, label in enumerate(data.labels or [])}
        words = [list(e["tokens"]) for e in data.examples]
        # Truncate only; padding happens per batch in ``collate``.
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        features: list[Feature] = []
        for i, example in enumerate(data.examples):
            feature: Feature = {key: encoded[key][i] for key in encoded.keys()}
            positions, kept, previous = [], [], None
            for position, word in enumerate(encoded.word_ids(i)):
                if word is not None and word != previous:  # first sub-token of a word
                    positions.append(position)
                    kept.append(word)
                previous = word
            if example.get("tags") is not None:
                labels = [-100] * len(feature["input_ids"])
                for position, word in zip(positions, kept):
                    labels[position] = index[example["tags"][word]]
                feature["labels"] = labels
            feature.update({"_example": i, "_positions": positions, "_words": kept})
            features.append(feature)
        return features

    def collate(self, features: Sequence[Feature], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
        batch = pad_features(features, tokenizer)
        # Bookkeeping for ``infer``: where each word's first sub-token sits, -1 past the end.
        batch["_positions"] = _pad([f["_positions"] for f in features], -1)  # (batch, words)
        batch["_words"] = _pad([f["_words"] for f in features], -1)  # (batch, words)
        return batch

    def loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise UsageError(f"{self.name}: the batch has no labels, so there is no loss to train on")
        if not bool((batch["labels"] != -100).any()):
            # Every word was truncated away: a zero loss that still has a graph, not NaN.
            return model(**_model_inputs(batch, labels=False)).logits.sum() * 0.0
        return model(**_model_inputs(batch)).loss

    def relabel(self, data: TaskData, labels: Sequence[str] | None) -> TaskData:
        if labels is None or data.labels is None or list(data.labels) == list(labels):
            return data
        scheme, known = labels_scheme(labels), set(labels)
        examples = []
        for example in data.examples:
            if example.get("tags") is None:
                examples.append(example)
                continue
            tags = convert_tags(example["tags"], scheme)
            unknown = [t for t in tags if t not in known]
            if unknown:
                raise DataError(data.source, f"entity type {split_tag(unknown[0])[1]!r} was never seen in "
                                f"training; the known tags are {list(labels)}", where=example.get("where"))
            examples.append({**example, "tags": tags})
        return TaskData(data.task, examples, list(labels), data.source, dict(data.columns))

    def from_texts(self, texts: Sequence[str], labels: Sequence[str] | None) -> TaskData:
        """Raw strings split into words with character offsets (``split_words``)."""
        return token_classification_from_texts(texts, labels)

    def infer(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> list[WordLogits]:
        logits = model(**_model_inputs(batch, labels=False)).logits.detach().float()  # (batch, seq, num_labels)
        outputs = []
        for row, positions in enumerate(batch["_positions"]):
            keep = positions >= 0
            outputs.append(WordLogits(batch["_words"][row][keep].numpy(),
                                      logits[row, positions[keep]].cpu().numpy()))  # (words, num_labels)
        return outputs

    def decode(self, data: TaskData, features: Sequence[Feature], outputs: Sequence[WordLogits]) -> list[TagPrediction]:
        if not data.labels:
            raise UsageError(f"{data.source}: decoding tags needs the label vocabulary (data.labels)")
        labels = data.labels
        predictions = []
        for feature, output in zip(features, outputs):
            example = data.examples[feature["_example"]]
            tags = ["O"] * len(example["tokens"])
            confidence = np.zeros(len(tags))
            if len(output.words):
                shifted = np.exp(output.logits - output.logits.max(axis=-1, keepdims=True))
                probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
                for word, best, p in zip(output.words, probabilities.argmax(-1), probabilities.max(-1)):
                    tags[int(word)], confidence[int(word)] = labels[int(best)], float(p)
            text, offsets = word_offsets(example)
            entities = []
            for span in entity_spans(tags):
                start, end = offsets[span.start][0], offsets[span.end - 1][1]
                score = float(confidence[span.start:span.end].mean())
                entities.append(Entity(span.type, start, end, text[start:end], score))
            predictions.append(TagPrediction(tags, entities))
        return predictions

    def score(self, data: TaskData, predictions: Sequence[TagPrediction],
              outputs: Sequence[WordLogits]) -> dict[str, Any]:
        references = [e.get("tags") for e in data.examples]
        if any(r is None for r in references):
            raise UsageError(f"{data.source}: cannot score untagged examples")
        metrics = entity_metrics(references, [p.tags for p in predictions])
        # Word-level cross-entropy; features and examples correspond one to one, in order.
        index = {label: i for i, label in enumerate(data.labels or [])}
        gold = [index[references[i][int(w)]] for i, out in enumerate(outputs) for w in out.words]
        if gold:
            metrics["loss"] = mean_cross_entropy(np.concatenate([o.logits for o in outputs]), gold)
        metrics["count"] = len(data.examples)
        return metrics

    def format(self, prediction: TagPrediction) -> str:
        if not prediction.entities:
            return "(no entities)"
        return "; ".join(f"{e.type} {e.text!r} {e.start}:{e.end} ({e.score:.2f})" for e in prediction.entities)

    def to_json(self, prediction: TagPrediction) -> dict[str, Any]:
        return {"entities": [e._asdict() for e in prediction.entities], "tags": list(prediction.tags)}
