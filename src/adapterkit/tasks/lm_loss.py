"""The causal-LM training loss without the full logits tensor: less memory, and faster.

A causal LM's loss normally materialises ``(batch, tokens, vocabulary)``
logits, then the log-softmax of them for the backward: for SmolLM2 (49,152
tokens) at batch 8 x 256 that is 0.4 GB each, more than all the transformer
blocks keep when they are checkpointed. ``chunked_lm_loss`` instead runs the
model with its output head passed through (the model returns the final hidden
states where it would return logits), keeps only the positions that have a
label, and computes head + cross-entropy a few hundred tokens at a time. The
loss is the one transformers computes (labels shifted left by one, ``-100``
ignored, mean over the labelled tokens), up to float summation order; the
head's matmul never runs for the unlabelled positions (prompts, padding).

Where the output head is a plain ``nn.Linear`` (every causal LM adapterkit
packages, tied or not), each chunk's gradient is taken while its logits are at
hand (``_HeadCrossEntropy``): the softmax minus the one-hot target, multiplied
back through the head's weight, is what the backward would compute, so the
forward keeps only that ``(tokens, hidden)`` gradient (and the head's own
gradients, where they train) and the backward scales it. The head's matmul
runs twice per token, as in the full loss, and the softmax's passes over the
logits stay within a chunk: on CPUs that step is about 1.6x as fast as the
full loss's and 2x as fast as the checkpointed chunks'. Any other head (one
wrapped by an adapter, say) is run a chunk at a time under non-reentrant
checkpointing, so the backward recomputes one chunk's logits.

It is used where it gives the same number: a model whose logits are exactly
its output embedding's output (no logit scaling or soft-capping). With a plain
linear head it is the default of causal-LM training; other heads take it when
``enable_chunked_lm_loss`` is called (training with gradient checkpointing
does that), as it then costs a third head product to save the memory.
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


def _logits_are_the_heads(inner: nn.Module) -> bool:
    """The model has an output embedding and returns its output as the logits, unscaled and uncapped."""
    config = getattr(inner, "config", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    if config is None or get_head is None or get_head() is None:
        return False
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_CHANGES)


def enable_chunked_lm_loss(model: nn.Module) -> bool:
    """Compute this causal LM's training loss in chunks whatever its head; returns whether the model allows it.

    Models whose logits are more than the output embedding's output (soft-capping,
    logit scales) and models without an output embedding keep the full loss.
    A plain linear head needs no call: its loss is chunked by default.
    """
    inner = _unwrapped(model)
    if not _logits_are_the_heads(inner):
        return False
    inner.__dict__[MARK] = True
    return True


def uses_chunked_lm_loss(model: nn.Module) -> bool:
    """Whether training computes this model's (or the model a DDP wrapper holds) loss in chunks.

    True after ``enable_chunked_lm_loss``, and by default for a model whose logits are
    exactly the output of a plain ``nn.Linear`` head (the fused, faster path).
    """
    inner = _unwrapped(model)
    if inner.__dict__.get(MARK):
        return True
    return _logits_are_the_heads(inner) and _plain_linear(inner.get_output_embeddings())


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


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``linear(hidden, weight, bias)``, its gradients taken in the forward per chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, step: int) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        device = hidden.device.type
        # the dtype autocast would run the head's matmul in; the weight is cast once, not once per chunk
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        wide = torch.promote_types(dtype, torch.float32)  # softmax and loss: float32 at least
        total = torch.zeros((), dtype=wide, device=hidden.device)
        grad_weight = torch.zeros_like(weight, dtype=wide) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=wide) if need_bias else None
        with torch.autocast(device, enabled=False):
            weight_c, bias_c = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, len(targets), step):
                part, wanted = hidden[start:start + step].to(dtype), targets[start:start + step]
                scores = F.linear(part, weight_c, bias_c).to(wide)
                picked = scores.gather(1, wanted[:, None]).squeeze(1)
                # softmax over the scores in place (no longer needed): three passes over the chunk, where
                # logsumexp and a softmax after it take about three times as long on CPUs
                peak = scores.amax(dim=1, keepdim=True)
                probs = scores.sub_(peak).exp_()
                sums = probs.sum(dim=1, keepdim=True)
                total += (peak + sums.log()).sum() - picked.sum()
                if not (need_hidden or need_weight or need_bias):
                    del scores, probs
                    continue
                probs.div_(sums)  # d(loss)/d(logits) = softmax - one-hot
                probs[torch.arange(len(wanted), device=wanted.device), wanted] -= 1.0
                grad_logits = probs.to(dtype)
                if need_hidden:
                    grad_hidden[start:start + step] = grad_logits @ weight_c
                if need_weight:
                    grad_weight += grad_logits.t() @ part
                if need_bias:
                    grad_bias += probs.sum(0)
                # the next chunk's logits would otherwise be made while this chunk's are still held
                del scores, probs, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
                None, None)


def _plain_linear(head: nn.Module) -> bool:
    """A head whose output is exactly ``F.linear(x, head.weight, head.bias)``: no subclass, no hooks."""
    return (type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


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
    if _plain_linear(head):  # its output is in the graph even with no labelled token (then the mean is nan)
        return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, step) / len(targets)
    total = hidden.sum().float() * 0.0  # in the graph even with no labelled token (then the mean is nan)
    for start in range(0, len(targets), step):
        total = total + checkpoint(_chunk_loss, head, hidden[start:start + step], targets[start:start + step],
                                   use_reentrant=False)
    return total / len(targets)
