"""Gradient checkpointing that works with every adapter method.

Activations of each transformer block are recomputed in the backward
instead of kept. The reentrant flavour of ``torch.utils.checkpoint`` (the
transformers default for years) only backpropagates through a block when one
of its *inputs* requires a gradient; with a frozen embedding no input does,
so an adapter inside the blocks silently gets no gradient (PEFT issues #137
and #1142; PEFT's answer is ``enable_input_require_grads``). The
non-reentrant flavour has no such condition, so it is the one used here,
and it also works with prompt/prefix tokens and nested adapter wrappers.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from adapterkit.errors import UsageError


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block's activations in the backward (non-reentrant), for any adapter method.

    Raises:
        UsageError: the model's architecture does not support checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"{type(model).__name__} does not support gradient checkpointing; "
                         "train without --gradient-checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache is pointless in training and clashes with recomputation
