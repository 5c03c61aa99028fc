"""Instruction tuning of a decoder-only LM (``causal-lm``).

Training: each example is its prompt (chat template or plain format) and
its reply; the loss sees only the reply's tokens (``labels`` is -100 on the
prompt). ``pack`` puts several short examples in one row without attention
between them: each example's ``position_ids`` restart at 0 and the row has
no ``attention_mask``, from which transformers builds a block-diagonal
causal mask (its packed-sequence format).

Evaluation: perplexity of the held-out replies (teacher forcing); where
examples carry a short ``answer`` (GSM8K's final number) or a ``reference``
(a translation), the model also generates from the prompt, and exact match
or BLEU/chrF score the generations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.examples import TaskData
from adapterkit.data.instructions import instructions_from_texts
from adapterkit.errors import UsageError
from adapterkit.tasks import chat_format, lengths
from adapterkit.tasks.base import Feature, Task
from adapterkit.tasks.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationOptions,
    generate_batch,
    pad_prompts,
    trim_padding,
)
from adapterkit.tasks.lm_loss import chunked_lm_loss, uses_chunked_lm_loss
from adapterkit.tasks.registry import register_task
from adapterkit.tasks.text_metrics import bleu_chrf, exact_match, perplexity

IGNORE = -100
# Model inputs a batch may carry; everything else in a batch is for ``infer``.
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
# Generation budget when scoring: the reference reply's length times this, plus a margin.
BUDGET_FACTOR, BUDGET_MARGIN, BUDGET_MAX = 1.5, 16, 512
# Longest default context: the model's own, up to this many tokens.
CONTEXT_CAP = 1024
# Most logits (rows x positions x vocabulary) computed at once when scoring: 512 MB of float32.
LOGITS_BUDGET = 2**27


class Generation(NamedTuple):
    """One example's outcome: the generated reply (if generated) and the reply's NLL."""

    text: str | None
    nll: float  # summed over the reference reply's tokens
    tokens: int  # reference reply tokens scored (0 without a reference reply)


def _truncate(prompt: list[int], reply: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + reply into ``max_length``: the reply keeps at least half the room,
    the prompt loses its oldest tokens (it ends with the reply cue, which must stay)."""
    if len(prompt) + len(reply) <= max_length:
        return prompt, reply
    prompt_room = max(max_length - min(len(reply), max_length // 2), 1)
    prompt = prompt[-prompt_room:]
    return prompt, reply[: max_length - len(prompt)]


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL and token count of the labelled tokens.

    ``logits`` (batch, seq, vocab) at position t predict ``labels`` at t + 1.
    """
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")  # (batch, seq-1)
    mask = targets != IGNORE
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


@register_task
class CausalLMTask(Task):
    """Instruction tuning of a causal LM; loss on the responses only."""

    name = "causal-lm"
    default_metric = "perplexity"
    scored_units = ("response tokens",)

    def __init__(self, generation: GenerationOptions | None = None) -> None:
        self.generation = generation or GenerationOptions()
        self.generate = True  # False: score perplexity only, generate nothing
        self._tokenizer: PreTrainedTokenizerBase | None = None  # set by encode/collate, for decoding

    @staticmethod
    def _prompt_and_reply(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
        """The example's prompt and reply token ids, untruncated."""
        prompt = chat_format.prompt_ids(tokenizer, example["messages"])
        response = example.get("response")
        reply = chat_format.reply_ids(tokenizer, example["messages"], response) if response is not None else []
        return prompt, reply

    def input_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        return [len(p) + len(r) for p, r in (self._prompt_and_reply(e, tokenizer) for e in data.examples)]

    def default_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase,
                        model: PreTrainedModel | None) -> dict[str, int]:
        """The model's context, up to ``CONTEXT_CAP`` tokens (``--packing`` makes short examples cheap)."""
        return {"max_length": min(CONTEXT_CAP, lengths.model_limit(model, tokenizer))}

    def truncation(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
                   **options: Any) -> list[lengths.Truncation]:
        """The response tokens cut at ``max_length`` (the prompt gives way first, see ``_truncate``)."""
        full, kept = [], []
        for example in data.examples:
            prompt, reply = self._prompt_and_reply(example, tokenizer)
            full.append(len(reply))
            kept.append(len(_truncate(prompt, reply, max_length)[1]))
        return [lengths.truncation_of(full, kept, "response tokens", max_length)]

    def encode(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Feature]:
        self._tokenizer = tokenizer
        features = []
        for i, example in enumerate(data.examples):
            response = example.get("response")
            prompt, reply = _truncate(*self._prompt_and_reply(example, tokenizer), max_length)
            scored = example.get("answer") is not None or example.get("reference") is not None
            budget = self.generation.max_new_tokens or (
                min(int(len(reply) * BUDGET_FACTOR) + BUDGET_MARGIN, BUDGET_MAX) if reply else DEFAULT_MAX_NEW_TOKENS)
            features.append({
                "input_ids": prompt + reply,
                "attention_mask": [1] * (len(prompt) + len(reply)),
                "labels": [IGNORE] * len(prompt) + reply,
                "_example": i, "_prompt": prompt, "_generate": scored or response is None, "_budget": budget,
            })
        return features

    def pack(self, features: Sequence[Feature], max_length: int) -> list[Feature]:
        """Packed training rows of at most ``max_length`` tokens (first-fit, longest first).

        Each example keeps its own positions (0, 1, ...) and its first token is
        never a prediction target, so no example sees or predicts another.
        """
        rows: list[dict[str, list[int]]] = []
        for index in sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"])):
            feature = features[index]
            size = len(feature["input_ids"])
            row = next((r for r in rows if len(r["input_ids"]) + size <= max_length), None)
            if row is None:
                row = {"input_ids": [], "labels": [], "position_ids": [], "_examples": []}
                rows.append(row)
            row["input_ids"] += feature["input_ids"]
            row["labels"] += [IGNORE] + feature["labels"][1:]
            row["position_ids"] += list(range(size))
            row["_examples"].append(feature["_example"])
        return [{**row, "_example": row["_examples"][0]} for row in rows]

    def collate(self, features: Sequence[Feature], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
        """Right-padded model inputs, plus left-padded prompts for rows that generate."""
        self._tokenizer = tokenizer
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE, "position_ids": 0}
        batch = {key: torch.tensor([list(f[key]) + [pad] * (width - len(f[key])) for f in features])
                 for key, pad in pads.items() if key in features[0]}
        if any(f.get("_generate") for f in features):
            batch["prompt_ids"], batch["prompt_mask"] = pad_prompts([f["_prompt"] for f in features],
                                                                    tokenizer.pad_token_id)
            batch["generate"] = torch.tensor([bool(f["_generate"]) for f in features])
            batch["max_new_tokens"] = torch.tensor([f["_budget"] for f in features])  # one budget per row
        return batch

    @staticmethod
    def _model_inputs(batch: dict[str, torch.Tensor], labels: bool = True) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in MODEL_KEYS if k in batch and (labels or k != "labels")}

    def loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # No KV cache: a cache would switch off transformers' packed-sequence masking.
        if uses_chunked_lm_loss(model) and model.training and torch.is_grad_enabled():
            return chunked_lm_loss(model, self._model_inputs(batch, labels=False), batch["labels"])
        return model(**self._model_inputs(batch), use_cache=False).loss

    def infer(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> list[Generation]:
        inputs = self._model_inputs(batch, labels=False)
        nll, tokens = torch.zeros(len(batch["labels"])), torch.zeros(len(batch["labels"]), dtype=torch.long)
        # A few rows at a time: the logits are (rows, seq, vocab), ~50k wide for real LMs.
        step = max(1, LOGITS_BUDGET // (batch["labels"].shape[1] * model.config.vocab_size))
        for start in range(0, len(nll), step):
            rows = slice(start, start + step)
            chunk, labels = {k: v[rows] for k, v in inputs.items()}, batch["labels"][rows]
            if "attention_mask" in chunk:  # right-padded: drop the columns these rows all pad
                width = max(1, int(chunk["attention_mask"].sum(dim=1).max()))
                chunk, labels = {k: v[:, :width] for k, v in chunk.items()}, labels[:, :width]
            logits = model(**chunk, use_cache=False).logits
            nll[rows], tokens[rows] = response_nll(logits, labels)
        texts: list[str | None] = [None] * len(nll)
        if "generate" in batch and self.generate:
            rows = batch["generate"].nonzero().flatten().tolist()
            options = self.generation_options()
            budgets = batch["max_new_tokens"].tolist()
            # ``options.batch_size`` rows at a time: fewer rows keep generating after theirs has ended.
            for start in range(0, len(rows), options.batch_size):
                chunk = rows[start:start + options.batch_size]
                ids, mask = trim_padding(batch["prompt_ids"][chunk], batch["prompt_mask"][chunk])
                generated = generate_batch(model, self._require_tokenizer(), ids, mask, options,
                                           row_budgets=[budgets[r] for r in chunk])
                for row, text in zip(chunk, generated):
                    texts[row] = text
        return [Generation(t, float(n), int(c)) for t, n, c in zip(texts, nll.tolist(), tokens.tolist())]

    def generation_options(self, tokenizer: PreTrainedTokenizerBase | None = None) -> GenerationOptions:
        """The decoding settings generation uses: ``self.generation``, with the stop strings of the
        plain instruction format when it names none and the tokenizer has no chat template."""
        tokenizer = tokenizer or self._tokenizer
        if tokenizer is None or self.generation.stop:
            return self.generation
        return dataclasses.replace(self.generation, stop=chat_format.default_stops(tokenizer))

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("causal-lm: encode or collate must run before infer (it needs the tokenizer)")
        return self._tokenizer

    def decode(self, data: TaskData, features: Sequence[Feature], outputs: Sequence[Generation]) -> list[Generation]:
        predictions: list[Generation | None] = [None] * len(data)
        for feature, output in zip(features, outputs):
            predictions[feature["_example"]] = output
        return [p if p is not None else Generation(None, 0.0, 0) for p in predictions]

    def score(self, data: TaskData, predictions: Sequence[Generation], outputs: Sequence[Any]) -> dict[str, Any]:
        total_nll = sum(p.nll for p in predictions)
        total_tokens = sum(p.tokens for p in predictions)
        # Only generated texts are scored (none with ``self.generate`` off).
        answers = [(p.text, e["answer"]) for e, p in zip(data.examples, predictions)
                   if e.get("answer") is not None and p.text is not None]
        references = [(p.text, e["reference"]) for e, p in zip(data.examples, predictions)
                      if e.get("reference") is not None and p.text is not None]
        if not total_tokens and not answers and not references:
            hint = "" if self.generate else " (with generation off, only responses are scored)"
            raise UsageError(f"{data.source}: no responses, answers or references to score against{hint}")
        metrics: dict[str, Any] = {"count": len(data), "response_tokens": total_tokens}
        if total_tokens:
            metrics["loss"] = total_nll / total_tokens
            metrics["perplexity"] = perplexity(total_nll, total_tokens)
        if answers:
            metrics["exact_match"] = sum(exact_match(g, a) for g, a in answers) / len(answers)
            metrics["answered"] = len(answers)
        if references:
            metrics.update(bleu_chrf([g for g, _ in references], [r for _, r in references]))
        return metrics

    def format(self, prediction: Generation) -> str:
        if prediction.text is not None:
            return prediction.text
        return f"perplexity {math.exp(prediction.nll / max(prediction.tokens, 1)):.4f}"

    def to_json(self, prediction: Generation) -> dict[str, Any]:
        return {"text": prediction.text, "nll": prediction.nll, "tokens": prediction.tokens}

    def from_texts(self, texts: Sequence[str], labels: Sequence[str] | None) -> TaskData:
        return instructions_from_texts(texts)
