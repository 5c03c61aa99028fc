"""Prompt tuning (Lester et al., 2021): learned virtual-token embeddings before the input.

A (P, hidden) table of embeddings is prepended to the input embeddings by a
forward pre-hook; the call's other per-token inputs follow: ``attention_mask``
gains P ones, ``token_type_ids`` P zeros, token-level ``labels`` P ``-100``
(so the loss ignores the virtual positions), ``position_ids`` count the
virtual tokens first.

Outputs: for decoder-only and encoder-only models a forward hook strips the P
virtual positions from every output with a sequence dimension (token logits,
hidden states, start/end logits), so outputs line up with the caller's inputs;
the loss is computed before stripping, over the real positions only.
Encoder-decoder models get the prompt on the encoder input only: the encoder
is hooked (so ``generate``, which runs the encoder on its own, sees it too),
the encoder attention mask is extended wherever it is used, and
``encoder_last_hidden_state`` keeps the virtual positions the decoder attends to.

With a KV cache, the prompt enters once, with the first call on an empty
cache; later calls find it in the cache, so only the mask grows.

Initialisation: rows of the model's input-embedding matrix, either at random
vocabulary ids or at the token ids of ``init_text`` (repeated or cut to P).
Core cannot tokenise, so pass the ids (``PromptTuningConfig.from_text(text,
tokenizer)`` fills them); with ``init_text`` alone, the tokenizer saved with the
model (``config.name_or_path``, local files only) is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from adapterkit.core.config import AdapterConfig, ConfigError, check_positive
from adapterkit.core.layers import get_store
from adapterkit.core.registry import Method, register
from adapterkit.core.state import AdapterState
from adapterkit.errors import UsageError
from adapterkit.methods import _virtual as vt


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning settings: number of virtual tokens and an optional initialisation text."""

    num_virtual_tokens: int = 20
    init_text: str | None = None
    init_token_ids: list[int] | None = None  # the tokenised init_text

    def validate(self) -> None:
        check_positive(self, "num_virtual_tokens")
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text):
            raise ConfigError(
                f"PromptTuningConfig.init_text must be None or a non-empty string, got {self.init_text!r}"
            )
        ids = self.init_token_ids
        if ids is not None:
            if (not isinstance(ids, (list, tuple)) or not ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise ConfigError(
                    f"PromptTuningConfig.init_token_ids must be None or a non-empty list of token ids, got {ids!r}"
                )
            self.init_token_ids = list(ids)

    @classmethod
    def from_text(cls, init_text: str, tokenizer: Any, num_virtual_tokens: int = 20) -> "PromptTuningConfig":
        """A config initialised from ``init_text``, tokenised (without special tokens) by ``tokenizer``."""
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        return cls(num_virtual_tokens=num_virtual_tokens, init_text=init_text, init_token_ids=list(ids))


class PromptEmbedding(nn.Module):
    """The virtual-token embeddings of one adapter."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone())  # (P, hidden)

    @property
    def num_tokens(self) -> int:
        """P, the number of virtual tokens."""
        return self.embedding.shape[0]


def initial_ids(model: nn.Module, config: PromptTuningConfig, vocab: int) -> torch.Tensor:
    """The P token ids whose embeddings start the prompt."""
    count = config.num_virtual_tokens
    ids = config.init_token_ids
    if ids is None and config.init_text is not None:
        ids = _tokenize(model, config.init_text)
    if ids is None:
        return torch.randint(0, vocab, (count,))
    bad = [i for i in ids if i >= vocab]
    if bad:
        raise ConfigError(f"PromptTuningConfig.init_token_ids {bad[:5]} are outside the vocabulary (size {vocab})")
    ids = (ids * math.ceil(count / len(ids)))[:count]  # repeat a short text, cut a long one (as PEFT)
    return torch.tensor(ids, dtype=torch.long)


def _tokenize(model: nn.Module, text: str) -> list[int]:
    source = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as err:  # no tokenizer next to the model
        raise ConfigError(
            f"PromptTuningConfig.init_text needs a tokenizer, and none was found for the model "
            f"(config.name_or_path={source!r}); build the config with "
            "PromptTuningConfig.from_text(text, tokenizer, num_virtual_tokens) or pass init_token_ids"
        ) from err
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prepend_prompt(module: nn.Module, kw: dict[str, Any], prompt: torch.Tensor) -> int:
    """Put the prompt before the input embeddings; return the original input length."""
    embeds = kw.pop("inputs_embeds", None)
    ids = kw.pop("input_ids", None)
    if embeds is None:
        if ids is None:
            raise UsageError("prompt tuning needs input_ids or inputs_embeds")
        embeds = module.get_input_embeddings()(ids)
    batch, length = embeds.shape[:2]
    virtual = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (batch, P, hidden)
    kw["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    return length


def _grow_inputs(kw: dict[str, Any], count: int, length: int) -> None:
    """Extend the per-token inputs of a call whose embeddings just gained ``count`` virtual tokens."""
    kw["attention_mask"] = vt.prepend(kw.get("attention_mask"), count, 1)
    kw["token_type_ids"] = vt.prepend(kw.get("token_type_ids"), count, 0)
    positions = kw.get("position_ids")
    if positions is not None:
        virtual = torch.arange(count, device=positions.device, dtype=positions.dtype)
        kw["position_ids"] = torch.cat([virtual.expand(positions.shape[0], -1), positions + count], dim=1)
    labels = kw.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
        kw["labels"] = vt.prepend(labels, count, -100)
    for key in ("attention_mask", "token_type_ids", "position_ids", "labels"):
        if kw.get(key) is None:
            kw.pop(key, None)


def _decoder_hooks(model: nn.Module, name: str, state: AdapterState) -> tuple[Any, Any]:
    """Hooks for decoder-only and encoder-only models: prepend, then strip the outputs."""
    names = vt.forward_parameters(model)
    cache_key = vt.cache_argument(names, vt.accepts_var_kwargs(model))
    pending = vt.PerThreadStack()  # per call in flight: (P, padded length) to strip

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        pending.items.append(None)
        if not vt.hook_applies(state, name):
            return None
        kw = vt.bind_arguments(names, args, kwargs)
        prompt: PromptEmbedding = get_store(module).adapters[name]
        count = prompt.num_tokens
        cache = kw.get(cache_key) if kw.get(cache_key) is not None else kw.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:  # the prompt is already in the cache
            kw["attention_mask"] = vt.prepend(kw.get("attention_mask"), count, 1)
            if kw.get("position_ids") is not None:
                kw["position_ids"] = kw["position_ids"] + count
            return (), kw
        length = _prepend_prompt(module, kw, prompt.embedding)
        _grow_inputs(kw, count, length)
        pending.items[-1] = (count, count + length)
        return (), kw

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        entry = pending.items.pop() if pending.items else None
        return None if entry is None else vt.strip_virtual(output, *entry)

    return pre_hook, post_hook


def _encoder_decoder_hooks(model: nn.Module, name: str, state: AdapterState) -> tuple[Any, Any]:
    """Hooks for encoder-decoder models: one on the encoder (prompt), one on the root (mask)."""
    encoder = model.get_encoder()
    enc_names = vt.forward_parameters(encoder)
    root_names = vt.forward_parameters(model)

    def encoder_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not vt.hook_applies(state, name):
            return None
        kw = vt.bind_arguments(enc_names, args, kwargs)
        prompt: PromptEmbedding = get_store(model).adapters[name]
        length = _prepend_prompt(model, kw, prompt.embedding)
        mask = kw.get("attention_mask")
        if mask is not None and mask.shape[1] == length:  # not extended by the root hook already
            kw["attention_mask"] = vt.prepend(mask, prompt.num_tokens, 1)
        return (), kw

    def root_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not vt.hook_applies(state, name):
            return None
        kw = vt.bind_arguments(root_names, args, kwargs)
        mask = kw.get("attention_mask")
        if mask is None:
            return (), kw
        count = get_store(model).adapters[name].num_tokens
        encoded = kw.get("encoder_outputs")
        if encoded is not None:
            prompted = encoded[0].shape[1]
        else:
            source = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
            prompted = source.shape[1] + count
        if mask.shape[1] + count == prompted:  # the mask (also the cross-attention mask) lacks the prompt
            kw["attention_mask"] = vt.prepend(mask, count, 1)
        return (), kw

    return encoder_hook, root_hook


@register
class PromptTuningMethod(Method):
    """Registry entry for prompt tuning; weights live in the model's adapter store."""

    name = "prompt_tuning"
    aliases = ("prompt",)
    default_lr = 0.03
    config_class = PromptTuningConfig
    layer_class = None
    input_side = True
    refuses = vt.INPUT_SIDE_REFUSALS
    peft_type = "PROMPT_TUNING"

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, state: AdapterState) -> None:
        assert isinstance(config, PromptTuningConfig)
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        if not isinstance(embeddings, nn.Embedding):
            raise ConfigError(
                f"prompt tuning needs a model with get_input_embeddings() returning an nn.Embedding; "
                f"{type(model).__name__} has {type(embeddings).__name__}"
            )
        ids = initial_ids(model, config, embeddings.num_embeddings).to(embeddings.weight.device)
        with torch.no_grad():
            init = embeddings(ids).float()  # (P, hidden), through the model's own (possibly scaled) lookup
        get_store(model, create=True).adapters[name] = PromptEmbedding(init)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            encoder_hook, root_hook = _encoder_decoder_hooks(model, name, state)
            vt.install_hooks(model, name, state, root_hook)
            vt.install_hooks(model, name, state, encoder_hook, module=model.get_encoder())
        else:
            vt.install_hooks(model, name, state, *_decoder_hooks(model, name, state))

    # --- files ------------------------------------------------------------------
    def export_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The virtual-token embeddings under PEFT's name: ``{"prompt_embeddings": (P, hidden)}``."""
        return {"prompt_embeddings": vt.stored(model, name, PromptEmbedding).embedding.detach()}

    def import_tensors(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Load ``prompt_embeddings`` (P, hidden); PEFT's encoder-decoder files hold (2P, hidden), first P used."""
        prompt = vt.stored(model, name, PromptEmbedding)
        table = vt.single_tensor(tensors, name)
        count, hidden = prompt.embedding.shape
        if table.dim() == 2 and table.shape[0] == 2 * count and table.shape[1] == hidden:
            table = table[:count]  # PEFT's decoder half, which prompt tuning never reads
        if tuple(table.shape) != (count, hidden):
            raise UsageError(
                f"adapter {name!r}: prompt_embeddings has shape {tuple(table.shape)} in the file but the model "
                f"needs ({count}, {hidden}) = (virtual tokens, hidden size); was it trained on another base model?"
            )
        with torch.no_grad():
            prompt.embedding.copy_(table.to(prompt.embedding.dtype))

    def peft_config(self, config: AdapterConfig, model: nn.Module) -> dict[str, Any]:
        """PEFT ``adapter_config.json`` content for ``config`` on ``model``."""
        assert isinstance(config, PromptTuningConfig)
        hf = model.config
        return {
            **vt.peft_common("PROMPT_TUNING", config.num_virtual_tokens),
            "token_dim": hf.hidden_size,
            "num_layers": hf.num_hidden_layers,
            "num_attention_heads": hf.num_attention_heads,
            "num_transformer_submodules": 1,  # the file holds P rows, encoder side only
            # The weights are in the file; "TEXT" would make PEFT want a tokenizer to re-initialise.
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": config.init_text,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }

    def config_from_peft(self, data: dict[str, Any]) -> PromptTuningConfig:
        """Our config for a PEFT prompt-tuning ``adapter_config.json`` (the file holds the weights)."""
        vt.check_peft_type(data, "PROMPT_TUNING")
        return PromptTuningConfig(num_virtual_tokens=int(data["num_virtual_tokens"]))

