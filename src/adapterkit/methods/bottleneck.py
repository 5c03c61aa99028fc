"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022).

A small two-layer network ``up(act(down(h)))`` whose output is added to a
projection's output. ``down`` maps hidden -> hidden / reduction_factor and
``up`` maps back; ``up`` starts at zero, so the model is unchanged at init.

Placements (modules found through the architecture table's roles):

- ``houlsby``: after ``attn_out`` and ``ffn_out`` of every layer, ``h -> h + up(act(down(h)))``;
- ``pfeiffer``: after ``ffn_out`` only;
- ``parallel``: beside the FFN block; its input is the block's input (what the
  layer's ``ffn_in`` projection receives, captured with a forward pre-hook) and
  its output, times :data:`PARALLEL_SCALING`, is added to ``ffn_out``'s output.

Bottleneck adapters are not mergeable: the non-linearity between ``down`` and
``up`` has no equivalent weight matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterkit.core.architectures import arch_spec, model_type, modules_in_role
from adapterkit.core.config import AdapterConfig, check_choice, check_positive
from adapterkit.core.layers import (
    AdapterLayer,
    candidate_modules,
    innermost,
    routed_sum,
)
from adapterkit.core.registry import Method, register, wrap
from adapterkit.core.state import AdapterState
from adapterkit.core.targeting import TargetError
from adapterkit.errors import WrongTypeError

Placement = Literal["houlsby", "pfeiffer", "parallel"]
NonLinearity = Literal["relu", "gelu", "silu", "tanh", "swish"]

# He et al. (2022), "Towards a Unified View of Parameter-Efficient Transfer
# Learning": the parallel adapter's output is scaled by s = 4.
PARALLEL_SCALING = 4.0

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
}


@dataclass
class BottleneckConfig(AdapterConfig):
    """Where the bottleneck goes, how narrow it is, and its non-linearity."""

    placement: Placement = "houlsby"
    reduction_factor: int = 16
    non_linearity: NonLinearity = "relu"

    def validate(self) -> None:
        check_choice(self, "placement", get_args(Placement))
        check_positive(self, "reduction_factor")
        check_choice(self, "non_linearity", get_args(NonLinearity))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or GPT-2 Conv1D (weight stored as (in, out))."""
    core = innermost(module)
    if isinstance(core, nn.Linear):
        return core.in_features, core.out_features
    weight = getattr(core, "weight", None)
    if weight is None or weight.dim() != 2:
        raise WrongTypeError(f"bottleneck adapters sit after linear projections, got {type(core).__name__}")
    return int(weight.shape[0]), int(weight.shape[1])  # Conv1D: (in, out)


class BottleneckLayer(AdapterLayer):
    """A projection with bottleneck adapters added to its output."""

    method = "bottleneck"
    containers = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}
        self.parallel: dict[str, bool] = {}
        # The FFN block input seen by the pre-hook, consumed by the next forward.
        self.block_input: torch.Tensor | None = None

    def add_adapter(self, name: str, config: AdapterConfig, in_features: int | None = None) -> None:
        """Create adapter ``name``; ``in_features`` is the FFN block width for ``parallel``."""
        assert isinstance(config, BottleneckConfig)
        device, dtype = self.adapter_device_dtype()
        out_features = linear_features(self.base_layer)[1]
        in_features = in_features or out_features
        width = max(1, out_features // config.reduction_factor)
        down = nn.Linear(in_features, width, device=device, dtype=dtype)
        up = nn.Linear(width, out_features, device=device, dtype=dtype)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # zero up-projection: output unchanged at init
        nn.init.zeros_(up.bias)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.non_linearity[name] = config.non_linearity
        self.parallel[name] = config.placement == "parallel"

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.non_linearity.pop(name, None)
        self.parallel.pop(name, None)

    def capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the layer's ``ffn_in``: remember the FFN block input."""
        if args:
            self.block_input = args[0]

    def _delta(self, name: str, block_input: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``up(act(down(source)))``; source is the block input (parallel) or ``out``."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        source = block_input if self.parallel[name] else out  # (..., in_features)
        hidden = ACTIVATIONS[self.non_linearity[name]](down(source.to(down.weight.dtype)))  # (..., width)
        delta = up(hidden)  # (..., out_features)
        return delta * PARALLEL_SCALING if self.parallel[name] else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        block_input, self.block_input = self.block_input, None  # never keep it past this call
        routes = self.routing(x.shape[0])
        used = set(routes or []) if routes is not None else set(self.active_adapters())
        if block_input is None and any(self.parallel.get(n, False) for n in used):
            raise RuntimeError(
                "a parallel bottleneck adapter did not see its FFN block input: the pre-hook on the "
                "layer's ffn_in module must run before this ffn_out module in the same forward"
            )
        source = block_input if block_input is not None else x
        if routes is not None:
            return routed_sum(source, routes, self.adapter_names(), self._delta, result)
        # Several active adapters each add their output computed from the base output.
        for name in self.active_adapters():
            result = result + self._delta(name, source, result).to(result.dtype)
        return result


def _common_prefix(a: str, b: str) -> int:
    """Number of leading dotted components ``a`` and ``b`` share."""
    count = 0
    for left, right in zip(a.split("."), b.split(".")):
        if left != right:
            break
        count += 1
    return count


def same_layer(path: str, candidates: list[str]) -> str:
    """The candidate sharing the longest path prefix with ``path`` (first one on ties)."""
    return max(candidates, key=lambda c: _common_prefix(path, c))


@register
class BottleneckMethod(Method):
    """Registry entry for bottleneck adapters (Houlsby, Pfeiffer, parallel)."""

    name = "bottleneck"
    config_class = BottleneckConfig
    layer_class = BottleneckLayer

    def target_paths(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        assert isinstance(config, BottleneckConfig)
        roles = ("attn_out", "ffn_out") if config.placement == "houlsby" else ("ffn_out",)
        wanted = {p for role in roles for p in modules_in_role(model, role)}
        paths = [p for p, _ in candidate_modules(model) if p in wanted]
        if not paths:
            raise TargetError(
                f"bottleneck: placement {config.placement!r} needs the {'/'.join(roles)} modules from "
                f"the architecture table, but model_type {model_type(model)!r} "
                f"{'has none' if arch_spec(model) else 'is not in the table'}; use a method with "
                "explicit targets (lora, ia3) or add a row to core/architectures.py"
            )
        return paths

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, state: AdapterState) -> None:
        assert isinstance(config, BottleneckConfig)
        if config.placement != "parallel":
            super().attach(model, name, config, state)
            return
        sources = modules_in_role(model, "ffn_in")
        if not sources:
            raise TargetError(f"bottleneck: parallel placement needs ffn_in modules; {model_type(model)!r} has none")
        for path in self.target_paths(model, config):
            # Hook the innermost module so that wrappers added or pruned later don't lose it.
            source = innermost(model.get_submodule(same_layer(path, sources)))
            layer = wrap(model, path, BottleneckLayer, state)
            layer.add_adapter(name, config, in_features=linear_features(source)[0])
            handle = source.register_forward_pre_hook(layer.capture)
            state.cleanups.setdefault(name, []).append(handle.remove)


__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckMethod", "PARALLEL_SCALING"]
