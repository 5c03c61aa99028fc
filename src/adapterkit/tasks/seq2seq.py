"""Sequence-to-sequence with an encoder-decoder (T5, BART, Marian): ``seq2seq``.

Training is teacher forcing: the model shifts ``labels`` right into the
decoder inputs itself and returns the token-level cross-entropy. Evaluation
generates from each source and scores the generations with sacrebleu's BLEU
and chrF; the teacher-forced loss and perplexity of the targets come with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.examples import TaskData
from adapterkit.data.seq2seq import seq2seq_from_texts
from adapterkit.errors import UsageError
from adapterkit.tasks import lengths
from adapterkit.tasks.base import Feature, Task
from adapterkit.tasks.causal_lm import IGNORE, LOGITS_BUDGET, Generation
from adapterkit.tasks.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationOptions,
    generate_batch,
    trim_padding,
)
from adapterkit.tasks.registry import register_task
from adapterkit.tasks.text_metrics import bleu_chrf, perplexity

# Generation budget when scoring: the reference's length times this, plus a margin.
BUDGET_FACTOR, BUDGET_MARGIN, BUDGET_MAX = 1.5, 10, 512


@register_task
class Seq2SeqTask(Task):
    """Source text in, target text out; BLEU and chrF of the generations."""

    name = "seq2seq"
    default_metric = "bleu"
    scored_units = ("target tokens",)

    def __init__(self, generation: GenerationOptions | None = None) -> None:
        self.generation = generation or GenerationOptions()
        self.generate = True  # False: score perplexity only, generate nothing
        self._tokenizer: PreTrainedTokenizerBase | None = None  # set by encode/collate, for decoding

    def _lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
        """Untruncated source and (where there is one) target lengths in tokens."""
        with lengths.quiet_length_warning(tokenizer):
            sources = [len(i) for i in tokenizer([e["source"] for e in data.examples])["input_ids"]] \
                if data.examples else []
            labelled = [e["target"] for e in data.examples if e.get("target") is not None]
            targets = [len(i) for i in tokenizer(text_target=labelled)["input_ids"]] if labelled else []
        return sources, targets

    def input_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        return self._lengths(data, tokenizer)[0]

    def default_lengths(self, data: TaskData, tokenizer: PreTrainedTokenizerBase,
                        model: PreTrainedModel | None) -> dict[str, int]:
        """Source and target lengths that fit 99% of the examples, up to the model's limit."""
        sample = TaskData(data.task, lengths.sample(data.examples), data.labels, data.source, dict(data.columns))
        sources, targets = self._lengths(sample, tokenizer)
        limit = lengths.model_limit(model, tokenizer)
        return {"max_length": lengths.covering_length(sources, limit),
                "max_target_length": lengths.covering_length(targets, limit)}

    def truncation(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
                   max_target_length: int | None = None, **options: Any) -> list[lengths.Truncation]:
        sources, targets = self._lengths(data, tokenizer)
        target_length = max_target_length or max_length
        return [lengths.truncation_of(sources, [min(n, max_length) for n in sources], "source tokens", max_length),
                lengths.truncation_of(targets, [min(n, target_length) for n in targets], "target tokens",
                                      target_length, flag="--max-target-length")]

    def encode_options(self, config: Any) -> dict[str, Any]:
        return {"max_target_length": getattr(config, "max_target_length", None)}

    def encode(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
               max_target_length: int | None = None) -> list[Feature]:
        """Features of source ids and target labels; targets are cut at ``max_target_length``
        (default ``max_length``)."""
        self._tokenizer = tokenizer
        sources = tokenizer([e["source"] for e in data.examples], truncation=True, max_length=max_length)
        targets = [e.get("target") for e in data.examples]
        labelled = [t for t in targets if t is not None]
        target_length = max_target_length or max_length
        encoded_targets = iter(tokenizer(text_target=labelled, truncation=True, max_length=target_length)["input_ids"]
                               if labelled else [])
        eos = tokenizer.eos_token_id
        features = []
        for i, target in enumerate(targets):
            labels = list(next(encoded_targets)) if target is not None else []
            if labels and eos is not None and labels[-1] != eos:
                labels.append(eos)  # the decoder must learn to stop, whatever the tokenizer adds
            budget = self.generation.max_new_tokens or (
                min(int(len(labels) * BUDGET_FACTOR) + BUDGET_MARGIN, BUDGET_MAX) if labels else DEFAULT_MAX_NEW_TOKENS)
            features.append({"input_ids": list(sources["input_ids"][i]),
                             "attention_mask": list(sources["attention_mask"][i]),
                             "labels": labels or [IGNORE], "_example": i, "_budget": budget})
        return features

    def collate(self, features: Sequence[Feature], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
        """Sources and targets right-padded (targets with -100), plus the generation budget."""
        self._tokenizer = tokenizer
        batch = {}
        for key, pad in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("labels", IGNORE)):
            width = max(len(f[key]) for f in features)
            batch[key] = torch.tensor([list(f[key]) + [pad] * (width - len(f[key])) for f in features])
        batch["max_new_tokens"] = torch.tensor([f["_budget"] for f in features])  # one budget per row
        return batch

    def loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    def infer(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> list[Generation]:
        labels = batch["labels"]
        sums: list[float] = []
        counts: list[int] = []
        step = max(1, LOGITS_BUDGET // (labels.shape[1] * model.config.vocab_size))
        for start in range(0, len(labels), step):  # a few rows at a time: logits are vocabulary-wide
            rows = slice(start, start + step)
            logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                           labels=labels[rows]).logits  # (rows, target, vocab), aligned with labels
            nll = F.cross_entropy(logits.float().transpose(1, 2), labels[rows], ignore_index=IGNORE, reduction="none")
            mask = labels[rows] != IGNORE
            sums += (nll * mask).sum(dim=1).tolist()
            counts += mask.sum(dim=1).tolist()
        if self._tokenizer is None:
            raise RuntimeError("seq2seq: encode or collate must run before infer (it needs the tokenizer)")
        texts: list[str | None] = [None] * len(labels)
        if self.generate:
            options = self.generation_options()
            budgets = batch["max_new_tokens"].tolist()
            # ``options.batch_size`` rows at a time: fewer rows keep generating after theirs has ended.
            for start in range(0, len(labels), options.batch_size):
                chunk = slice(start, start + options.batch_size)
                ids, mask = trim_padding(batch["input_ids"][chunk], batch["attention_mask"][chunk], left=False)
                texts[chunk] = generate_batch(model, self._tokenizer, ids, mask, options, row_budgets=budgets[chunk])
        return [Generation(t, float(s), int(c)) for t, s, c in zip(texts, sums, counts)]

    def generation_options(self, tokenizer: PreTrainedTokenizerBase | None = None) -> GenerationOptions:
        """The decoding settings generation uses (``self.generation``; the tokenizer adds nothing)."""
        return self.generation

    def decode(self, data: TaskData, features: Sequence[Feature], outputs: Sequence[Generation]) -> list[Generation]:
        predictions: list[Generation | None] = [None] * len(data)
        for feature, output in zip(features, outputs):
            predictions[feature["_example"]] = output
        return [p if p is not None else Generation(None, 0.0, 0) for p in predictions]

    def score(self, data: TaskData, predictions: Sequence[Generation], outputs: Sequence[Any]) -> dict[str, Any]:
        pairs = [(p.text, e["target"]) for e, p in zip(data.examples, predictions) if e.get("target") is not None]
        if not pairs:
            raise UsageError(f"{data.source}: no targets to score against")
        total_nll = sum(p.nll for p in predictions)
        total_tokens = sum(p.tokens for p in predictions)
        generated = [(g, r) for g, r in pairs if g is not None]  # none with ``self.generate`` off
        metrics: dict[str, Any] = bleu_chrf([g for g, _ in generated], [r for _, r in generated]) if generated else {}
        metrics.update({"loss": total_nll / max(total_tokens, 1), "perplexity": perplexity(total_nll, total_tokens),
                        "count": len(pairs), "target_tokens": total_tokens})
        return metrics

    def format(self, prediction: Generation) -> str:
        return prediction.text or ""

    def to_json(self, prediction: Generation) -> dict[str, Any]:
        return {"text": prediction.text, "nll": prediction.nll, "tokens": prediction.tokens}

    def from_texts(self, texts: Sequence[str], labels: Sequence[str] | None) -> TaskData:
        return seq2seq_from_texts(texts)
