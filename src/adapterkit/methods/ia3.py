"""(IA)^3 (Liu et al., 2022): learned vectors that rescale activations.

Keys and values are scaled at the projection's output, ``y -> l * y``; the FFN
intermediate activation is scaled at the input of the FFN output projection,
``y = W (l * x) + b``. Every vector starts at 1, so the model is unchanged at
init. Both scalings are diagonal, hence mergeable into the weight.

Names and shapes follow PEFT so that files interchange: ``ia3_l[adapter]`` is
(out_features, 1) for output scaling and (1, in_features) for feedforward
modules, for ``nn.Linear`` and GPT-2's ``Conv1D`` alike (PEFT reads Conv1D's
(in, out) weight shape as in/out features and sets ``fan_in_fan_out``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from adapterkit.core.architectures import arch_spec, modules_in_role, roles_regex
from adapterkit.core.config import AdapterConfig, ConfigError, check_layers, check_targets
from adapterkit.core.base_weight import update_base_tensor
from adapterkit.core.compose import Algebra, cached_fold, route_groups
from adapterkit.core.layers import AdapterLayer, MergeError, call_rows, innermost
from adapterkit.core.plan import Plan, Route
from adapterkit.core.registry import Method, register, wrap
from adapterkit.core.state import AdapterState
from adapterkit.core.targeting import LINEAR_TYPES, has_fresh_output, keep_layers, resolve_targets
from adapterkit.methods._inplace_scale import scale_output

DEFAULT_ROLES = ("key", "value", "ffn_out")


@dataclass
class IA3Config(AdapterConfig):
    """Which modules get (IA)^3 vectors.

    ``targets``: PEFT-style list of names / name suffixes, a regex over the full
    path, ``"all-linear"``, or None for the keys, values and FFN output
    projections of the architecture table. ``feedforward``: which targets scale
    their *input*; None means the targets that play the ``ffn_out`` role. A
    list or regex is matched as PEFT matches ``feedforward_modules`` (regex:
    full match; list: path ends with a name) so that PEFT adapters load as-is.
    """

    targets: list[str] | str | None = None
    feedforward: list[str] | str | None = None
    layers: list[int] | None = None  # block numbers that get vectors (PEFT's layers_to_transform); None: all

    def validate(self) -> None:
        check_layers(self)
        check_targets(self)
        ff = self.feedforward
        if isinstance(ff, (list, tuple)) and all(isinstance(v, str) for v in ff):
            self.feedforward = list(ff)
        elif ff is not None and not isinstance(ff, str):
            raise ConfigError(f"IA3Config.feedforward must be None, a regex string or a list of names, got {ff!r}")
        if isinstance(self.feedforward, list) and isinstance(self.targets, list):
            extra = sorted(set(self.feedforward) - set(self.targets))
            if extra:  # PEFT refuses this too
                raise ConfigError(f"IA3Config.feedforward names {extra} are not among targets {self.targets}")


def is_feedforward_name(path: str, feedforward: list[str] | str) -> bool:
    """PEFT's rule: regex full match, or the path ends with one of the names."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(name) for name in feedforward)


# What a plan means at one IA3 layer (tuples, cacheable): ("scale", input names,
# output names) multiplies by those vectors; ("chain", parts) applies parts one
# inside the other; ("average", ((part or None, weight), ...)) weights whole outputs.
Effect = tuple


class IA3Effects(Algebra[Effect]):
    """The algebra of (IA)^3: scalings multiply (Stack and Sum), Average weights the scaled outputs."""

    def __init__(self, layer: "IA3Layer") -> None:
        self.layer = layer

    def leaf(self, name: str) -> Effect | None:
        if not self.layer.applies(name):
            return None
        return ("scale", (name,), ()) if self.layer.is_feedforward[name] else ("scale", (), (name,))

    def sum(self, parts: list[Effect]) -> Effect:
        if all(p[0] == "scale" for p in parts):
            return ("scale", tuple(n for p in parts for n in p[1]), tuple(n for p in parts for n in p[2]))
        return ("chain", tuple(parts))

    stack = sum  # scalings commute: applying them in order is multiplying them

    def average(self, parts: list[tuple[Effect | None, float]]) -> Effect:
        return ("average", tuple(parts))


class IA3Layer(AdapterLayer):
    """A Linear or Conv1D layer whose output (or input) is rescaled per adapter."""

    method = "ia3"
    containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        core = innermost(base_layer)
        self.fan_in_fan_out = not isinstance(core, nn.Linear)  # Conv1D weight is (in, out)
        if isinstance(core, nn.Linear):  # in_features/out_features: a quantised weight's shape is its packing
            self.in_features, self.out_features = core.in_features, core.out_features
        else:
            rows, cols = core.weight.shape
            self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.algebra = IA3Effects(self)

    def add_adapter(self, name: str, config: AdapterConfig, feedforward: bool = False) -> None:
        """Create adapter ``name``: ones of shape (1, in) if ``feedforward`` else (out, 1)."""
        device, dtype = self.adapter_device_dtype()
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.is_feedforward[name] = feedforward

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.is_feedforward.pop(name, None)

    # --- forward ------------------------------------------------------------
    def _product(self, names: list[str]) -> torch.Tensor | None:
        """Elementwise product of the named vectors, flattened to (features,)."""
        scale = None
        for name in names:
            vector = self.ia3_l[name].flatten()
            scale = vector if scale is None else scale * vector
        return scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self.plan()

        def call(inputs: torch.Tensor) -> torch.Tensor:
            return self.base_layer(inputs, *args, **kwargs)

        if isinstance(plan, Route):
            if all(e is None or isinstance(e, str) for e in plan.entries):
                return self._routed(x, list(plan.entries), *args, **kwargs)
            return self._routed_plans(x, plan, call)
        effect = cached_fold(self, plan, self.algebra)
        return call(x) if effect is None else self._apply_effect(effect, x, call)

    def _apply_effect(self, effect: Effect, x: torch.Tensor, call: Any) -> torch.Tensor:
        """The layer output under ``effect``; ``call`` runs the wrapped layer."""
        kind = effect[0]
        if kind == "scale":
            scale_in, scale_out = self._product(list(effect[1])), self._product(list(effect[2]))  # (in,), (out,)
            if scale_in is not None:
                x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
            result = call(x)
            if scale_out is not None:
                # a plain layer's fresh output is held by nobody else: scale it in place
                result = scale_output(result, scale_out, has_fresh_output(self.base_layer))
            return result
        if kind == "chain":
            inner = call
            for part in effect[1]:
                inner = (lambda p, f: (lambda z: self._apply_effect(p, z, f)))(part, inner)
            return inner(x)
        outputs = [(call(x) if p is None else self._apply_effect(p, x, call)) * w for p, w in effect[1]]
        return sum(outputs[1:], outputs[0])

    def _routed_plans(self, x: torch.Tensor, route: Route, call: Any) -> torch.Tensor:
        """Per-example plans: each group of rows through its plan, nested layers seeing the narrowed route."""
        out = None
        state = self.state
        for entry, rows in route_groups(route, x.shape[0]).items():
            index = torch.tensor(rows, device=x.device)
            part_x = x.index_select(0, index)
            effect = None if entry is None else cached_fold(self, entry, self.algebra)
            run = (lambda e, z: (lambda: call(z) if e is None else self._apply_effect(e, z, call)))(effect, part_x)
            part = call_rows(route, rows, state, run)
            if out is None:
                out = part.new_empty((x.shape[0],) + tuple(part.shape[1:]))
            out.index_copy_(0, index, part)
        assert out is not None
        return out

    def _routed(self, x: torch.Tensor, routes: list[str | None], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Per-example adapters: one scale row per example, ones where no vector applies.

        A single base call on the whole batch (rather than :func:`routed_sum`'s
        per-group deltas) keeps any wrapper inside this one seeing the full batch.
        """
        held = set(self.adapter_names())

        def rows(feedforward: bool, size: int) -> torch.Tensor:  # (batch, size)
            ref = next(iter(self.ia3_l.values()))
            ones = torch.ones(size, device=ref.device, dtype=ref.dtype)
            return torch.stack([
                self.ia3_l[n].flatten() if n in held and self.is_feedforward[n] == feedforward else ones
                for n in routes
            ])

        def per_example(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return scale.view((like.shape[0],) + (1,) * (like.dim() - 2) + (-1,))  # (batch, 1.., features)

        scale_in = rows(True, self.in_features)
        x = (x.to(scale_in.dtype) * per_example(scale_in, x)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        scale_out = rows(False, self.out_features)
        return (result.to(scale_out.dtype) * per_example(scale_out, result)).to(result.dtype)

    @torch.no_grad()
    def fold_into_base(self, plan: "Plan | str", apply: bool = True) -> nn.Module:
        """For export: the plan's scalings folded into the wrapped weight (and bias)."""
        effect = self.effect(plan)
        if effect is None:
            return self.base_layer
        scale_in, scale_out = self._combined(effect)
        if not apply:
            return self.base_layer
        core = self.base_layer
        if scale_in is not None:  # columns of a Linear weight (out, in); rows of Conv1D (in, out)
            vec = scale_in.detach()
            per_input = vec.unsqueeze(1) if self.fan_in_fan_out else vec
            update_base_tensor(core, "weight", lambda w: w * per_input.to(w.dtype))
        if scale_out is not None:
            vec = scale_out.detach()
            per_output = vec if self.fan_in_fan_out else vec.unsqueeze(1)
            update_base_tensor(core, "weight", lambda w: w * per_output.to(w.dtype))
            if core.bias is not None:
                update_base_tensor(core, "bias", lambda b: b * vec.to(b.dtype))
        return self.base_layer

    def _combined(self, effect: Effect) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One input and one output scale vector equal to ``effect``, or a MergeError when none exists."""
        if effect[0] == "scale":
            return self._product(list(effect[1])), self._product(list(effect[2]))
        if effect[0] == "average":
            parts = [(None if p is None else self._combined(p), w) for p, w in effect[1]]
            sides = {i for part, _ in parts if part is not None for i in (0, 1) if part[i] is not None}
            if len(sides) == 1:  # all parts scale the same side: the weighted outputs are one scaling
                side = sides.pop()
                size = self.in_features if side == 0 else self.out_features
                ref = next(iter(self.ia3_l.values()))
                total = sum((part[side] if part is not None and part[side] is not None
                             else torch.ones(size, dtype=ref.dtype, device=ref.device)) * w for part, w in parts)
                return (total, None) if side == 0 else (None, total)
        raise MergeError(
            "this IA3 combination mixes input and output scalings in an Average (or nests one in a "
            "Stack), which no single weight matrix equals; fold one adapter or an Average of like ones"
        )

    # --- merging --------------------------------------------------------------
    def _oriented(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s vector shaped to scale the stored weight (Linear (out, in); Conv1D (in, out))."""
        vector = self.ia3_l[name].detach()
        return vector.T if self.fan_in_fan_out else vector

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is already merged")
        if isinstance(self.base_layer, AdapterLayer):
            raise MergeError(
                f"cannot merge IA3 adapter {name!r}: a {self.base_layer.method} wrapper sits inside it, "
                "and folding the scale into the base weight would leave that adapter's output unscaled"
            )
        if bool((self.ia3_l[name] == 0).any()):
            raise MergeError(
                f"cannot merge IA3 adapter {name!r}: its scale vector has zero entries, and unmerging "
                "divides the weight by the vector"
            )
        self._rescale(name, lambda t, v: t * v)
        self.merged_adapters.append(name)
        self.state.changed()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is not merged")
        self._rescale(name, lambda t, v: t / v)
        self.merged_adapters.remove(name)
        self.state.changed()

    def _rescale(self, name: str, op: Any) -> None:
        """Apply ``op(tensor, vector)`` to the base weight (and, for output scaling, the bias)."""
        # Linear weight (out, in): output scale (out, 1) scales rows, input scale (1, in)
        # columns. Conv1D weight (in, out): the transposed vector does the same.
        update_base_tensor(self.base_layer, "weight", lambda w: op(w, self._oriented(name).to(w.dtype)))
        if self.base_layer.bias is not None and not self.is_feedforward[name]:
            vector = self.ia3_l[name].detach().flatten()
            update_base_tensor(self.base_layer, "bias", lambda b: op(b, vector.to(b.dtype)))


@register
class IA3Method(Method):
    """Registry entry for (IA)^3."""

    name = "ia3"
    default_lr = 0.005
    config_class = IA3Config
    layer_class = IA3Layer
    peft_type = "IA3"
    mergeable = True

    def target_paths(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        assert isinstance(config, IA3Config)
        paths = resolve_targets(model, config.targets, LINEAR_TYPES, default_roles=DEFAULT_ROLES, method="IA3")
        return keep_layers(model, paths, config.layers, "IA3")

    def feedforward_paths(self, model: nn.Module, config: IA3Config, paths: list[str]) -> set[str]:
        """The targets that scale their input rather than their output."""
        if config.feedforward is None:
            return set(paths) & set(modules_in_role(model, "ffn_out"))
        return {p for p in paths if is_feedforward_name(p, config.feedforward)}

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, state: AdapterState) -> None:
        assert isinstance(config, IA3Config)
        paths = self.target_paths(model, config)
        feedforward = self.feedforward_paths(model, config, paths)
        for path in paths:
            wrap(model, path, IA3Layer, state).add_adapter(name, config, feedforward=path in feedforward)

    # --- PEFT interchange -------------------------------------------------------
    def peft_config(self, config: AdapterConfig, model: nn.Module) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for ``config`` on ``model`` (same modules, same roles)."""
        assert isinstance(config, IA3Config)
        paths = self.target_paths(model, config)
        spec = arch_spec(model)
        if config.targets is None:
            assert spec is not None  # target_paths raised otherwise
            targets: list[str] | str = roles_regex(spec, DEFAULT_ROLES)
        elif config.targets == "all-linear":
            targets = paths  # PEFT's all-linear keeps classification heads; ours doesn't
        else:
            targets = config.targets
        if config.feedforward is not None:
            feedforward: list[str] | str = config.feedforward
        elif spec is not None and "ffn_out" in spec.roles:
            feedforward = roles_regex(spec, ["ffn_out"])
        else:
            feedforward = []
        fan_in_fan_out = any(not isinstance(innermost(model.get_submodule(p)), nn.Linear) for p in paths)
        return {
            "peft_type": "IA3", "task_type": None, "inference_mode": True,
            "base_model_name_or_path": None, "revision": None,
            "target_modules": targets, "exclude_modules": None, "feedforward_modules": feedforward,
            "fan_in_fan_out": fan_in_fan_out, "modules_to_save": None, "init_ia3_weights": True,
        }

    def config_from_peft(self, data: dict[str, Any]) -> IA3Config:
        """Our config for a PEFT IA3 ``adapter_config.json``."""
        if data.get("peft_type") != "IA3":
            raise ConfigError(f"expected a PEFT config with peft_type 'IA3', got {data.get('peft_type')!r}")
        if data.get("exclude_modules"):
            raise ConfigError(
                f"PEFT IA3 config uses exclude_modules={data['exclude_modules']!r}, which adapterkit does "
                "not support; list the wanted modules in target_modules instead"
            )
        targets, feedforward = data.get("target_modules"), data.get("feedforward_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        if isinstance(feedforward, (set, tuple)):
            feedforward = sorted(feedforward)
        if isinstance(feedforward, list) and isinstance(targets, list):
            feedforward = [f for f in feedforward if f in targets]  # PEFT guarantees a subset
        return IA3Config(targets=targets, feedforward=feedforward)


__all__ = ["IA3Config", "IA3Layer", "IA3Method"]
