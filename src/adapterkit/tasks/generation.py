"""Text generation with the model's active adapter(s): greedy or sampled, with stop strings.

Used by the ``causal-lm`` and ``seq2seq`` tasks (predictions and generated
metrics) and by ``adapterkit generate`` / ``chat``. Prompts arrive as token
ids and are padded into batches here (on the left for decoder-only models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from adapterkit.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 128


class GenerationError(UserError, ValueError):
    """Generation options that cannot be used."""


@dataclass
class GenerationOptions:
    """How to generate.

    Attributes:
        max_new_tokens: most tokens generated per prompt; ``None`` lets the
            task choose (from the reference lengths when scoring, else
            ``DEFAULT_MAX_NEW_TOKENS``).
        temperature: 0 is greedy decoding; above 0 samples with this temperature.
        top_p: nucleus sampling mass (sampling only).
        stop: strings that end a generation; the text is cut before the first one.
        seed: seeds torch before sampling, for repeatable samples.
        batch_size: prompts generated together.
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1):
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.batch_size < 1:
            raise GenerationError(f"batch_size must be positive, got {self.batch_size!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)


class StopOnStrings(StoppingCriteria):
    """Ends each sequence of a batch once its generated text contains a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a generation: the tokenizer's and the model's end-of-sequence ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``(batch, longest)``.

    Decoder-only prompts are padded on the left so that generation continues
    each one from its last real token; encoder inputs on the right, where
    padding cannot shift learned position embeddings.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        if len(prompt):
            ids[row, span] = torch.tensor(list(prompt))
            mask[row, span] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, options: GenerationOptions,
                   max_new_tokens: int | None = None) -> list[str]:
    """Generated texts (prompts excluded, stop strings cut) for one padded batch."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    budget = max_new_tokens or options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    kwargs: dict[str, object] = {"max_new_tokens": budget, "eos_token_id": stop_token_ids(model, tokenizer),
                                 "pad_token_id": tokenizer.pad_token_id, "do_sample": options.temperature > 0}
    if options.temperature > 0:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=0)
        if options.seed is not None:
            torch.manual_seed(options.seed)
    prompt_length = 0 if encoder_decoder else input_ids.shape[1]
    if options.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tokenizer, options.stop, prompt_length)])
    was_training = model.training
    model.eval()
    try:
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
    return [cut_at_stop(text, options.stop).strip() for text in texts]


def generate_from_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      prompts: Sequence[Sequence[int]], options: GenerationOptions | None = None,
                      adapter_names: Sequence[str | None] | None = None) -> list[str]:
    """One generated text per tokenized prompt.

    Args:
        prompts: token ids of each prompt (for encoder-decoders: of each source).
        options: decoding settings (default: greedy, ``DEFAULT_MAX_NEW_TOKENS``).
        adapter_names: one adapter (or ``None`` for the base model) per prompt,
            routed with ``adapterkit.route``; default: the active adapter(s).
    """
    from adapterkit.core import route

    options = options or GenerationOptions()
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise GenerationError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts")
    texts: list[str] = []
    for start in range(0, len(prompts), options.batch_size):
        chunk = prompts[start:start + options.batch_size]
        left = not getattr(model.config, "is_encoder_decoder", False)
        input_ids, attention_mask = pad_prompts(chunk, tokenizer.pad_token_id, left)
        names = adapter_names[start:start + options.batch_size] if adapter_names is not None else None
        with route(model, names) if names is not None else contextlib.nullcontext():
            texts += generate_batch(model, tokenizer, input_ids, attention_mask, options)
    return texts
