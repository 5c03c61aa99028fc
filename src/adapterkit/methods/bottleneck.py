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

Composition: each adapter's effect is a function of the layer output ``h``.
``Stack`` applies them in order (the next adapter sees ``h + f_a(h)``),
``Sum`` adds every ``f_i(h)`` computed from the same ``h``, ``Average`` weights
them, and ``Fuse`` lets a trained fusion (:mod:`adapterkit.methods.fusion`)
attend over the ``f_i(h)`` at every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterkit.core.architectures import arch_spec, model_type, modules_in_role
from adapterkit.core.config import AdapterConfig, check_choice, check_layers, check_positive
from adapterkit.core.compose import Algebra, CompositionError, cached_fold
from adapterkit.core.context import PerThread
from adapterkit.core.layers import (
    AdapterLayer,
    candidate_modules,
    innermost,
    routed_sum,
)
from adapterkit.core.plan import Fuse, Plan, Route
from adapterkit.core.registry import Method, register, wrap
from adapterkit.core.state import AdapterState
from adapterkit.core.targeting import TargetError, keep_layers
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
    layers: list[int] | None = None  # block numbers that get adapters; None: all

    def validate(self) -> None:
        check_layers(self)
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


# What a plan means at one bottleneck layer, as a small tree of tuples (cacheable,
# no tensors): ("leaf", name), ("stack", parts), ("sum", parts),
# ("average", ((part or None, weight), ...)), ("fuse", fusion, members).
Effect = tuple


class BottleneckEffects(Algebra[Effect]):
    """The algebra of bottleneck adapters: functions of the layer output that compose."""

    def __init__(self, layer: "BottleneckLayer") -> None:
        self.layer = layer

    def leaf(self, name: str) -> Effect | None:
        return ("leaf", name) if name in self.layer.adapter_up else None

    def stack(self, parts: list[Effect]) -> Effect:
        return ("stack", tuple(parts))

    def sum(self, parts: list[Effect]) -> Effect:
        return ("sum", tuple(parts))

    def average(self, parts: list[tuple[Effect | None, float]]) -> Effect:
        return ("average", tuple(parts))

    def fuse(self, node: Fuse, parts: list[Effect | None]) -> Effect | None:
        held = tuple(n for n, p in zip(node.items, parts) if p is not None)
        if not held:
            return None
        if node.fusion not in self.layer.adapter_fusion:
            raise CompositionError(f"{node!r}: this layer holds no fusion {node.fusion!r}")
        return ("fuse", node.fusion, held)


class BottleneckLayer(AdapterLayer):
    """A projection with bottleneck adapters (and fusions over them) added to its output."""

    method = "bottleneck"
    containers = ("adapter_down", "adapter_up", "adapter_fusion")

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_fusion = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}
        self.parallel: dict[str, bool] = {}
        self.algebra = BottleneckEffects(self)
        # The FFN block input seen by the pre-hook, consumed by the next forward;
        # per thread, since two threads may run the model at once.
        self._seen = PerThread()

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

    def add_fusion(self, name: str) -> None:
        """Create fusion ``name`` (an attention over this layer's adapter outputs)."""
        device, dtype = self.adapter_device_dtype()
        self.adapter_fusion[name] = FusionAttention(linear_features(self.base_layer)[1], device, dtype)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.non_linearity.pop(name, None)
        self.parallel.pop(name, None)

    def capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the layer's ``ffn_in``: remember the FFN block input."""
        if args:
            self._seen.block_input = args[0]

    def _delta(self, name: str, block_input: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """``up(act(down(source)))``; source is the block input (parallel) or ``out``."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        if self.parallel[name]:
            if block_input is None:
                raise RuntimeError(
                    "a parallel bottleneck adapter did not see its FFN block input: the pre-hook on the "
                    "layer's ffn_in module must run before this ffn_out module in the same forward"
                )
            source = block_input
        else:
            source = out  # (..., in_features)
        hidden = ACTIVATIONS[self.non_linearity[name]](down(source.to(down.weight.dtype)))  # (..., width)
        delta = up(hidden)  # (..., out_features)
        return delta * PARALLEL_SCALING if self.parallel[name] else delta

    # --- evaluating an effect ---------------------------------------------------
    def _apply_effect(self, effect: Effect, h: torch.Tensor, block_input: torch.Tensor | None) -> torch.Tensor:
        """The layer output after ``effect``, for base output ``h``."""
        kind = effect[0]
        if kind == "leaf":
            return h + self._delta(effect[1], block_input, h).to(h.dtype)
        if kind == "stack":
            for part in effect[1]:
                h = self._apply_effect(part, h, block_input)
            return h
        if kind in ("sum", "average"):  # every part sees the same h; their changes accumulate onto it
            out = h
            for part, weight in effect[1] if kind == "average" else ((p, 1.0) for p in effect[1]):
                if part is not None:
                    change = self._change(part, h, block_input).to(h.dtype)
                    out = out + (change if weight == 1.0 else change * weight)
            return out
        return h + self._change(effect, h, block_input).to(h.dtype)

    def _change(self, effect: Effect, h: torch.Tensor, block_input: torch.Tensor | None) -> torch.Tensor:
        """What ``effect`` adds to ``h``."""
        kind = effect[0]
        if kind == "leaf":
            return self._delta(effect[1], block_input, h)
        if kind == "sum":
            changes = [self._change(p, h, block_input) for p in effect[1]]
            return sum(changes[1:], changes[0])
        if kind == "average":
            changes = [self._change(p, h, block_input) * w for p, w in effect[1] if p is not None]
            return sum(changes[1:], changes[0])
        if kind == "fuse":
            outputs = [self._delta(n, block_input, h) for n in effect[2]]  # each (..., out)
            fusion = self.adapter_fusion[effect[1]]
            return fusion(h.to(outputs[0].dtype), outputs)
        return self._apply_effect(effect, h, block_input) - h  # a stack inside a sum or average

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        block_input = getattr(self._seen, "block_input", None)
        self._seen.block_input = None  # never keep it past this call
        plan = self.plan()
        if isinstance(plan, Route):
            if block_input is None:
                return routed_sum(x, plan, lambda e, _, out: self._plan_change(e, None, out), result)
            return routed_sum(block_input, plan, self._plan_change, result)
        effect = cached_fold(self, plan, self.algebra)
        return result if effect is None else self._apply_effect(effect, result, block_input)

    def _plan_change(self, entry: "Plan | str", block_input: torch.Tensor | None,
                     out: torch.Tensor) -> torch.Tensor | None:
        effect = cached_fold(self, entry, self.algebra)
        return None if effect is None else self._change(effect, out, block_input)


class FusionAttention(nn.Module):
    """AdapterFusion at one layer: attention from the layer output over its adapters' outputs.

    ``q = Wq h``, ``k_i = Wk o_i``; ``alpha = softmax_i(q . k_i / sqrt(d))`` and
    the layer adds ``Wv sum_i alpha_i o_i``. ``Wv`` starts as the identity and
    ``Wq``, ``Wk`` near zero, so an untrained fusion is close to the average of
    its adapters.
    """

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.query = nn.Linear(features, features, device=device, dtype=dtype)
        self.key = nn.Linear(features, features, device=device, dtype=dtype)
        self.value = nn.Linear(features, features, device=device, dtype=dtype)
        for proj in (self.query, self.key):
            nn.init.normal_(proj.weight, std=0.02)
            nn.init.zeros_(proj.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(features, device=device, dtype=dtype))
            self.value.bias.zero_()

    def forward(self, h: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The fused change for base output ``h`` (..., d) and adapter outputs [(..., d)]."""
        stacked = torch.stack(outputs, dim=-2)  # (..., n, d)
        query = self.query(h).unsqueeze(-2)  # (..., 1, d)
        keys = self.key(stacked)  # (..., n, d)
        scores = (query * keys).sum(-1) / math.sqrt(h.shape[-1])  # (..., n)
        weights = torch.softmax(scores, dim=-1).unsqueeze(-1)  # (..., n, 1)
        return self.value((weights * stacked).sum(-2))  # (..., d)


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
    fusable = True

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
        return keep_layers(model, paths, config.layers, "bottleneck")

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


__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckMethod", "FusionAttention", "PARALLEL_SCALING"]
