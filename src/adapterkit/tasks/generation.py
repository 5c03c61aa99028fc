"""Text generation with the model's active adapter(s): greedy or sampled, with stop strings.

Used by the ``causal-lm`` and ``seq2seq`` tasks (predictions and generated
metrics) and by ``adapterkit generate`` / ``chat``. Prompts arrive as token
ids and are padded into batches here (on the left for decoder-only models).

Each row of a batch stops on its own: at a stop string (matched by
transformers' ``StopStringCriteria`` on the newest tokens only, so a step
costs the same however long the text), an end-of-sequence token or its own
token budget. Decoder-only models generate in short runs between which the
finished rows leave the batch, KV cache included, so the rows still going
do not pay for the finished ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from adapterkit.core.modes import evaluating
from adapterkit.errors import UserError
from adapterkit.runtime.device import model_device

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
        batch_size: prompts generated together. Finished rows leave the batch
            as it goes (decoder-only models), so a larger batch mostly saves
            steps: on two CPU cores, 32 generated GSM8K answers about 1.5x
            faster than 8.
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    batch_size: int = 32

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


def generation_settings(options: GenerationOptions, generate: bool = True) -> dict[str, Any]:
    """The decoding settings as evaluation results record them (JSON-ready).

    ``max_new_tokens`` is ``None`` when each example's budget came from its
    reference's length (see the task's ``BUDGET_FACTOR``); ``generate`` is
    ``False`` when only perplexity was scored.
    """
    return {"generate": generate, "max_new_tokens": options.max_new_tokens, "temperature": options.temperature,
            "top_p": options.top_p, "stop": list(options.stop), "seed": options.seed,
            "batch_size": options.batch_size}


class StopOnGeneratedStrings(StoppingCriteria):
    """Ends each row of a batch once its generated text holds a stop string, with transformers'
    ``StopStringCriteria`` doing the matching.

    That criterion looks only at the newest tokens at each step (a table of
    where each vocabulary token can sit in each stop string), so a step costs
    the same however long the continuation. On its own it also matches a stop
    string that begins in the prompt (``"\\n\\n"`` when the prompt ends with a
    newline and the first generated token starts with one): while fewer
    tokens have been generated than a match can span, its matches are checked
    against the decoded generated text, so only stop strings the generation
    itself holds end it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], start: int | None = None) -> None:
        self.matcher = StopStringCriteria(tokenizer, list(stops))  # ValueError: a tokenizer it cannot read
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.reach = self.matcher.maximum_token_len  # most tokens one match can span
        self.start = start  # where generated tokens begin; by default known at the first call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1  # called once a token has been added
        done = self.matcher(input_ids, scores)
        if input_ids.shape[1] - self.start < self.reach and bool(done.any()):
            rows = done.nonzero().flatten().tolist()
            texts = self.tokenizer.batch_decode(input_ids[rows, self.start:], skip_special_tokens=True)
            for row, text in zip(rows, texts):
                done[row] = any(stop in text for stop in self.stops)
        return done


def transformers_can_stop_on(tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> bool:
    """Whether transformers' ``StopStringCriteria`` can read this tokenizer.

    It works out the text of each vocabulary token by tokenizing a probe
    word; word-level vocabularies without that word (small test tokenizers)
    make it fail. Its tables are cached, so building it again is cheap.
    """
    try:
        StopStringCriteria(tokenizer, list(stops))
    except ValueError:
        return False
    return True


def stop_criterion(tokenizer: PreTrainedTokenizerBase, stops: Sequence[str],
                   start: int | None = None) -> StoppingCriteria:
    """``StopOnGeneratedStrings``, or ``StopOnStringsTail`` for a tokenizer transformers cannot read.

    ``start``: the column where generated tokens begin (default: found at the first call).
    """
    if transformers_can_stop_on(tokenizer, stops):
        return StopOnGeneratedStrings(tokenizer, stops, start)
    return StopOnStringsTail(tokenizer, stops, start)


class StopOnStringsTail(StoppingCriteria):
    """Ends each row once its generated text holds a stop string, decoding only its last tokens.

    The fallback for tokenizers that transformers' ``StopStringCriteria``
    cannot read. A stop string is found at the step whose token completes
    it, and every token spells at least one byte of text, so the last
    ``bytes of the longest stop + 2`` tokens always hold it (the two spare
    tokens keep how the window's first token decodes out of the match).
    Tokens of the prompt are never looked at.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], start: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = max(len(s.encode()) for s in self.stops) + 2
        self.start = start  # where generated tokens begin; by default known at the first call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1  # called once a token has been added
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


class RowStops(StoppingCriteria):
    """Whether each row of a batch has finished: a stop string, an end-of-sequence token, or its own budget.

    ``generate`` takes one ``max_new_tokens`` for the whole batch; each row's
    own budget ends it sooner. ``done`` remembers the rows that finished
    (``generate`` pads them from then on), so the batch can drop them
    between calls (``keep``) and the next call carries on with the rest.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], eos_ids: Sequence[int],
                 budgets: Sequence[int], start: int) -> None:
        self.strings = stop_criterion(tokenizer, stops, start) if stops else None
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        self.budgets = torch.tensor(list(budgets), dtype=torch.long)
        self.start = start  # column of the first generated token
        self.done = torch.zeros(len(self.budgets), dtype=torch.bool)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        device = input_ids.device
        self.done, self.budgets, self.eos = self.done.to(device), self.budgets.to(device), self.eos.to(device)
        done = self.done | (input_ids.shape[1] - self.start >= self.budgets) | torch.isin(input_ids[:, -1], self.eos)
        if self.strings is not None:
            done = done | self.strings(input_ids, scores).to(device)
        self.done = done
        return done

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only, in this order."""
        self.done, self.budgets = self.done[rows], self.budgets[rows]


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


# New tokens between the checks for finished rows, which then leave the batch.
SEGMENT_STEPS = 16


def generate_kwargs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, options: GenerationOptions,
                    max_new_tokens: int, stops: RowStops) -> dict[str, Any]:
    """Keyword arguments for ``model.generate`` that decode as ``options`` say and stop as ``stops`` does."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": stop_token_ids(model, tokenizer),
                              "pad_token_id": tokenizer.pad_token_id, "do_sample": options.temperature > 0,
                              "stopping_criteria": StoppingCriteriaList([stops])}
    if options.temperature > 0:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=0)
    return kwargs


def can_drop_finished_rows(model: PreTrainedModel) -> bool:
    """Whether finished rows may leave a batch between ``generate`` calls that share one KV cache.

    Needs a decoder-only model that keeps a cache, and adapters that only
    change layers: prompt and prefix tuning put virtual tokens in the cache,
    which a continued ``generate`` call would count as text.
    """
    if getattr(model.config, "is_encoder_decoder", False) or not getattr(model.config, "use_cache", True):
        return False
    from adapterkit.core.registry import get_method
    from adapterkit.core.state import get_state, has_state

    return not has_state(model) or all(get_method(c).layer_class is not None
                                       for c in get_state(model).configs.values())


@contextlib.contextmanager
def _routed_rows(model: PreTrainedModel, rows: torch.Tensor) -> Iterator[None]:
    """While rows leave a batch, the per-row plans of ``adapterkit.route`` follow them (this thread only)."""
    from adapterkit.core.context import current_plan, override
    from adapterkit.core.plan import Route
    from adapterkit.core.state import get_state, has_state

    state = get_state(model) if has_state(model) else None
    plan = current_plan(state) if state is not None else None
    if not isinstance(plan, Route) or len(rows) == len(plan.entries):
        yield
        return
    with override(state, plan.with_entries([plan.entries[i] for i in rows.tolist()])):
        yield


def _cache_of(output: Any) -> Any:
    """The KV cache a ``generate`` call returned (``cache`` in recent transformers, else ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _cache_keyword() -> str:
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def _generate_dropping_finished(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                kwargs: dict[str, Any], stops: RowStops, budget: int, pad_id: int) -> torch.Tensor:
    """``generate`` in runs of ``SEGMENT_STEPS`` new tokens; after each, finished rows leave the batch.

    transformers keeps computing every row until the last one stops; here the
    rows still going carry on alone, from the same KV cache (with its
    finished rows dropped). Returns ``(batch, new tokens)`` like one call.
    """
    rows = torch.arange(len(input_ids), device=input_ids.device)
    result = torch.full((len(input_ids), budget), pad_id, dtype=torch.long, device=input_ids.device)
    ids, mask, cache, produced = input_ids, attention_mask, None, 0
    while produced < budget:
        call = {**kwargs, "max_new_tokens": min(SEGMENT_STEPS, budget - produced), "return_dict_in_generate": True}
        if cache is not None:
            call[_cache_keyword()] = cache
        with _routed_rows(model, rows):
            output = model.generate(input_ids=ids, attention_mask=mask, **call)
        new = output.sequences[:, ids.shape[1]:]
        result[rows, produced:produced + new.shape[1]] = new
        produced += new.shape[1]
        if bool(stops.done.all()) or produced >= budget or not new.shape[1]:
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), new.shape[1])], dim=1)
        ids, cache = output.sequences, _cache_of(output)
        keep = (~stops.done).nonzero().flatten()
        if len(keep) < len(rows):
            if cache is not None:
                cache.batch_select_indices(keep)
            ids, mask, rows = ids[keep], mask[keep], rows[keep]
            stops.keep(keep)
    return result[:, :produced]


@torch.no_grad()
def generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, options: GenerationOptions, max_new_tokens: int | None = None,
                 row_budgets: Sequence[int] | None = None) -> torch.Tensor:
    """The generated token ids of one padded batch, ``(batch, new tokens)``, prompts excluded.

    Rows stop independently (on a stop string, an end-of-sequence token or
    their own budget) and are filled with the pad token afterwards; the batch
    ends when every row has stopped. Decoder-only models drop finished rows
    from the batch as they go (see ``can_drop_finished_rows``).
    ``row_budgets`` (one per row) caps each row's new tokens below the
    batch's ``max_new_tokens`` (default: the largest row budget, else
    ``options.max_new_tokens``, else ``DEFAULT_MAX_NEW_TOKENS``).
    """
    if row_budgets is not None and len(row_budgets) != len(input_ids):
        raise GenerationError(f"{len(row_budgets)} row budgets for {len(input_ids)} rows")
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    budget = (max_new_tokens or (max(row_budgets) if row_budgets else None) or options.max_new_tokens
              or DEFAULT_MAX_NEW_TOKENS)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    start = 1 if encoder_decoder else input_ids.shape[1]  # an encoder-decoder's decoder starts with one token
    stops = RowStops(tokenizer, options.stop, stop_token_ids(model, tokenizer),
                     [min(b, budget) for b in row_budgets] if row_budgets else [budget] * len(input_ids), start)
    kwargs = generate_kwargs(model, tokenizer, options, budget, stops)
    if options.temperature > 0 and options.seed is not None:
        torch.manual_seed(options.seed)
    with evaluating(model):
        if can_drop_finished_rows(model):
            return _generate_dropping_finished(model, input_ids, attention_mask, kwargs, stops, budget,
                                               tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    # An encoder-decoder returns decoder ids only (from its start token, which decoding skips).
    return output if encoder_decoder else output[:, input_ids.shape[1]:]


def decode_generated(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, stops: Sequence[str]) -> list[str]:
    """The text of each row of generated ids, cut before its first stop string and stripped."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [cut_at_stop(text, stops).strip() for text in texts]


def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, options: GenerationOptions,
                   max_new_tokens: int | None = None, row_budgets: Sequence[int] | None = None) -> list[str]:
    """Generated texts (prompts excluded, stop strings cut) for one padded batch; see ``generate_ids``."""
    ids = generate_ids(model, tokenizer, input_ids, attention_mask, options, max_new_tokens, row_budgets)
    return decode_generated(tokenizer, ids, options.stop)


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


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row: leading ones (``left``) or trailing ones.

    A subset of a batch's rows still carries the padding of the batch's
    longest row; without it, the model attends over fewer positions.
    """
    real = attention_mask.bool().any(dim=0).nonzero().flatten()
    if not len(real):
        return input_ids, attention_mask
    span = slice(int(real[0]), None) if left else slice(0, int(real[-1]) + 1)
    return input_ids[:, span], attention_mask[:, span]
