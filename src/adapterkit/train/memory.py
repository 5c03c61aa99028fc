"""Gradient (activation) checkpointing that works with every adapter method, prefix tuning included.

Each transformer block's activations are recomputed in the backward instead
of kept. Two traps of the usual route are avoided:

- The reentrant flavour of ``torch.utils.checkpoint`` (the transformers
  default for years) backpropagates through a block only when one of its
  *inputs* requires a gradient; with a frozen embedding none does, so the
  adapters inside get no gradient (PEFT issues #137 and #1142). The
  non-reentrant flavour used here has no such condition.
- transformers' own checkpointed layers drop the KV cache they are given,
  which is how prefix tuning hands its prefixes to the model. The blocks are
  therefore checkpointed here, around their ``forward``, with transformers'
  flag left off, and any cache a block receives is put back as it was when
  the block first ran before the block is recomputed: the recomputation then
  appends to (and reads) exactly what the first pass did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from adapterkit.errors import UsageError
from adapterkit.runtime.blocks import transformer_blocks
from adapterkit.tasks.lm_loss import enable_chunked_lm_loss

MARK = "_adapterkit_checkpointed"


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute every transformer block's activations in the backward (non-reentrant), for any method.

    A causal LM's training loss is computed in chunks of tokens without the
    full logits (``tasks/lm_loss.py``): by default where the head is a plain
    linear layer, and after this call for any head whose output is the
    logits (a head an adapter wraps then has each chunk checkpointed).
    Applies in training mode with gradients on; evaluation and generation
    run the blocks as they are.
    Calling it twice changes nothing.

    Raises:
        UsageError: no transformer blocks were found to checkpoint.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise UsageError(f"{type(model).__name__} has no transformer blocks adapterkit can checkpoint "
                         "(no GradientCheckpointingLayer or _no_split_modules); train without "
                         "--gradient-checkpointing")
    enable_chunked_lm_loss(model)
    for block in blocks:
        if not block.__dict__.get(MARK):
            block.forward = functools.partial(_checkpointed_forward, block, block.forward)
            block.__dict__[MARK] = True


def _checkpointed_forward(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not (block.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    caches = [v for v in (*args, *kwargs.values()) if _is_cache(v)]
    states = [_cache_state(c) for c in caches]

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        for cache, state in zip(caches, states):  # a no-op the first time; the recomputation starts clean
            _restore_cache(cache, state)
        return forward(*inner_args, **inner_kwargs)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _is_cache(value: Any) -> bool:
    return isinstance(value, Cache)


def _cache_parts(cache: Any) -> list[Any]:
    parts = [getattr(cache, name) for name in ("self_attention_cache", "cross_attention_cache")
             if hasattr(cache, name)]
    return parts or [cache]


def _cache_state(cache: Any) -> tuple[list[list[dict[str, Any]]], dict | None]:
    """A shallow record of a cache (each layer's attributes; the tensors are never changed in place)."""
    layers = [[dict(vars(layer)) for layer in getattr(part, "layers", [])] for part in _cache_parts(cache)]
    updated = dict(cache.is_updated) if isinstance(getattr(cache, "is_updated", None), dict) else None
    return layers, updated


def _restore_cache(cache: Any, state: tuple[list[list[dict[str, Any]]], dict | None]) -> None:
    layers, updated = state
    for part, saved in zip(_cache_parts(cache), layers):
        for layer, attributes in zip(getattr(part, "layers", []), saved):
            vars(layer).clear()
            vars(layer).update(attributes)
    if updated is not None:
        cache.is_updated.clear()
        cache.is_updated.update(updated)


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, in MiB: ``peak_rss_mib`` (the whole process, loading included,
    where the OS reports it) and ``peak_cuda_mib`` (the most CUDA memory torch allocated) when CUDA was used."""
    peaks: dict[str, float] = {}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peaks["peak_rss_mib"] = round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 1)
    except (ImportError, OSError):  # no resource module (Windows)
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks
