"""Scale a layer's output in place, keeping one activation for backward instead of two.

``y = out * scale`` written out in autograd keeps ``out`` (for the scale's
gradient) while ``y`` lives on as the next layer's input, so two tensors of
the output's size stay alive until backward. Scaling ``out`` in place keeps
only ``y``: the scale's gradient, ``sum(grad * out)`` over all but the last
dimension, equals ``sum(grad * y) / scale``, a division on a vector only. The
quotient is exact up to rounding for any non-zero scale; a scale with an
exact zero (whose ``out`` entries cannot be recovered) takes the ordinary path.
"""

from __future__ import annotations

from typing import Any

import torch


class _ScaleInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out.mul_(scale)
        ctx.mark_dirty(out)
        ctx.save_for_backward(out, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        scaled, scale = ctx.saved_tensors
        grad_out = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * scaled).reshape(-1, scaled.shape[-1]).sum(0) / scale
        return grad_out, grad_scale


def scale_output(out: torch.Tensor, scale: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``out * scale`` (``scale`` of shape ``(features,)``), in place when ``in_place``.

    ``in_place`` says that nothing else holds ``out`` (a plain linear layer's
    fresh output). Without gradients the product is simply taken in place;
    with them, :class:`_ScaleInPlace` keeps one activation instead of two.
    """
    if not in_place or out.dtype != scale.dtype:
        return (out.to(scale.dtype) * scale).to(out.dtype)
    if not (torch.is_grad_enabled() and (out.requires_grad or scale.requires_grad)):
        return out.mul_(scale)
    if not bool((scale != 0).all()):
        return out * scale
    return _ScaleInPlace.apply(out, scale)
