"""The frozen base's float32 linear layers through oneDNN on CPUs where MKL is slow.

PyTorch computes a float32 ``nn.Linear`` on x86 CPUs with MKL's ``sgemm``.
MKL picks its fast (AVX-512, AMX) code only on Intel processors; on AMD EPYC
it reports "Intel(R) Architecture processors" (``MKL_VERBOSE=1``) and runs a
generic path. On an AMD EPYC Zen 5 with 2 threads that was 156-189 GFLOP/s at
MiniLM's shapes (448 tokens x 384 x 1536), where oneDNN, which PyTorch ships
as well, reached 390-430 GFLOP/s on the same products
(``docs/benchmarks.md`` section 4, "The frozen products through oneDNN").

:func:`use_onednn_linear` routes the products of every *frozen* float32
``nn.Linear`` of a model on the CPU through oneDNN, forward and backward
(the gradient of the input is one more product with the same weight,
transposed, which oneDNN reads in place: no copy of the weight is kept).
Trainable linear layers (LoRA's A and B, a task head, a fully fine-tuned
layer), other dtypes, autocast (which already sends bf16 products to oneDNN),
quantised layers and other devices keep PyTorch's own path. The results are
the same products rounded in another order: they agree with MKL's to float32
rounding, not bit for bit (``tests/runtime/test_cpu_matmul.py``).

Which CPUs get it by default (``"auto"``): :data:`AUTO_RULE`. The environment
variable ``ADAPTERKIT_CPU_MATMUL`` (``onednn`` or ``default``) overrides that
rule for every ``"auto"`` of the process: training, evaluation, prediction and
the servers.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterkit.errors import UserError
from adapterkit.runtime.forward_patches import MARK_ONLY, patched_forwards

CpuMatmul = Literal["auto", "onednn", "default"]
CPU_MATMUL_CHOICES = ("auto", "onednn", "default")
AUTO_RULE = ("oneDNN on x86 CPUs that are not Intel's (AMD), where MKL runs its generic path; PyTorch's own "
             "(MKL) on Intel CPUs, where MKL uses AVX-512/AMX, and everywhere oneDNN is missing")
ENV_VAR = "ADAPTERKIT_CPU_MATMUL"
# oneDNN keeps each product shape's primitive in a cache of 1024 by default, and each held a few MiB here:
# a MiniLM epoch's length-grouped batches (some 200 shapes) kept ~140 MiB more resident than MKL. With 32
# the peak matched MKL's at the same speed (creating a primitive is cheap beside these products). Set before
# oneDNN's first primitive, and only where the user has not chosen a size.
PRIMITIVE_CACHE = 32
_CACHE_VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
_MARK = "_adapterkit_onednn_linear"  # set on each patched module while the context is on


class CpuMatmulError(UserError, ValueError):
    """A ``cpu_matmul`` that is not one of the choices, or oneDNN asked for where PyTorch lacks it."""


def onednn_available() -> bool:
    """Whether this PyTorch build can run float32 linear layers through oneDNN on the CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's ``vendor_id`` from ``/proc/cpuinfo`` (``AuthenticAMD``, ``GenuineIntel``, ...); ``""`` if unknown."""
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith("vendor_id")), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def resolve_cpu_matmul(choice: str | None = "auto") -> bool:
    """True when ``choice`` means oneDNN on this machine.

    ``"auto"`` (or ``None``): ``$ADAPTERKIT_CPU_MATMUL`` when set, else :data:`AUTO_RULE`.
    """
    choice = (choice or "auto").lower()
    if choice not in CPU_MATMUL_CHOICES:
        raise CpuMatmulError(f"cpu_matmul must be one of {list(CPU_MATMUL_CHOICES)}, got {choice!r}")
    if choice == "auto" and os.environ.get(ENV_VAR):
        choice = os.environ[ENV_VAR].lower()
        if choice not in CPU_MATMUL_CHOICES:
            raise CpuMatmulError(f"${ENV_VAR} must be one of {list(CPU_MATMUL_CHOICES)}, got {choice!r}")
    if choice == "default":
        return False
    if choice == "onednn":
        if not onednn_available():
            raise CpuMatmulError("cpu_matmul='onednn' needs a PyTorch built with oneDNN (mkldnn), which this one "
                                 "is not (torch.backends.mkldnn.is_available() is False); use 'default'")
        return True
    return onednn_available() and cpu_vendor() == "AuthenticAMD"


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` through oneDNN over ``x``'s rows, for a float32 CPU ``x``; no autograd.

    The result has ``x``'s leading shape and is not a view. Adapters add to a
    frozen layer's output in place: were it a view of the rows' product,
    autograd would record that add as a write into a slice and clone the
    gradient for it in the backward, and a custom Function may not return a
    view that is then written. ``_unsafe_view`` gives the shape without
    recording a view, as ``torch.matmul`` does for the same reason; nothing
    else holds the rows' product. ``weight`` may be a transposed view (oneDNN
    reads it in place). Layers that build their own float weight, such as the
    int8 base's, call this inside their own autograd function.
    """
    out = _product(x.reshape(-1, x.shape[-1]), weight, bias)
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))


def onednn_marked(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a layer that declares ``onednn_products = True`` should multiply ``x`` through oneDNN now.

    True while a :func:`use_onednn_linear` context has marked ``module``, for a
    float32 CPU input outside autocast.
    """
    return getattr(module, _MARK, False) and _input_fits(x)


class _FrozenLinear(torch.autograd.Function):
    """``x W^T + b`` with ``W`` and ``b`` frozen: the backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return onednn_product(x, weight, bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return onednn_product(grad, weight.t()), None, None  # oneDNN reads the transposed view in place


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN, for a float32 CPU ``weight`` (and ``bias``) not trained.

    Falls back to ``F.linear`` wherever that does not hold: a weight or bias
    that requires grad, another dtype or device, autocast, an empty input.
    """
    if not _onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, weight, bias)
    return onednn_product(x, weight, bias)


def _input_fits(x: torch.Tensor) -> bool:
    """A non-empty float32 CPU input outside autocast (which sends bf16 products to oneDNN itself)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0
            and not torch.is_autocast_enabled("cpu"))


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if weight.requires_grad or weight.dtype != torch.float32:
        return False
    if bias is not None and (bias.requires_grad or bias.dtype != torch.float32):
        return False
    return _input_fits(x)


def _plain_float_weight(module: nn.Linear) -> bool:
    """A dense float32 CPU weight (not a quantised tensor subclass, not a shard)."""
    weight = module.weight
    return (type(weight.data) is torch.Tensor and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.layout == torch.strided)


def _forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    return frozen_linear(input, self.weight, self.bias)


@contextlib.contextmanager
def use_onednn_linear(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the context, ``model``'s frozen float32 ``nn.Linear`` layers multiply through oneDNN; yields how many.

    Layer classes that declare ``onednn_products = True`` (the int8 base's
    ``Int8WeightOnlyLinear``) are marked instead, and their own products check
    :func:`onednn_marked`.

    Each patched layer checks at every call whether its weight is still frozen
    and its input float32 on the CPU outside autocast, and takes PyTorch's own
    path when not. Layers already patched by an enclosing call are left to it;
    every layer's own ``forward`` comes back on exit, on error as well.
    ``enabled=False`` patches nothing (yields 0). Unless set already,
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` becomes :data:`PRIMITIVE_CACHE` for the
    process (it takes effect if oneDNN has not run yet).
    """
    if not enabled:
        yield 0
        return
    os.environ.setdefault(_CACHE_VAR, str(PRIMITIVE_CACHE))
    with patched_forwards(model, _MARK, _choose) as count:
        yield count


def _choose(module: nn.Module) -> object | None:
    """What :func:`use_onednn_linear` does with ``module``: patch it, mark it, or leave it."""
    if type(module) is nn.Linear and _plain_float_weight(module):
        return _forward
    # layers that build their own float weight declare it, and check the mark themselves
    return MARK_ONLY if getattr(type(module), "onednn_products", False) else None
