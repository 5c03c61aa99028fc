"""A model's transformer blocks: the units FSDP2 shards and gradient checkpointing recomputes."""

from __future__ import annotations

import torch.nn as nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost repeated blocks of ``model``, in module order.

    Those are transformers' ``GradientCheckpointingLayer`` modules, and the
    classes named in the model's ``_no_split_modules``; a block inside another
    is not listed again. Empty for a model that names none.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers
        GradientCheckpointingLayer = ()  # type: ignore[assignment]  # noqa: N806
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if (GradientCheckpointingLayer and isinstance(module, GradientCheckpointingLayer)) \
                or type(module).__name__ in names:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found
