"""A quantised frozen base (QLoRA-style): the base's linear layers stored in int8 or 4 bits.

``quantize_model(model, "int8" | "nf4" | "fp4")`` replaces the storage of
every linear layer of the base except the task head and the output
embedding; embeddings, norms and heads stay in float. Adapters then wrap the
quantised layers as they wrap float ones, and train in float32.

Backends (internal; both run on the CPU with torch 2.13 and use their GPU
kernels on a GPU):

- ``int8``: torchao's ``Int8WeightOnlyConfig`` (per-channel symmetric int8
  weights, float activations). The weight is a torchao tensor subclass; the
  layer becomes an :class:`~adapterkit.models.int8_linear.Int8WeightOnlyLinear`
  (an ``nn.Linear``) that rebuilds the float weight for each product, forward
  and backward, instead of letting autograd keep a float copy of it, and
  gradients reach the input through that dequantised weight.
- ``nf4`` / ``fp4``: bitsandbytes' ``Linear4bit`` (block size 64, double
  quantisation of the scales), computing in float32.

Layers are quantised one at a time, and the pages each replaced float weight
held of a memory-mapped checkpoint are handed back right after
(``runtime/file_pages.py``), so loading never holds the float checkpoint beside
its quantised copy.

Merging into a quantised base goes through ``core/base_weight.py``: the
accessors registered here dequantise on read and requantise on write.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from adapterkit.core.base_weight import BaseTensorAccess, TensorName, register_base_access
from adapterkit.core.serialization import QUANTIZATION_ATTR
from adapterkit.errors import UserError
from adapterkit.runtime.file_pages import file_backed_ranges, release_file_pages

Scheme = Literal["int8", "nf4", "fp4"]
SCHEMES = ("int8", "nf4", "fp4")


class QuantizationError(UserError, RuntimeError):
    """A quantisation scheme that is unknown, or whose backend cannot run here."""


@dataclass(frozen=True)
class Quantization:
    """How a base is stored: the scheme, its backend and the layers it covers."""

    scheme: str
    backend: str
    layers: int
    double_quant: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``adapterkit.json`` and run reports)."""
        return asdict(self)


def model_quantization(model: nn.Module) -> Quantization | None:
    """How ``model``'s base is quantised (``None``: a float base)."""
    return getattr(model, QUANTIZATION_ATTR, None)


def quantize_model(model: nn.Module, scheme: str) -> Quantization:
    """Store the base's linear layers (not the head, embeddings or norms) in ``scheme``, in place.

    Call it before adding adapters. Raises ``QuantizationError`` for an unknown
    scheme, a model that is already quantised or already carries adapters, or
    a backend that is not installed or cannot run on this machine.
    """
    if scheme not in SCHEMES:
        raise QuantizationError(f"quantize must be one of {list(SCHEMES)} (or None for a float base), got {scheme!r}")
    if model_quantization(model) is not None:
        raise QuantizationError(f"this model is already quantised ({model_quantization(model).scheme})")
    from adapterkit.core.state import has_state

    if has_state(model):
        raise QuantizationError("quantise the base before adding adapters (load_model(..., quantize=...))")
    _register()
    paths = quantizable_linears(model)
    if not paths:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear layers outside its head to quantise "
                                "(GPT-2-style Conv1D projections are not supported)")
    if scheme == "int8":
        info = _int8(model, paths)
    else:
        info = _four_bit(model, paths, scheme)
    _own_float_tensors(model)
    _return_freed_memory()
    setattr(model, QUANTIZATION_ATTR, info)
    return info


def _return_freed_memory() -> None:
    """Hand the float weights' freed heap memory back to the system (glibc keeps it otherwise); best effort."""
    import gc

    from adapterkit.runtime.allocator import return_freed_memory

    gc.collect()
    return_freed_memory()


def _own_float_tensors(model: nn.Module) -> None:
    """Copy the tensors left in float (embeddings, norms, head) out of the checkpoint file's memory map.

    transformers loads weights as views of the memory-mapped safetensors file; the pages a
    view was read from stay resident while any view of the file lives. Quantising reads every
    weight, so without this the float checkpoint would stay in memory beside its quantised copy.
    Tied parameters stay tied (the Parameter object is shared; its data is replaced once).
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for key, tensor in tensors.items():
                    if tensor is None or id(tensor) in seen or not tensor.is_floating_point() or _is_torchao(tensor):
                        continue
                    seen.add(id(tensor))
                    if type(tensor) is nn.Parameter:
                        tensor.data = tensor.data.clone()
                    elif type(tensor) is torch.Tensor:
                        tensors[key] = tensor.clone()


def quantizable_linears(model: nn.Module) -> list[str]:
    """Paths of the ``nn.Linear`` modules of the base: every one but the task head and output embedding."""
    from adapterkit.core.targeting import head_paths

    heads = head_paths(model)
    inside_head = lambda path: any(path == h or path.startswith(h + ".") for h in heads)  # noqa: E731
    # transformers names modules whose weights must stay float (T5's ``wo``: its FFN casts the
    # hidden states to that weight's dtype, which for a 4-bit weight is uint8)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    kept = lambda path: any(part in keep for part in path.split("."))  # noqa: E731
    return [path for path, module in model.named_modules()
            if type(module) is nn.Linear and not inside_head(path) and not kept(path)]


def _int8(model: nn.Module, paths: list[str]) -> Quantization:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise QuantizationError(f"quantize='int8' needs torchao (pip install 'torchao==0.18.*'): {err}") from None
    from adapterkit.core.layers import set_submodule
    from adapterkit.models.int8_linear import Int8WeightOnlyLinear

    mapped = file_backed_ranges()
    for path in paths:  # one layer at a time, so each float weight's file pages go before the next is read
        linear = model.get_submodule(path)
        float_weight = linear.weight
        quantize_(linear, Int8WeightOnlyConfig())  # in place: torchao stores the weight
        # the product keeps no float copy of it (models/int8_linear.py)
        set_submodule(model, path, Int8WeightOnlyLinear.from_linear(linear))
        release_file_pages(float_weight, mapped)
    return Quantization(scheme="int8", backend="torchao Int8WeightOnlyConfig", layers=len(paths))


# NF4/FP4 keep a Gaussian weight within ~10% (relative Frobenius error); beyond this a layer's
# quantisation went wrong. bitsandbytes 0.50's CPU kernels do that for small tensors (rows shorter
# than a 64-value block, or double quantisation over fewer than 256 blocks); real models' layers are
# far larger.
FOUR_BIT_SANITY = 0.2


def _four_bit(model: nn.Module, paths: list[str], scheme: str) -> Quantization:
    try:
        from bitsandbytes.nn import Linear4bit  # noqa: F401
    except ImportError as err:
        raise QuantizationError(f"quantize={scheme!r} needs bitsandbytes (pip install 'bitsandbytes==0.50.*'); "
                                f"int8 needs torchao instead: {err}") from None
    from adapterkit.core.layers import set_submodule

    mapped = file_backed_ranges()
    done, kept_float, single = 0, [], 0
    for path in paths:
        old = model.get_submodule(path)
        new = None
        for double in (True, False):  # double quantisation first, as QLoRA does
            candidate = _four_bit_layer(old, scheme, double)
            if _relative_error(candidate, old.weight) <= FOUR_BIT_SANITY:
                new, single = candidate, single + (not double)
                break
        if new is None:
            kept_float.append(path)
            continue
        set_submodule(model, path, new)
        release_file_pages(old.weight, mapped)  # its float pages go before the next layer's are read
        done += 1
    if kept_float:
        warnings.warn(f"{len(kept_float)} linear layer(s) stay in float: bitsandbytes could not quantise them to "
                      f"{scheme} within {FOUR_BIT_SANITY:.0%} relative error here (e.g. {kept_float[0]})",
                      stacklevel=3)
    if not done:
        raise QuantizationError(f"bitsandbytes could not quantise any layer of {type(model).__name__} to {scheme} "
                                "on this machine; use quantize='int8' (torchao) or a float base")
    return Quantization(scheme=scheme, backend="bitsandbytes Linear4bit", layers=done, double_quant=single == 0)


def _four_bit_layer(old: nn.Linear, scheme: str, double: bool) -> nn.Module:
    from bitsandbytes.nn import Linear4bit, Params4bit

    device = old.weight.device
    new = Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=torch.float32,
                     compress_statistics=double, quant_type=scheme)
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight into a bf16 layout at the first
    # inference forward: other numbers than training computes, and a layout nothing else reads.
    new.support_avx512bf16_for_cpu = False
    new.weight = Params4bit(old.weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                            compress_statistics=double, quant_type=scheme)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
    try:
        return new.to(device)  # bitsandbytes quantises when the weight is moved to its device
    except (RuntimeError, NotImplementedError) as err:
        raise QuantizationError(f"bitsandbytes cannot quantise to {scheme} on {device} here ({err}); "
                                "use quantize='int8' (torchao) or a float base") from None


def _relative_error(module: nn.Module, weight: torch.Tensor) -> float:
    stored = FourBitAccess().read(module, "weight")
    reference = weight.detach().to(stored.device, torch.float32)
    return float((stored - reference).norm() / reference.norm().clamp_min(1e-30))


# --- merging: dequantise on read, requantise on write ------------------------------------------

class FourBitAccess(BaseTensorAccess):
    """A bitsandbytes ``Linear4bit``'s weight as a float tensor; writing requantises it."""

    def read(self, module: nn.Module, which: TensorName) -> torch.Tensor:
        if which == "bias":
            return super().read(module, which)
        from bitsandbytes.functional import dequantize_4bit

        weight = module.weight
        return dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)

    def write(self, module: nn.Module, which: TensorName, value: torch.Tensor) -> None:
        if which == "bias":
            return super().write(module, which, value)
        from bitsandbytes.nn import Params4bit

        old = module.weight
        device = old.device
        for double in dict.fromkeys((old.compress_statistics, False)):  # as it was; else plain (see FOUR_BIT_SANITY)
            fresh = Params4bit(value.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                               compress_statistics=double, quant_type=old.quant_type, blocksize=old.blocksize)
            module.weight = fresh.to(device)
            module.support_avx512bf16_for_cpu = False
            stored = self.read(module, "weight")
            if float((stored - value).norm() / value.norm().clamp_min(1e-30)) <= FOUR_BIT_SANITY:
                break
        _record_requantization(module, value, stored)


class Int8Access(BaseTensorAccess):
    """A torchao int8 weight as a float tensor; writing requantises it (per channel, symmetric)."""

    def read(self, module: nn.Module, which: TensorName) -> torch.Tensor:
        tensor = getattr(module, which)
        if which == "weight" and _is_torchao(tensor):
            return tensor.dequantize().to(torch.float32)
        return super().read(module, which)

    def write(self, module: nn.Module, which: TensorName, value: torch.Tensor) -> None:
        if which != "weight" or not _is_torchao(module.weight):
            return super().write(module, which, value)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        plain = nn.Linear(module.in_features, module.out_features, bias=False, device=value.device)
        with torch.no_grad():
            plain.weight.copy_(value.to(torch.float32))
        holder = nn.Sequential(plain)
        quantize_(holder, Int8WeightOnlyConfig())
        module.weight = nn.Parameter(holder[0].weight.data, requires_grad=False)
        _record_requantization(module, value, self.read(module, "weight"))


REQUANT_ATTR = "_adapterkit_requantization"


def _record_requantization(module: nn.Module, wanted: torch.Tensor, stored: torch.Tensor) -> None:
    """Keep on ``module`` how far its requantised weight is from the float weight it was asked to hold."""
    wanted = wanted.to(torch.float32)
    error = (stored.to(torch.float32) - wanted)
    module.__dict__[REQUANT_ATTR] = (float(error.norm() / wanted.norm().clamp_min(1e-30)),
                                     float(error.abs().max() / wanted.abs().max().clamp_min(1e-30)))


def requantization_report(model: nn.Module) -> dict[str, float] | None:
    """What requantising merged weights cost, over the layers written since the last report (then forgotten).

    ``mean_relative_error``: the mean over layers of ||stored - merged||_F / ||merged||_F;
    ``max_relative_error``: the largest |stored - merged| over the layer's largest |merged|;
    ``layers``: how many were requantised. ``None`` when no quantised weight was written.
    """
    records = [m.__dict__.pop(REQUANT_ATTR) for m in model.modules() if REQUANT_ATTR in m.__dict__]
    if not records:
        return None
    return {"layers": len(records), "mean_relative_error": sum(r[0] for r in records) / len(records),
            "max_relative_error": max(r[1] for r in records)}


def _is_torchao(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and type(tensor).__module__.startswith("torchao")


def _register() -> None:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        Linear4bit = None  # noqa: N806
    from adapterkit.core.targeting import register_fresh_output
    from adapterkit.models.int8_linear import Int8WeightOnlyLinear

    if Linear4bit is not None:
        register_base_access(Linear4bit, FourBitAccess())
    register_base_access(nn.Linear, Int8Access())  # plain weights pass straight through it
    register_fresh_output(Int8WeightOnlyLinear)  # its autograd function keeps the int8 weight, not the output


def is_quantized_module(module: nn.Module) -> bool:
    """True for a linear layer whose weight is stored quantised (4-bit or torchao int8)."""
    if not isinstance(module, nn.Linear):  # adapter wrappers show their base's weight; they are not it
        return False
    weight = getattr(module, "weight", None)
    return type(weight).__name__ == "Params4bit" or _is_torchao(weight)
