"""Token classification (named entity recognition) as a ``Task``.

Words are split into sub-tokens by the fast tokenizer; ``word_ids()`` says
which word each sub-token came from. The first sub-token of a word carries the
word's label and the rest get -100, so the loss sees each word once per
window. At prediction time the logits at those first sub-tokens are the
word's logits.

A sentence longer than ``max_length`` is not truncated: it becomes several
overlapping windows (``adapterkit.tasks.word_windows``), and each word takes
its logits from the window where it has the most context, so every word gets
exactly one prediction (only a word that tokenizes to nothing is tagged ``O``
unseen). Entities are read from the predicted tags with the CoNLL semantics
of ``adapterkit.data.tagging.entity_spans`` and scored at the entity level.
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
from adapterkit.tasks.word_windows import merge_windows, window_stride, word_windows


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
    """Raw output for one feature (one window): the words it labels and their logits.

    ``example`` and ``margins`` say which sentence the window belongs to and how
    much context each word has in it, so that windows can be merged without
    the features; ``infer`` fills them in (-1 and ``None``: not known).
    """

    words: np.ndarray  # (n,) word indices into the example's tokens
    logits: np.ndarray  # (n, num_labels)
    example: int = -1
    margins: np.ndarray | None = None  # (n,) context margin of each word in this window


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
    """One tag per word (IOB2 or BIOES), scored by entity-level F1.

    Args:
        stride: sub-tokens shared by consecutive windows of a sentence longer
            than ``max_length``; ``None`` (the default) is half a window's
            room for sub-tokens. Capped so that every window moves on by at
            least one sub-token.
    """

    name = "token-classification"
    default_metric = "f1"

    def __init__(self, stride: int | None = None) -> None:
        self.stride = stride

    @staticmethod
    def _sentences(data: TaskData) -> list[list[str]]:
        """Each example's words."""
        return [list(e["tokens"]) for e in data.examples]

    def input_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Each sentence's sub-tokens, special tokens included, before any windowing."""
        if not data.examples:
            return []
        encoded = tokenizer(self._sentences(data), is_split_into_words=True, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def truncation(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
                   **options: Any) -> list[Any]:
        """Nothing: long sentences become several windows, and every word is predicted."""
        return []

    def encode(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Feature]:
        """One feature per window; a sentence that fits in ``max_length`` is one window.

        Each feature has the model inputs, ``labels`` when the examples are
        tagged, and the bookkeeping ``_example`` (the sentence), ``_positions``
        / ``_words`` (where the first sub-token of each word it labels sits,
        and which word that is) and ``_margins`` (each word's context there).
        """
        if not getattr(tokenizer, "is_fast", False):
            raise WrongTypeError(f"token classification needs a fast tokenizer (for word_ids()); "
                            f"got {type(tokenizer).__name__}")
        if not data.examples:
            return []
        content = max_length - tokenizer.num_special_tokens_to_add(pair=False)
        if content < 1:
            raise UsageError(f"max_length={max_length} leaves no room for words next to the special tokens")
        stride = window_stride(content, self.stride)
        index = {label: i for i, label in enumerate(data.labels or [])}
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "right"  # ``word_windows`` reads the windows in sentence order
        try:
            # Windows only; padding happens per batch in ``collate``.
            encoded = tokenizer(self._sentences(data), is_split_into_words=True, truncation=True,
                                max_length=max_length, stride=stride, return_overflowing_tokens=True)
        finally:
            tokenizer.truncation_side = side
        features: list[Feature] = []
        for w, window in enumerate(word_windows(encoded, stride)):
            feature: Feature = {key: encoded[key][w] for key in ("input_ids", "token_type_ids", "attention_mask")
                                if key in encoded}
            tags = data.examples[window.example].get("tags")
            if tags is not None:
                labels = [-100] * len(feature["input_ids"])
                for position, word in zip(window.positions, window.words):
                    labels[position] = index[tags[word]]
                feature["labels"] = labels
            feature.update({"_example": window.example, "_positions": window.positions, "_words": window.words,
                            "_margins": window.margins})
            features.append(feature)
        return features

    def collate(self, features: Sequence[Feature], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
        batch = pad_features(features, tokenizer)
        # Bookkeeping for ``infer``: where each word's first sub-token sits, -1 past the end.
        batch["_positions"] = _pad([f["_positions"] for f in features], -1)  # (batch, words)
        batch["_words"] = _pad([f["_words"] for f in features], -1)  # (batch, words)
        batch["_margins"] = _pad([f.get("_margins", [0] * len(f["_words"])) for f in features], -1)  # (batch, words)
        batch["_example"] = torch.tensor([f["_example"] for f in features], dtype=torch.long)  # (batch,)
        return batch

    def loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise UsageError(f"{self.name}: the batch has no labels, so there is no loss to train on")
        if not bool((batch["labels"] != -100).any()):
            # No window of the batch labels a word (each lies inside one long word's sub-tokens, or
            # the sentences tokenize to nothing): a zero loss that still has a graph, not NaN.
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
            keep = positions >= 0  # (words,)
            margins = batch["_margins"][row][keep].numpy() if "_margins" in batch else None
            example = int(batch["_example"][row]) if "_example" in batch else -1
            outputs.append(WordLogits(batch["_words"][row][keep].numpy(),
                                      logits[row, positions[keep]].cpu().numpy(),  # (words, num_labels)
                                      example, margins))
        return outputs

    def decode(self, data: TaskData, features: Sequence[Feature], outputs: Sequence[WordLogits]) -> list[TagPrediction]:
        if not data.labels:
            raise UsageError(f"{data.source}: decoding tags needs the label vocabulary (data.labels)")
        labels = data.labels
        windows = []
        for feature, output in zip(features, outputs):
            margins = feature.get("_margins", output.margins)
            windows.append((feature["_example"], output.words,
                            np.zeros(len(output.words)) if margins is None else margins, output.logits))
        predictions = []
        for example, (words, logits) in zip(data.examples, merge_windows(windows, len(data.examples))):
            tags = ["O"] * len(example["tokens"])
            confidence = np.zeros(len(tags))
            if len(words):
                shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))  # (words, num_labels)
                probabilities = shifted / shifted.sum(axis=-1, keepdims=True)  # (words, num_labels)
                for word, best, p in zip(words, probabilities.argmax(-1), probabilities.max(-1)):
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
        # Word-level cross-entropy over the merged windows: each word once, with the logits decode used.
        if any(o.example < 0 for o in outputs):
            raise UsageError(f"{self.name}: outputs without their example index cannot be scored; "
                             f"make them with infer")
        windows = [(o.example, o.words, np.zeros(len(o.words)) if o.margins is None else o.margins, o.logits)
                   for o in outputs]
        merged = merge_windows(windows, len(data.examples))
        index = {label: i for i, label in enumerate(data.labels or [])}
        gold = [index[references[i][int(w)]] for i, (words, _) in enumerate(merged) for w in words]
        if gold:
            chosen = np.concatenate([logits for words, logits in merged if len(words)])  # (words, num_labels)
            metrics["loss"] = mean_cross_entropy(chosen, gold)
        metrics["count"] = len(data.examples)
        return metrics

    def format(self, prediction: TagPrediction) -> str:
        if not prediction.entities:
            return "(no entities)"
        return "; ".join(f"{e.type} {e.text!r} {e.start}:{e.end} ({e.score:.2f})" for e in prediction.entities)

    def to_json(self, prediction: TagPrediction) -> dict[str, Any]:
        return {"entities": [e._asdict() for e in prediction.entities], "tags": list(prediction.tags)}
