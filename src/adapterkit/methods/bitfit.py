"""BitFit (Ben Zaken et al., 2022): train only the biases.

Rather than unfreezing the base model's own biases (which would allow only one
BitFit adapter per model and make unload depend on remembering old values),
every module whose output ends with ``+ bias`` (``nn.Linear``, GPT-2's
``Conv1D``, ``nn.LayerNorm``) is wrapped, and each adapter holds a learned
*offset* to that bias, initialised to zero:

    y = base(x) + offset[adapter]        # offset: bias.shape, e.g. (out,)

so ``base.bias + offset`` is the fine-tuned bias. The trainable parameters are
named ``<module>.bitfit.<adapter>.bias``. Task heads are left alone (they train
with every adapter anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from adapterkit.core.architectures import model_type
from adapterkit.core.config import AdapterConfig, check_layers
from adapterkit.core.base_weight import update_base_tensor
from adapterkit.core.compose import cached_fold
from adapterkit.core.layers import (
    AdapterLayer,
    MergeError,
    WeightedTerms,
    apply_terms,
    candidate_modules,
    innermost,
    routed_sum,
)
from adapterkit.core.plan import Plan, Route
from adapterkit.core.registry import Method, register
from adapterkit.core.state import AdapterState
from adapterkit.core.targeting import LINEAR_TYPES, TargetError, head_paths, keep_layers

# Modules whose forward ends by adding ``self.bias`` (broadcast over the last dims).
BIAS_TYPES: tuple[type, ...] = LINEAR_TYPES + (nn.LayerNorm,)


@dataclass
class BitFitConfig(AdapterConfig):
    """Every bias of the base model gets a learned offset (in the blocks ``layers`` only, when given)."""

    layers: list[int] | None = None

    def validate(self) -> None:
        check_layers(self)


class BiasOffset(nn.Module):
    """One adapter's learned offset to one module's bias (a module so the name ends in ``bias``)."""

    def __init__(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))


class BitFitLayer(AdapterLayer):
    """A biased module with one learned bias offset per adapter."""

    method = "bitfit"
    containers = ("bitfit",)

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        self.bitfit = nn.ModuleDict()
        self.algebra = WeightedTerms(self)

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        """Create adapter ``name``'s zero offset, shaped like the wrapped bias."""
        device, dtype = self.adapter_device_dtype()
        self.bitfit[name] = BiasOffset(innermost(self.base_layer).bias.shape, device, dtype)

    def _offset(self, name: str) -> torch.Tensor:
        return self.bitfit[name].bias  # (out,), broadcast over the leading dims

    def _plan_delta(self, entry: "Plan | str", x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        terms = cached_fold(self, entry, self.algebra)
        return None if not terms else apply_terms(terms, self._offset, torch.zeros_like(out))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        plan = self.plan()
        if isinstance(plan, Route):
            return routed_sum(x, plan, self._plan_delta, result)
        terms = cached_fold(self, plan, self.algebra)
        return apply_terms(terms, self._offset, result) if terms else result

    @torch.no_grad()
    def fold_into_base(self, plan: "Plan | str", apply: bool = True) -> nn.Module:
        """For export: the plan's weighted offsets added to the wrapped bias."""
        terms = self.effect(plan)
        if terms and apply:
            update_base_tensor(innermost(self.base_layer), "bias", lambda b: apply_terms(terms, self._offset, b))
        return self.base_layer

    def merge(self, name: str) -> None:
        raise MergeError(
            "BitFit adapters cannot be merged: the offset stays beside the base bias so that several "
            "BitFit adapters can share one model and unload restores the original bias bit-identically "
            "(at inference it costs one addition)"
        )


@register
class BitFitMethod(Method):
    """Registry entry for BitFit."""

    name = "bitfit"
    default_lr = 0.002
    config_class = BitFitConfig
    layer_class = BitFitLayer
    not_mergeable_because = (
        "the learned offsets stay beside the base biases so that several BitFit adapters can share "
        "one model and unload restores it exactly; copy the offsets into the biases yourself for a merged model"
    )

    def target_paths(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        heads = head_paths(model)
        paths = [
            path for path, module in candidate_modules(model)
            if isinstance(innermost(module), BIAS_TYPES)
            and getattr(innermost(module), "bias", None) is not None
            and not any(path == h or path.startswith(h + ".") for h in heads)
        ]
        if not paths:
            raise TargetError(
                f"BitFit: {type(model).__name__} (model_type {model_type(model)!r}) has no bias in any "
                "Linear, Conv1D or LayerNorm module outside the task head (Llama- and T5-style models are built "
                "without biases), so BitFit has nothing to train; use lora or ia3 instead"
            )
        return keep_layers(model, paths, config.layers, "BitFit")


__all__ = ["BitFitConfig", "BitFitLayer", "BitFitMethod"]
