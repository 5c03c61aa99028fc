"""Extractive question answering (SQuAD-style) as a ``Task``.

A question and its context become one or more *windows*: ``[CLS] question
[SEP] context-part [SEP]``, where only the context is truncated and
consecutive windows of a long context overlap by ``stride`` tokens, so an
answer cut by one window boundary lies whole in the next. For training, each
window points at the answer's first and last tokens, or at ``[CLS]`` when the
answer is not inside it. At inference, every window proposes its best span
(``qa_spans``) and the best span over a question's windows is the answer,
mapped back to characters of the context through the tokenizer's offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.examples import TaskData
from adapterkit.data.squad import qa_from_pairs
from adapterkit.errors import UsageError
from adapterkit.tasks import lengths
from adapterkit.tasks.base import Feature, Task
from adapterkit.tasks.qa_metrics import squad_scores
from adapterkit.tasks.qa_spans import best_span_over_windows
from adapterkit.tasks.registry import register_task

# Tokens a window needs beyond question and context: [CLS] q [SEP] c [SEP].
SPECIAL_TOKENS_IN_PAIR = 3


class AnswerPrediction(NamedTuple):
    """An answer: its text, its probability in its window, and its span ``[start, end)`` in the context."""

    answer: str
    score: float
    start: int
    end: int


class SpanLogits(NamedTuple):
    """Raw output for one window: logits of its real tokens, and its loss when it had positions."""

    start: np.ndarray  # (seq,)
    end: np.ndarray  # (seq,)
    loss: float | None


def answer_positions(offsets: Sequence[tuple[int, int] | None], start_char: int, end_char: int,
                     cls_index: int = 0) -> tuple[int, int]:
    """Token positions of the characters ``[start_char, end_char)`` in one window.

    ``offsets`` holds each token's character span in the context (``None``
    outside it). When the answer is not wholly inside the window, both
    positions are ``cls_index``: "no answer here".
    """
    spans = {i: span for i, span in enumerate(offsets) if span is not None}
    if not spans or min(s for s, _ in spans.values()) > start_char or max(e for _, e in spans.values()) < end_char:
        return cls_index, cls_index
    start = min(i for i, (_, e) in spans.items() if e > start_char)
    end = max(i for i, (s, _) in spans.items() if s < end_char)
    return start, end


QA_MAX_LENGTH = 384  # tokens per window, as the SQuAD fine-tuning recipes use


@register_task
class QuestionAnsweringTask(Task):
    """Find the answer to a question as a span of its context.

    Args:
        stride: tokens shared by consecutive windows of one context; capped
            at half of ``max_length``.
        max_answer_length: longest answer, in tokens.
        n_best: top start and end positions paired up per window.
    """

    name = "question-answering"
    default_metric = "f1"

    def __init__(self, stride: int = 128, max_answer_length: int = 30, n_best: int = 20) -> None:
        self.stride = stride
        self.max_answer_length = max_answer_length
        self.n_best = n_best

    def default_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase,
                        model: PreTrainedModel | None) -> dict[str, int]:
        """384-token windows (the SQuAD recipes' length; the stride is 128), up to the model's limit."""
        return {"max_length": min(QA_MAX_LENGTH, lengths.model_limit(model, tokenizer))}

    def truncation(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
                   **options: Any) -> list[lengths.Truncation]:
        """Nothing: long contexts become several windows."""
        return []

    def _window_stride(self, max_length: int) -> int:
        return min(self.stride, max_length // 2)

    def _clip_questions(self, questions: list[str], tokenizer: PreTrainedTokenizerBase,
                        limit: int) -> list[str]:
        """Questions cut to ``limit`` tokens, so every window keeps room for more than ``stride`` of context."""
        encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
        clipped = []
        for question, offsets in zip(questions, encoded["offset_mapping"]):
            clipped.append(question[: offsets[limit - 1][1]] if len(offsets) > limit else question)
        return clipped

    def encode(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Feature]:
        if not tokenizer.is_fast:
            raise UsageError(f"question answering needs a fast tokenizer (offset mappings); "
                             f"{type(tokenizer).__name__} is not one")
        stride = self._window_stride(max_length)
        question_limit = max_length - SPECIAL_TOKENS_IN_PAIR - stride - 1
        if question_limit < 1:
            raise UsageError(f"max_length={max_length} leaves no room for question and context; use 64 or more")
        questions = self._clip_questions([e["question"].lstrip() for e in data.examples], tokenizer,
                                         question_limit)
        encoded = tokenizer(questions, [e["context"] for e in data.examples], truncation="only_second",
                            max_length=max_length, stride=stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
        features: list[Feature] = []
        for w, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
            sequence_ids = encoded.sequence_ids(w)
            offsets = [tuple(span) if sequence_ids[t] == 1 else None
                       for t, span in enumerate(encoded["offset_mapping"][w])]
            feature: Feature = {key: encoded[key][w] for key in ("input_ids", "token_type_ids", "attention_mask")
                                if key in encoded}
            answers = data.examples[example_index]["answers"]
            if answers:  # train on the first reference answer, as the SQuAD scripts do
                ids = feature["input_ids"]
                cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
                start_char = answers[0]["answer_start"]
                start, end = answer_positions(offsets, start_char, start_char + len(answers[0]["text"]),
                                              cls_index)
                feature["start_positions"], feature["end_positions"] = start, end
            feature["_example"] = int(example_index)
            feature["_offsets"] = offsets
            features.append(feature)
        return features

    def infer(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> list[SpanLogits]:
        inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
        out = model(**inputs)
        start_logits, end_logits = out.start_logits.float(), out.end_logits.float()  # (batch, seq)
        mask = inputs.get("attention_mask", torch.ones_like(start_logits)).bool()  # (batch, seq)
        results = []
        for row in range(start_logits.shape[0]):
            start, end = start_logits[row][mask[row]], end_logits[row][mask[row]]  # (real_seq,)
            loss = None
            if "start_positions" in batch:
                # The training loss of this window: mean of start and end cross-entropy.
                targets = torch.stack([batch["start_positions"][row], batch["end_positions"][row]])
                loss = float(F.cross_entropy(torch.stack([start, end]), targets.to(start.device)))
            results.append(SpanLogits(start.cpu().numpy(), end.cpu().numpy(), loss))
        return results

    def decode(self, data: TaskData, features: Sequence[Feature],
               outputs: Sequence[SpanLogits]) -> list[AnswerPrediction]:
        windows: list[list[tuple[np.ndarray, np.ndarray, Any]]] = [[] for _ in data.examples]
        for feature, output in zip(features, outputs):
            windows[feature["_example"]].append((output.start, output.end, feature["_offsets"]))
        predictions = []
        for example, candidates in zip(data.examples, windows):
            found = best_span_over_windows(candidates, self.max_answer_length, self.n_best)
            if found is None:
                predictions.append(AnswerPrediction("", 0.0, 0, 0))
                continue
            span = found[1]
            predictions.append(AnswerPrediction(example["context"][span.start_char : span.end_char],
                                                span.probability, span.start_char, span.end_char))
        return predictions

    def score(self, data: TaskData, predictions: Sequence[AnswerPrediction],
              outputs: Sequence[SpanLogits]) -> dict[str, Any]:
        references = [[a["text"] for a in e["answers"]] for e in data.examples]
        if not all(references):
            raise UsageError(f"{data.source}: cannot score questions without reference answers")
        metrics: dict[str, Any] = squad_scores([p.answer for p in predictions], references)
        losses = [o.loss for o in outputs if o.loss is not None]
        if losses:
            metrics["loss"] = float(np.mean(losses))
        metrics["count"] = len(predictions)
        return metrics

    def from_texts(self, texts: Sequence[Any], labels: Sequence[str] | None) -> TaskData:
        """Examples from ``(question, context)`` pairs (or ``{"question", "context"}`` dicts)."""
        return qa_from_pairs(texts)

    def format(self, prediction: AnswerPrediction) -> str:
        return f"{prediction.answer}\t{prediction.score:.4f}\t[{prediction.start}, {prediction.end})"

    def to_json(self, prediction: AnswerPrediction) -> dict[str, Any]:
        return {"answer": prediction.answer, "score": prediction.score,
                "start": prediction.start, "end": prediction.end}
