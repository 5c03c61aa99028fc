"""The causal-LM training loss without the full logits tensor (a memory option).

A causal LM's loss normally materialises ``(batch, tokens, vocabulary)``
logits, then the log-softmax of them for the backward: for SmolLM2 (49,152
tokens) at batch 8 x 256 that is 0.4 GB each, more than all the transformer
blocks keep when they are checkpointed. ``chunked_lm_loss`` instead runs the
model with its output head passed through (the model returns the final hidden
states where it would return logits), keeps only the positions that have a
label, and computes head + cross-entropy a few hundred tokens at a time under
non-reentrant checkpointing, so the backward recomputes one chunk's logits at
a time. The loss is the one transformers computes (labels shifted left by one,
``-100`` ignored, mean over the labelled tokens), up to float summation order;
the head's matmul runs once more in the backward, and not at all for the
unlabelled positions (prompts, padding).

It is switched on per model with ``enable_chunked_lm_loss`` (training with
gradient checkpointing does that) and used where it gives the same number: a
model whose logits are exactly its output embedding's output (no logit
scaling or soft-capping).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
MARK = "_adapterkit_chunked_lm_loss"
# Logit values per chunk (64 MiB in float32): a few hundred tokens of a 50k vocabulary.
CHUNK_LOGITS = 2**24
# Config attributes that change the logits after the output head: where one is set, the full path is used.
_LOGIT_CHANGES = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling",
                  "output_multiplier_scale", "mup_width_scale")


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model in .module


def enable_chunked_lm_loss(model: nn.Module) -> bool:
    """Compute this causal LM's training loss in chunks; returns whether the model allows it.

    Models whose logits are more than the output embedding's output (soft-capping,
    logit scales) and models without an output embedding keep the full loss.
    """
    inner = _unwrapped(model)
    config = getattr(inner, "config", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    if config is None or get_head is None or get_head() is None:
        return False
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_CHANGES):
        return False
    inner.__dict__[MARK] = True
    return True


def uses_chunked_lm_loss(model: nn.Module) -> bool:
    """Whether ``enable_chunked_lm_loss`` was called on this model (or the model a DDP wrapper holds)."""
    return bool(_unwrapped(model).__dict__.get(MARK))


@contextlib.contextmanager
def _head_passes_through(head: nn.Module) -> Iterator[None]:
    """Within the block, calling ``head`` returns its input (the model then returns hidden states)."""
    own = head.__dict__.get("forward")
    head.forward = lambda hidden, *args, **kwargs: hidden
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_lm_loss(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of ``model`` on ``inputs``, computed a chunk of tokens at a time.

    Args:
        model: a causal LM (or its DDP wrapper); ``inputs`` is what its forward takes, without labels.
        inputs: model inputs (``input_ids``, ``attention_mask``, ``position_ids``...).
        labels: ``(batch, tokens)`` target ids, ``-100`` where no loss is taken, unshifted (as transformers
            takes them: position t predicts ``labels[t + 1]``).
    """
    head = _unwrapped(model).get_output_embeddings()
    with _head_passes_through(head):
        hidden = model(**inputs, use_cache=False).logits
    targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), targets.index_select(0, keep)
    step = max(1, CHUNK_LOGITS // max(1, int(_unwrapped(model).config.vocab_size)))
    total = hidden.sum().float() * 0.0  # in the graph even with no labelled token (then the mean is nan)
    for start in range(0, len(targets), step):
        total = total + checkpoint(_chunk_loss, head, hidden[start:start + step], targets[start:start + step],
                                   use_reentrant=False)
    return total / len(targets)
