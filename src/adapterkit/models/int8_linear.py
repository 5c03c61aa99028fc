"""The int8 base's linear layer: the float weight is rebuilt for each product and never kept.

torchao's ``Int8WeightOnlyConfig`` stores a linear weight as an ``Int8Tensor``
(``qdata``: int8, (out, in); ``scale``: float, (out, 1); one scale per output
row). Its own ``F.linear`` turns ``qdata`` into a float (in, out) matrix, multiplies,
and scales the product; autograd then keeps that float matrix until the backward
reaches the layer, so a step without gradient checkpointing holds a float32 copy
of every quantised weight (0.43 GB on SmolLM2-135M, more than the int8 storage
saves). :class:`Int8WeightOnlyLinear` computes the same product through an
autograd function that keeps only the int8 tensor and its scales and rebuilds
the float weight in the backward, where the input's gradient needs it.

The storage, the quantiser and everything that reads or writes the weight
(merging, export, the memory report) stay torchao's; only the product changes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from adapterkit.runtime.cpu_matmul import onednn_marked, onednn_product


def _dequantized(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``qdata * scale`` in ``dtype``, (out, in): the float weight the int8 tensor stands for."""
    return qdata.to(dtype).mul_(scale.to(dtype))


class _Int8Product(torch.autograd.Function):
    """``x @ (qdata * scale)^T + bias``; the backward rebuilds the weight instead of keeping it.

    With ``onednn`` both products go through oneDNN (``runtime/cpu_matmul.py``), otherwise through
    ``torch.matmul``. Either way the output is no view: an adapter adds to it in place.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
        ctx.save_for_backward(qdata, scale)
        ctx.onednn = onednn
        return _times_transposed(x, _dequantized(qdata, scale, x.dtype), bias, onednn)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, None]:
        qdata, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _times_transposed(grad, _dequantized(qdata, scale, grad.dtype).t(), None, ctx.onednn)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None


def _times_transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      onednn: bool) -> torch.Tensor:
    """``x @ weight^T + bias``, not a view of anything: oneDNN's product, or ``torch.matmul`` then the bias."""
    if onednn:
        return onednn_product(x, weight, None if bias is None else bias.float())
    # matmul, then the bias: F.linear with a bias returns a view of its product for a 3-d input
    out = torch.matmul(x, weight.t())
    return out if bias is None else out.add_(bias.to(out.dtype))


class Int8WeightOnlyLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao per-row int8 ``Int8Tensor`` (weight-only).

    The weight is frozen (it stores no gradient); the bias may train (BitFit),
    and gradients reach the input. Build one with :meth:`from_linear`. Within
    ``use_onednn_linear`` (the training loop and inference on AMD CPUs) the
    rebuilt float weight is multiplied by oneDNN instead of MKL.
    """

    onednn_products = True  # runtime/cpu_matmul.py marks such layers instead of patching them

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        """The same layer (the same weight and bias objects) computing through the int8 product.

        Raises ``ValueError`` when ``linear``'s weight is not a per-row, weight-only
        torchao ``Int8Tensor``, the layout the product assumes.
        """
        weight = linear.weight
        problem = _unsupported(weight)
        if problem:
            raise ValueError(f"expected a linear layer whose weight torchao's Int8WeightOnlyConfig quantised "
                             f"per row; found {problem}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if _one_row_on_cpu(x, self.bias, self.in_features):
            return _one_row_product(x, weight.qdata, weight.scale, self.bias)
        return _Int8Product.apply(x, weight.qdata, weight.scale, self.bias, onednn_marked(self, x))


def _one_row_on_cpu(x: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> bool:
    """True for one row on the CPU that needs no gradient (decoding one sequence a token at a time)."""
    if x.device.type != "cpu" or x.numel() != in_features or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not torch.compiler.is_compiling()


def _one_row_product(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (qdata * scale)^T + bias`` for one row, with ATen's int8 weight kernel (no float weight made).

    At one row, rebuilding the float weight makes the general product 5-7x slower than a float
    layer on a 2-core CPU; the kernel reads the int8 values directly and takes 0.6-0.75x of the
    general product's time (docs/quantized.md, "Serving"). From a few rows up it is the slower one.
    """
    out = torch._weight_int8pack_mm(x.reshape(1, -1), qdata, scale.reshape(-1).to(x.dtype))
    if bias is not None:
        out = out.add_(bias.to(out.dtype))
    return out.reshape(*x.shape[:-1], qdata.shape[0])


def _unsupported(weight: Any) -> str:
    """What stops ``weight`` from going through the int8 product ('' when nothing does)."""
    if type(weight).__name__ != "Int8Tensor" or not type(weight).__module__.startswith("torchao"):
        return f"a weight of type {type(weight).__name__}"
    out_features, in_features = weight.qdata.shape
    if list(weight.block_size) != [1, in_features]:
        return f"an Int8Tensor with block size {list(weight.block_size)} (per row would be [1, {in_features}])"
    if weight.act_quant_kwargs is not None or getattr(weight, "act_pre_scale", None) is not None:
        return "an Int8Tensor that also quantises or scales the activations"
    if weight.zero_point is not None and bool(weight.zero_point.any()):
        return "an Int8Tensor with nonzero zero points (asymmetric)"
    if tuple(weight.scale.shape) != (out_features, 1):
        return f"an Int8Tensor with scales of shape {tuple(weight.scale.shape)}"
    return ""
