"""``merge_adapters``: a weighted combination of adapters, added as a new, ordinary adapter.

The result is an adapter like any other (saved by ``save_adapter`` in PEFT's
format where the method has one, loaded by PEFT, trained further), so merging
is done once and costs nothing at inference, unlike a run-time plan.

What each method can be merged by, and why (see docs/merging-methods.md):

- LoRA: ``cat`` (exact), ``svd`` (best rank-r approximation of the exact
  sum), ``linear`` (PEFT's: A's and B's summed separately, inexact for more
  than one adapter), and ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune`` on the full updates, factorised by SVD. Not DoRA.
- IA3: ``linear`` (the weighted sum of the vectors, as PEFT does).
- Bottleneck: ``cat`` (hidden units side by side, exact).
- BitFit: ``linear`` / ``cat`` (the weighted sum of the offsets, exact).

Task heads: the merged adapter's head is the weighted average of the
adapters' heads, the weights divided by their sum.

The rules live here, keyed by method name; layers are found through the
registry (``get_method(name).layer_class``) and read by their documented
attributes, so nothing here imports a method module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn as nn

from adapterkit.core import merge_math
from adapterkit.core.config import AdapterConfig
from adapterkit.core.heads import HeadLayer
from adapterkit.core.layers import AdapterLayer, MergeError, adapter_layers, find_layer
from adapterkit.core.state import get_state
from adapterkit.core.lifecycle import (
    add_adapter,
    delete_adapter,
    get_adapter_config,
    list_adapters,
    set_active,
)
from adapterkit.core.registry import WRAPPER_COMPONENT, get_config_class, get_method
from adapterkit.errors import UnknownNameError, UsageError, UserError, WrongTypeError

MergeMethod = Literal["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
MajoritySign = merge_math.MajoritySign
MERGE_METHODS: tuple[str, ...] = get_args(MergeMethod)
# Methods whose result is an SVD of a full update (they take ``rank`` and report the error).
SVD_METHODS = frozenset({"svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
DENSITY_METHODS = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_adapters` made.

    ``rank``: the new LoRA adapter's rank (None for other methods).
    ``worst_error`` / ``mean_error``: over the merged modules, the relative
    Frobenius error ``||dW - target|| / ||target||`` of the new adapter's
    update against the exact target update (the weighted sum, or the
    TIES/DARE/pruned combination); None where the merge is exact by
    construction (``cat``, IA3, bottleneck, BitFit). ``modules``: how many
    modules the new adapter changes.
    """

    name: str
    method: str
    rank: int | None = None
    worst_error: float | None = None
    mean_error: float | None = None
    modules: int = 0


@dataclass(frozen=True)
class _Options:
    method: str
    rank: int | None
    density: float
    majority_sign: MajoritySign
    generator: torch.Generator | None


@dataclass
class _Built:
    """The new adapter, before it exists: its config and every tensor to write into it."""

    config: AdapterConfig
    layer_class: type[AdapterLayer]
    writes: dict[str, dict[str, torch.Tensor]]  # module path -> parameter name in the layer -> value
    rank: int | None = None
    errors: list[float] = field(default_factory=list)


def merge_adapters(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: MergeMethod = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: MajoritySign = "total",
    seed: int | None = None,
) -> MergeReport:
    """Add adapter ``name``, the combination ``sum w_i * adapter_i`` of existing adapters.

    The model's active adapters stay as they were; activate the new one with
    ``set_active(model, name)``.

    Args:
        model: A model carrying the adapters to merge.
        weights: Adapter name -> weight; a negative weight subtracts.
        name: Name of the new adapter (not yet taken).
        method: ``cat`` (exact; LoRA rank = sum of ranks), ``svd`` (truncated SVD
            of the exact sum), ``linear`` (PEFT's separate A/B sums for LoRA;
            the vector sum for IA3), ``ties``, ``dare_linear``, ``dare_ties``,
            ``magnitude_prune`` (LoRA only; applied to the full updates,
            then factorised by SVD). Which methods fit which adapters: the
            module docstring.
        rank: Rank of the result for the SVD-based methods (default: the
            largest input rank).
        density: Fraction of entries kept, in (0, 1]; required by ties,
            dare_* and magnitude_prune.
        majority_sign: How TIES elects each entry's sign: ``total`` (sign of
            the sum) or ``frequency`` (sign of the majority).
        seed: Seed of DARE's random drops (None: torch's global generator).

    Returns:
        A :class:`MergeReport` with the rank and, for approximate merges, the error.

    Raises:
        UnknownNameError: an adapter in ``weights`` is not on the model.
        UsageError: empty weights, a taken name, or a bad option value.
        MergeError: the adapters cannot be merged by ``method`` (the message says why).
    """
    options = _check_arguments(model, weights, name, method, rank, density, majority_sign, seed)
    configs = {n: get_adapter_config(model, n) for n in weights}
    kind = _one_method(configs)
    if kind not in _RULES:
        why = _REFUSALS.get(kind, "adapterkit has no rule for combining their weights")
        raise MergeError(f"{kind} adapters cannot be merged into one: {why}")
    build, allowed, why = _RULES[kind]
    if method not in allowed:
        raise MergeError(f"{kind} adapters cannot be merged with method={method!r}, only with "
                         f"{' or '.join(repr(m) for m in allowed)}: {why}")
    built = build(model, name, dict(weights), configs, options)
    heads = _averaged_heads(model, weights)
    previous = get_state(model).default  # the default plan, restored whole (an Average stays one)
    add_adapter(model, name, built.config, train_head=bool(heads))
    try:
        with torch.no_grad():
            _write(model, name, built.layer_class, built.writes)
            _write_heads(model, name, heads)
    except BaseException:
        delete_adapter(model, name)
        set_active(model, previous)
        raise
    set_active(model, previous)
    errors = built.errors
    return MergeReport(name=name, method=method, rank=built.rank,
                       worst_error=max(errors) if errors else None,
                       mean_error=sum(errors) / len(errors) if errors else None,
                       modules=len(built.writes))


# --- arguments -------------------------------------------------------------------------
def _check_arguments(model: nn.Module, weights: Mapping[str, float], name: str, method: str,
                     rank: int | None, density: float | None, majority_sign: str,
                     seed: int | None) -> _Options:
    if not isinstance(weights, Mapping):
        raise WrongTypeError(f"weights must be a dict of adapter name -> weight, got {type(weights).__name__}")
    existing = list_adapters(model)
    if not weights:
        raise UsageError(f"weights is empty; give at least one adapter and its weight, e.g. "
                         f"{{{existing[0] if existing else 'a'!r}: 1.0}}")
    unknown = [n for n in weights if n not in existing]
    if unknown:
        raise UnknownNameError(f"no adapter called {unknown[0]!r} to merge; the model has {existing}")
    for adapter, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UsageError(f"the weight of {adapter!r} must be a finite number, got {weight!r}")
    if not isinstance(name, str) or not name or "." in name:
        raise UsageError(f"the merged adapter's name must be a non-empty string without dots, got {name!r}")
    if name in existing:
        raise UsageError(f"model already has an adapter called {name!r}; pick another name for the merge "
                         "or delete_adapter() the old one")
    if method not in MERGE_METHODS:
        raise UsageError(f"method must be one of {list(MERGE_METHODS)}, got {method!r}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise UsageError(f"rank must be a positive integer, got {rank!r}")
        if method not in SVD_METHODS:
            raise UsageError(f"rank applies to the SVD-based methods {sorted(SVD_METHODS)}, not to "
                             f"{method!r} (cat's rank is the sum of the ranks, linear's their common rank)")
    if method in DENSITY_METHODS:
        if density is None:
            raise UsageError(f"method {method!r} needs density= (the fraction of entries kept, in (0, 1])")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise UsageError(f"density must be a number in (0, 1], got {density!r}")
    elif density is not None:
        raise UsageError(f"density applies to {sorted(DENSITY_METHODS)}, not to {method!r}; leave it out")
    if majority_sign not in get_args(MajoritySign):
        raise UsageError(f"majority_sign must be one of {list(get_args(MajoritySign))}, got {majority_sign!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise WrongTypeError(f"seed must be an integer or None, got {seed!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return _Options(method, rank, float(density or 1.0), majority_sign, generator)  # type: ignore[arg-type]


def _one_method(configs: Mapping[str, AdapterConfig]) -> str:
    kinds = {n: get_method(c).name for n, c in configs.items()}
    if len(set(kinds.values())) > 1:
        raise MergeError(f"the adapters use different methods ({kinds}); only adapters of one method "
                         "merge into one adapter (compose the others at run time with a plan)")
    return next(iter(kinds.values()))


# --- finding and filling layers ---------------------------------------------------------
def _plain(path: str) -> str:
    """A module path without the ``base_layer`` components of wrappers around it."""
    return ".".join(p for p in path.split(".") if p != WRAPPER_COMPONENT)


def _holding(model: nn.Module, layer_class: type[AdapterLayer], names: list[str]) -> dict[str, AdapterLayer]:
    """Plain path -> layer of ``layer_class`` holding any of ``names`` (the union), in model order."""
    return {_plain(path): layer for path, layer in adapter_layers(model)
            if isinstance(layer, layer_class) and any(layer.has_adapter(n) for n in names)}


def _write(model: nn.Module, name: str, layer_class: type[AdapterLayer],
           writes: dict[str, dict[str, torch.Tensor]]) -> None:
    for path, values in writes.items():
        layer = find_layer(model.get_submodule(path), layer_class)
        if layer is None or not layer.has_adapter(name):
            raise MergeError(f"the merged adapter {name!r} did not get a {layer_class.method} layer at {path!r}, "
                             "where the merged adapters have one; the model's modules changed since they were added")
        for local, value in values.items():
            _copy(layer.get_parameter(local), value, f"{path}.{local}")


def _copy(param: torch.Tensor, value: torch.Tensor, where: str) -> None:
    if param.shape != value.shape:  # a rule here built the wrong shape
        raise RuntimeError(f"merge_adapters: {where} is {tuple(param.shape)} but the merge made {tuple(value.shape)}")
    param.copy_(value.to(device=param.device, dtype=param.dtype))


def _work_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32 (half-precision weights are merged in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --- LoRA ---------------------------------------------------------------------------------
def _lora(model: nn.Module, name: str, weights: dict[str, float], configs: dict[str, AdapterConfig],
          opts: _Options) -> _Built:
    dora = [n for n, c in configs.items() if getattr(c, "use_dora", False)]
    if dora:
        raise MergeError(
            f"DoRA adapters {dora} cannot be merged with other adapters: each rescales its updated weight "
            "W + dW by a learned magnitude over that weight's norm, which does not combine linearly; "
            "merge plain LoRA adapters, or fold one DoRA adapter into the base with merge()")
    names = list(weights)
    ranks = {n: int(configs[n].rank) for n in names}
    if opts.method == "linear" and len(set(ranks.values())) > 1:
        raise UsageError(f"method 'linear' adds the A's and the B's, so it needs adapters of one rank; found "
                         f"ranks {ranks}; use 'cat' (exact) or 'svd' (rank of your choice)")
    if opts.method == "cat":
        new_rank = sum(ranks.values())
    elif opts.method == "linear":
        new_rank = next(iter(ranks.values()))
    else:
        new_rank = opts.rank or max(ranks.values())
    layer_class = get_method("lora").layer_class
    assert layer_class is not None
    layers = _holding(model, layer_class, names)
    writes: dict[str, dict[str, torch.Tensor]] = {}
    errors: list[float] = []
    for path, layer in layers.items():
        a_list, b_list, scalings = _lora_factors(layer, names, ranks)
        a, b, error = _lora_merge(opts, a_list, b_list, scalings, [weights[n] for n in names], new_rank)
        if layer.is_embedding:
            writes[path] = {f"lora_embedding_A.{name}": a, f"lora_embedding_B.{name}": b}
        else:
            writes[path] = {f"lora_A.{name}.weight": a, f"lora_B.{name}.weight": b}
        if error is not None:
            errors.append(error)
    first = configs[names[0]]
    config = get_config_class("lora")(rank=new_rank, alpha=new_rank, dropout=first.dropout,
                                      targets=_lora_targets(model, configs, list(layers)))
    return _Built(config, layer_class, writes, new_rank, errors)


def _lora_factors(layer: AdapterLayer, names: list[str],
                  ranks: dict[str, int]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Each adapter's (a (r, q), b (p, r), scaling) at ``layer``; zeros (scaling 0) where it has none."""
    embedding = layer.is_embedding
    held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n in names:
        if embedding and n in layer.lora_embedding_A:
            held[n] = (layer.lora_embedding_A[n], layer.lora_embedding_B[n])  # (r, num), (dim, r)
        elif not embedding and n in layer.lora_A:
            held[n] = (layer.lora_A[n].weight, layer.lora_B[n].weight)  # (r, in), (out, r)
    dtype = _work_dtype([t for pair in held.values() for t in pair])
    some_a, some_b = next(iter(held.values()))
    a_list, b_list, scalings = [], [], []
    for n in names:
        if n in held:
            a, b = (t.detach().to(dtype) for t in held[n])
            scale = float(layer.scaling[n])
        else:
            a = some_a.new_zeros(ranks[n], some_a.shape[1], dtype=dtype)
            b = some_b.new_zeros(some_b.shape[0], ranks[n], dtype=dtype)
            scale = 0.0
        a_list.append(a)
        b_list.append(b)
        scalings.append(scale)
    return a_list, b_list, scalings


def _lora_merge(opts: _Options, a_list: list[torch.Tensor], b_list: list[torch.Tensor], scalings: list[float],
                weights: list[float], rank: int) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """New (a, b, error) at one layer, with scaling 1: ``b @ a`` is the merged update."""
    coefs = [w * s for w, s in zip(weights, scalings)]
    if opts.method == "cat":
        return merge_math.cat_factors(a_list, b_list, coefs) + (None,)
    if opts.method == "linear":
        a, b = merge_math.linear_factors(a_list, b_list, coefs)
        exact_a, exact_b = merge_math.cat_factors(a_list, b_list, coefs)
        return a, b, merge_math.relative_error(b @ a, exact_b @ exact_a)
    if opts.method == "svd":
        return merge_math.truncated_product(*merge_math.cat_factors(a_list, b_list, coefs), rank)
    deltas = [s * (b @ a) for a, b, s in zip(a_list, b_list, scalings)]  # each (p, q), unweighted
    target = merge_math.combine(opts.method, deltas, weights, opts.density,  # type: ignore[arg-type]
                                opts.majority_sign, opts.generator)
    return merge_math.truncated_factors(target, rank)


def _lora_targets(model: nn.Module, configs: dict[str, AdapterConfig], paths: list[str]) -> list[str] | str | None:
    """The inputs' own targets when they all share them and they resolve to ``paths``; else ``paths`` spelled out.

    Full paths match exactly under both our rule and PEFT's (a path equal to
    a name, or ending in ``"." + name``), so the saved file loads in PEFT.
    """
    specs = [c.targets for c in configs.values()]
    if all(s == specs[0] for s in specs):
        try:
            probe = get_config_class("lora")(targets=specs[0])
            if get_method("lora").target_paths(model, probe) == paths:
                return specs[0]
        except UserError:
            pass
    return list(paths)


# --- IA3, bottleneck, BitFit ------------------------------------------------------------------
def _ia3(model: nn.Module, name: str, weights: dict[str, float], configs: dict[str, AdapterConfig],
         opts: _Options) -> _Built:
    names = list(weights)
    layer_class = get_method("ia3").layer_class
    assert layer_class is not None
    layers = _holding(model, layer_class, names)
    layouts = {n: {p: layer.is_feedforward[n] for p, layer in layers.items() if layer.has_adapter(n)}
               for n in names}
    first = layouts[names[0]]
    for n in names[1:]:
        if layouts[n] != first:
            only = sorted(set(first) ^ set(layouts[n]))
            roles = sorted(p for p in set(first) & set(layouts[n]) if first[p] != layouts[n][p])
            raise MergeError(
                f"IA3 adapters {names[0]!r} and {n!r} have different layouts (modules in one only: {only[:3]}; "
                f"scaling the input in one and the output in the other: {roles[:3]}); the weighted sum of "
                "vectors is defined only for adapters with the same targets and feedforward modules")
    writes: dict[str, dict[str, torch.Tensor]] = {}
    for path, layer in layers.items():
        vectors = [layer.ia3_l[n].detach() for n in names]  # each (out, 1) or (1, in)
        dtype = _work_dtype(vectors)
        writes[path] = {f"ia3_l.{name}": sum(w * v.to(dtype) for w, v in zip(weights.values(), vectors))}
    config = _ia3_config(model, configs[names[0]], first)
    return _Built(config, layer_class, writes)


def _ia3_config(model: nn.Module, first: AdapterConfig, layout: dict[str, bool]) -> AdapterConfig:
    """The first input's config when it still gives ``layout`` (path -> feedforward); else explicit lists."""
    method = get_method("ia3")
    try:
        paths = method.target_paths(model, first)
        feedforward = method.feedforward_paths(model, first, paths)  # type: ignore[attr-defined]
        if {p: p in feedforward for p in paths} == layout:
            return type(first).from_dict(first.to_dict())
    except UserError:
        pass
    return get_config_class("ia3")(targets=list(layout), feedforward=[p for p, ff in layout.items() if ff])


def _bottleneck(model: nn.Module, name: str, weights: dict[str, float], configs: dict[str, AdapterConfig],
                opts: _Options) -> _Built:
    names = list(weights)
    shapes = {n: (c.placement, c.non_linearity) for n, c in configs.items()}
    if len(set(shapes.values())) > 1:
        raise MergeError(f"bottleneck adapters merge by 'cat' only when they share placement and non-linearity; "
                         f"found (placement, non_linearity) {shapes}")
    layer_class = get_method("bottleneck").layer_class
    assert layer_class is not None
    layers = _holding(model, layer_class, names)
    # The new reduction factor r gives every layer max(1, out // r) hidden units: the largest
    # r that leaves room for all the inputs' units (the rest are zero units, adding nothing).
    units = {p: sum(layer.adapter_up[n].weight.shape[1] for n in names if n in layer.adapter_up)
             for p, layer in layers.items()}
    outs = {p: next(layer.adapter_up[n].weight.shape[0] for n in names if n in layer.adapter_up)
            for p, layer in layers.items()}
    factor = min(outs[p] // units[p] for p in layers)
    if factor < 1:
        wide = max(layers, key=lambda p: units[p] / outs[p])
        raise MergeError(f"the merged bottleneck would need {units[wide]} hidden units at {wide!r}, more than "
                         f"its {outs[wide]} features allow (reduction_factor 1); merge fewer adapters")
    writes = {p: _stacked_bottleneck(layer, name, names, weights, max(1, outs[p] // factor))
              for p, layer in layers.items()}
    placement, non_linearity = shapes[names[0]]
    config = get_config_class("bottleneck")(placement=placement, reduction_factor=factor,
                                            non_linearity=non_linearity)
    return _Built(config, layer_class, writes)


def _stacked_bottleneck(layer: AdapterLayer, name: str, names: list[str], weights: dict[str, float],
                        width: int) -> dict[str, torch.Tensor]:
    """Down rows and weighted up columns of every input side by side, zero units after them.

    ``sum_i w_i up_i(act(down_i h)) = up(act(down h))`` with down = [down_1; down_2; ...]
    and up = [w_1 up_1, w_2 up_2, ...]; up's bias is ``sum w_i b_i``.
    """
    held = [n for n in names if n in layer.adapter_up]
    dtype = _work_dtype([layer.adapter_up[n].weight for n in held])
    down = [layer.adapter_down[n] for n in held]
    up = [layer.adapter_up[n] for n in held]
    down_w = torch.cat([d.weight.detach().to(dtype) for d in down])  # (units, in)
    down_b = torch.cat([d.bias.detach().to(dtype) for d in down])  # (units,)
    up_w = torch.cat([weights[n] * u.weight.detach().to(dtype) for n, u in zip(held, up)], dim=1)  # (out, units)
    up_b = sum(weights[n] * u.bias.detach().to(dtype) for n, u in zip(held, up))  # (out,)
    pad = width - down_w.shape[0]
    return {
        f"adapter_down.{name}.weight": torch.cat([down_w, down_w.new_zeros(pad, down_w.shape[1])]),
        f"adapter_down.{name}.bias": torch.cat([down_b, down_b.new_zeros(pad)]),
        f"adapter_up.{name}.weight": torch.cat([up_w, up_w.new_zeros(up_w.shape[0], pad)], dim=1),
        f"adapter_up.{name}.bias": up_b,
    }


def _bitfit(model: nn.Module, name: str, weights: dict[str, float], configs: dict[str, AdapterConfig],
            opts: _Options) -> _Built:
    layer_class = get_method("bitfit").layer_class
    assert layer_class is not None
    writes: dict[str, dict[str, torch.Tensor]] = {}
    for path, layer in _holding(model, layer_class, list(weights)).items():
        offsets = {n: layer.bitfit[n].bias.detach() for n in weights if n in layer.bitfit}  # each (out,)
        dtype = _work_dtype(list(offsets.values()))
        writes[path] = {f"bitfit.{name}.bias": sum(weights[n] * o.to(dtype) for n, o in offsets.items())}
    return _Built(get_config_class("bitfit")(), layer_class, writes)


_Rule = tuple[Callable[..., _Built], tuple[str, ...], str]
_RULES: dict[str, _Rule] = {
    "lora": (_lora, MERGE_METHODS, ""),
    "ia3": (_ia3, ("linear",),
            ("IA3 vectors rescale activations, so their weighted sum is the one combination (as in PEFT); "
             "'cat' and 'svd' factorise low-rank updates, which IA3 has none of, and the pruning methods act "
             "on task vectors that start at 0, where IA3's start at 1")),
    "bottleneck": (_bottleneck, ("cat",),
                   ("a bottleneck's output passes through its non-linearity, so averaging weights is not "
                    "averaging outputs; 'cat' places the hidden units side by side, which is exact")),
    "bitfit": (_bitfit, ("linear", "cat"),
               ("the offsets add to the outputs, so their weighted sum ('linear' or 'cat', the same here) "
                "is exact; the SVD-based methods need low-rank factors, which BitFit has none of")),
}
_REFUSALS: dict[str, str] = {
    "prefix_tuning": "the learned key/value prefixes act through softmax attention over the whole sequence, "
                     "so no combination of their weights gives the combination of their effects; "
                     "compose them at run time with a plan instead",
    "prompt_tuning": "the learned virtual tokens act through attention over the whole sequence, so no "
                     "combination of their embeddings gives the combination of their effects; "
                     "compose them at run time with a plan instead",
}


# --- task heads ---------------------------------------------------------------------------
def _averaged_heads(model: nn.Module, weights: Mapping[str, float]) -> dict[str, dict[str, torch.Tensor]]:
    """Head path -> parameter name -> ``sum w_i head_i / sum w_i`` (the base head for an adapter without a copy)."""
    total = float(sum(weights.values()))
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for path, layer in adapter_layers(model):
        if not isinstance(layer, HeadLayer) or not any(layer.has_adapter(n) for n in weights):
            continue
        if total == 0.0:
            raise UsageError(f"the weights {dict(weights)} sum to 0, but the adapters' task heads ({_plain(path)!r}) "
                             "are averaged with the weights divided by their sum; give weights with a non-zero sum")
        modules = {n: layer.copies[n] if n in layer.copies else layer.base_layer for n in weights}
        params = {n: dict(m.named_parameters()) for n, m in modules.items()}
        first = next(iter(params.values()))
        for n, own in params.items():
            if {k: p.shape for k, p in own.items()} != {k: p.shape for k, p in first.items()}:
                raise MergeError(f"the task heads at {_plain(path)!r} differ in shape between the adapters "
                                 f"({n!r}: {[tuple(p.shape) for p in own.values()]}), so they cannot be averaged")
        heads[_plain(path)] = {
            key: sum(weights[n] / total * params[n][key].detach().double() for n in weights)  # type: ignore[misc]
            for key in first
        }
    return heads


def _write_heads(model: nn.Module, name: str, heads: dict[str, dict[str, torch.Tensor]]) -> None:
    for path, values in heads.items():
        layer = find_layer(model.get_submodule(path), HeadLayer)
        if layer is None or name not in layer.copies:
            raise MergeError(f"the merged adapter {name!r} got no copy of the task head {path!r}")
        for key, value in values.items():
            _copy(layer.copies[name].get_parameter(key), value, f"{path}.{key}")


__all__ = ["MERGE_METHODS", "MergeMethod", "MergeReport", "merge_adapters"]
