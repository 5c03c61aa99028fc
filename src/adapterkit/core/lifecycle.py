"""Adding, activating, merging, deleting and unloading adapters.

These functions take the user's own model (any ``nn.Module``) and change it in
place; the model keeps its class, so ``generate()``, the Hugging Face
``Trainer`` and ``torch.compile`` keep working on it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from adapterkit.core.compose import resolve_plan, trainable_names
from adapterkit.core.config import AdapterConfig
from adapterkit.core.context import current_plan, override
from adapterkit.core.heads import HeadLayer
from adapterkit.core.layers import (
    AdapterLayer,
    MergeError,
    adapter_layers,
    candidate_modules,
    get_store,
    innermost,
    set_submodule,
)
from adapterkit.core.plan import Average, Fuse, Plan, PlanLike, Route, Stack, Sum, plan_names
from adapterkit.core.registry import get_method, prune_empty_layers, wrap
from adapterkit.core.state import (
    STATE_ATTR,
    AdapterState,
    drop_state,
    get_state,
    has_state,
)
from adapterkit.core.targeting import head_paths
from adapterkit.errors import UnknownNameError, UsageError, WrongTypeError


def add_adapter(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    train_head: bool = True,
) -> None:
    """Insert a new adapter called ``name`` and make it the active one.

    Every parameter that is not part of the adapter (or of the task head, when
    ``train_head``) is frozen. Several adapters may live on one model.
    """
    if not isinstance(config, AdapterConfig):
        raise WrongTypeError(f"config must be an adapter config such as LoraConfig(), got {type(config).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise UsageError(f"adapter name must be a non-empty string without dots, got {name!r}")
    state = get_state(model, create=True)
    if name in state.configs:
        raise UsageError(f"model already has an adapter called {name!r}; delete_adapter() it or pick another name")
    if not state.configs:
        state.extras["__base_requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    method = get_method(config)
    state.configs[name] = config
    try:
        if train_head:
            heads = [p for p in head_paths(model) if p not in _output_embedding_paths(model)]
            for path in heads:
                wrap(model, path, HeadLayer, state).add_adapter(name)
            state.heads[name] = heads
        method.attach(model, name, config, state)
    except Exception:
        _remove(model, name, state)
        raise
    state.changed()
    state.default = resolve_plan(state, name)
    # New layers are built in training mode; follow the model's mode so that an
    # adapter added to a model in eval mode does not apply dropout.
    model.train(model.training)
    refresh_trainable(model)


def set_active(model: nn.Module, plan: PlanLike) -> None:
    """Set the plan forwards run by default: a name, a list of names (a ``Sum``), a plan, or None (the base).

    With several adapters in a Sum, layer adapters apply together (LoRA deltas
    add up) and the first adapter's head answers. The parameters of the
    plan's adapters become the trainable ones. For one thread or request
    only, use ``with use(model, plan):`` instead.
    """
    state = get_state(model)
    resolved = _checked(model, state, plan)
    state.default = resolved
    refresh_trainable(model)


@contextmanager
def use(model: nn.Module, plan: PlanLike) -> Iterator[nn.Module]:
    """Within the block, forwards of ``model`` in this thread / asyncio task run ``plan``.

    Nothing is written onto the model: other threads keep running the
    default plan (or their own ``use``), so one model can serve several
    adapters at once.
    """
    state = get_state(model)
    resolved = _checked(model, state, plan)
    with override(state, resolved):
        yield model


def active_plan(model: nn.Module) -> "Plan | str":
    """The plan the next forward of ``model`` runs in this thread (inside ``use``: that plan)."""
    return current_plan(get_state(model))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model behaves as its base (in this thread).

    Adapters merged into the weights are taken out for the block, which
    changes the model for every thread: unmerge first when serving.
    """
    state = get_state(model)
    merged = [(layer, n) for _, layer in adapter_layers(model) for n in list(layer.merged_adapters)]
    for layer, n in reversed(merged):
        layer.unmerge(n)
    try:
        with override(state, Sum()):
            yield model
    finally:
        for layer, n in merged:
            layer.merge(n)


@contextmanager
def route(model: nn.Module, plans: Sequence[PlanLike], *, weights_fixed: bool = False) -> Iterator[nn.Module]:
    """Within the block, example ``i`` of every batch runs ``plans[i]`` (a name, a plan or None).

    ``None`` routes an example to the base model. Works for any forward or
    ``generate`` call whose batch dimension matches ``plans``; like ``use``,
    it holds for this thread / asyncio task only. ``weights_fixed=True``
    promises that no adapter weight is written in place inside the block
    (see :class:`~adapterkit.core.plan.Route`): routing then skips its
    per-call check of every adapter's weights. Without it, an in-place
    update (an optimiser step) is seen at the next call.
    """
    with use(model, Route(plans, weights_fixed=weights_fixed)):
        yield model


def _checked(model: nn.Module, state: AdapterState, plan: Any) -> "Plan | str":
    resolved = resolve_plan(state, plan)
    # A walk over every module costs milliseconds with many adapters: routed serving
    # enters route() at every decoding step, so the answer is kept until adapters change.
    if isinstance(resolved, Route) and state.derive(
            "any_merged", lambda: any(layer.merged_adapters for _, layer in adapter_layers(model))):
        raise MergeError("route() needs unmerged adapters; call unmerge(model) first")
    return resolved


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold adapter ``name`` (default: the active ones) into the base weights."""
    state = get_state(model)
    for adapter in _names_or_active(state, name):
        method = get_method(state.configs[adapter])
        if not method.mergeable:
            raise MergeError(
                f"adapter {adapter!r} uses {method.name}, which cannot be merged: "
                f"{method.not_mergeable_because}"
            )
        for _, layer in adapter_layers(model):
            if layer.method == method.name and layer.has_adapter(adapter) and adapter not in layer.merged_adapters:
                layer.merge(adapter)


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Take merged adapter ``name`` (default: all merged ones) back out of the base weights."""
    state = get_state(model)
    names = list(state.configs) if name is None else [name]
    _check_names(state, names)
    for _, layer in adapter_layers(model):
        for adapter in names:
            if adapter in layer.merged_adapters:
                layer.unmerge(adapter)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its weights from the model."""
    state = get_state(model)
    _check_names(state, [name])
    users = [f for f, members in state.fusions.items() if name in members]
    if users:
        raise UsageError(f"fusion adapter(s) {users} attend over {name!r}; delete them first")
    was_used = name in plan_names(state.default)
    _remove(model, name, state)
    if was_used:
        state.default = _without(state.default, name)
    refresh_trainable(model)


def unload(model: nn.Module) -> nn.Module:
    """Strip every adapter and return the model with its original modules and weights.

    Merged adapters are restored first, so the base weights come back
    bit-identical; ``requires_grad`` flags return to what they were.
    """
    if not has_state(model):
        return model
    state = get_state(model)
    unmerge(model)
    outermost = [(p, m) for p, m in candidate_modules(model) if isinstance(m, AdapterLayer)]
    for path, layer in outermost:
        set_submodule(model, path, innermost(layer))
    for undos in state.cleanups.values():
        for undo in undos:
            undo()
    if get_store(model) is not None:
        delattr(model, "adapterkit_store")
    flags = state.extras.get("__base_requires_grad", {})
    for pname, param in model.named_parameters():
        param.requires_grad_(flags.get(pname, True))
    drop_state(model)
    return model


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(get_state(model).configs) if has_state(model) else []


def get_adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    """The config adapter ``name`` was created with."""
    state = get_state(model)
    _check_names(state, [name])
    return state.configs[name]


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters whose weights the current plan trains (a fusion: itself, not its members)."""
    return trainable_names(current_plan(get_state(model))) if has_state(model) else []


def adapter_parameters(model: nn.Module, name: str, include_head: bool = True) -> dict[str, nn.Parameter]:
    """Full-path name -> parameter of everything adapter ``name`` trains and saves."""
    state = get_state(model)
    _check_names(state, [name])
    params = dict(get_method(state.configs[name]).parameters_of(model, name))
    if include_head:
        params.update(head_parameters(model, name))
    return params


def head_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Full-path name -> parameter of adapter ``name``'s own copy of the task head."""
    out: dict[str, nn.Parameter] = {}
    for path, layer in adapter_layers(model):
        if isinstance(layer, HeadLayer):
            out.update({f"{path}.{k}": p for k, p in layer.adapter_parameters(name)})
    return out


def refresh_trainable(model: nn.Module) -> None:
    """Only the active adapters' parameters (and their heads) require grad."""
    state = get_state(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in trainable_names(state.default):
        for param in adapter_parameters(model, name).values():
            param.requires_grad_(True)


def trainable_summary(model: nn.Module) -> dict[str, float | int]:
    """Trainable and total parameters, the trainable percentage, and the frozen base's bytes as stored.

    Counts are of values as the model computes with them (a 4-bit weight packs
    two per byte and still counts as its layer's out x in); ``base_bytes`` is
    the memory the frozen parameters take in their stored precision (int8,
    4-bit or float), ``trainable_bytes`` that of the trainable ones.
    """
    total = trainable = base_bytes = trainable_bytes = 0
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            count = _logical_numel(module, pname, param)
            total += count
            if param.requires_grad:
                trainable += count
                trainable_bytes += _stored_bytes(param)
            else:
                base_bytes += _stored_bytes(param)
    percent = 100.0 * trainable / total if total else 0.0
    return {"trainable": trainable, "total": total, "percent": percent, "base_bytes": base_bytes,
            "trainable_bytes": trainable_bytes}


def _logical_numel(module: nn.Module, pname: str, param: torch.Tensor) -> int:
    if pname == "weight" and isinstance(module, nn.Linear) and tuple(param.shape) != (
            module.out_features, module.in_features):
        return module.out_features * module.in_features  # a packed (quantised) weight
    return param.numel()


def _stored_bytes(param: torch.Tensor) -> int:
    """Bytes a parameter occupies: the inner tensors of a tensor subclass (torchao int8), else its own."""
    flatten = getattr(param, "__tensor_flatten__", None)
    if callable(flatten) and type(param) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(getattr(param, n).numel() * getattr(param, n).element_size() for n in names)
    return param.numel() * param.element_size()


def place_in_layers(model: nn.Module, name: str, layers: str | Sequence[int]) -> AdapterConfig:
    """Keep adapter ``name`` only in the blocks ``layers`` (``"top:K"``, ``"bottom:K"``, ``"3,4"`` or numbers).

    Its weights in the other blocks are removed, and its config records the
    blocks it keeps (``layers``), so it saves and loads (in PEFT too, as
    ``layers_to_transform``) with that placement. Returns the new config.
    Raises ``UsageError`` for a method with no per-block placement (prefix and
    prompt tuning act on the inputs), for a merged adapter, or for an adapter
    already placed in other blocks.
    """
    import dataclasses

    from adapterkit.core.targeting import block_count, block_index, parse_layer_choice

    state = get_state(model)
    _check_names(state, [name])
    config = state.configs[name]
    if "layers" not in {f.name for f in dataclasses.fields(config)}:
        raise UsageError(f"{config.method} adapters have no per-block placement (they act on the model's inputs "
                         "or on every block at once); drop the adapter-layers option for them")
    sites = [(path, layer) for path, layer in adapter_layers(model)
             if layer.has_adapter(name) and not isinstance(layer, HeadLayer)]
    if any(name in layer.merged_adapters for _, layer in sites):
        raise UsageError(f"adapter {name!r} is merged; unmerge it before choosing its layers")
    count = block_count(model, [path for path, _ in sites])
    chosen = parse_layer_choice(layers, count) if isinstance(layers, str) else sorted(set(layers))
    if config.layers is not None and config.layers != chosen:
        raise UsageError(f"adapter {name!r} is already placed in layers {config.layers}, not {chosen}")
    for path, layer in sites:
        index = block_index(model, path)
        if index not in chosen:  # outside every block (None) as well
            layer.remove_adapter(name)
    prune_empty_layers(model)
    placed = dataclasses.replace(config, layers=chosen)
    state.configs[name] = placed
    state.changed()
    refresh_trainable(model)
    return placed


def _remove(model: nn.Module, name: str, state: AdapterState) -> None:
    config = state.configs.get(name)
    if config is not None:
        get_method(config).detach(model, name, state)
    for _, layer in list(adapter_layers(model)):
        if isinstance(layer, HeadLayer) and layer.has_adapter(name):
            layer.remove_adapter(name)
    prune_empty_layers(model)
    state.configs.pop(name, None)
    state.heads.pop(name, None)
    state.extras.pop(name, None)
    state.fusions.pop(name, None)
    state.changed()


def _without(plan: "Plan | str", name: str) -> "Plan | str":
    """``plan`` with adapter ``name`` left out (used when it is deleted)."""
    if isinstance(plan, str):
        return Sum() if plan == name else plan
    if isinstance(plan, Route):
        return plan.with_entries([None if e is None or e == name else _without(e, name) for e in plan.entries])
    if isinstance(plan, Sum | Stack):
        return type(plan)(*(_without(p, name) for p in plan.items if p != name))
    if isinstance(plan, Average):
        kept = [(_without(p, name), w) for p, w in zip(plan.items, plan.raw_weights) if p != name]
        return Average(kept, normalize=plan.normalize) if kept else Sum()
    if isinstance(plan, Fuse) and plan.fusion == name:
        return Sum()  # the fusion itself is deleted (its members cannot be while it exists)
    return plan


def _output_embedding_paths(model: nn.Module) -> list[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [n for n, m in model.named_modules() if out is not None and m is out]


def _names_or_active(state: AdapterState, name: str | None) -> list[str]:
    names = trainable_names(state.default) if name is None else [name]
    _check_names(state, names)
    return names


def _check_names(state: AdapterState, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise UnknownNameError(f"no adapter called {unknown[0]!r}; the model has {list(state.configs)}")


__all__ = [
    "add_adapter", "set_active", "use", "active_plan", "adapters_disabled", "route", "merge", "unmerge",
    "delete_adapter", "unload", "list_adapters", "active_adapters", "adapter_parameters",
    "head_parameters", "trainable_summary", "get_adapter_config", "refresh_trainable",
    "STATE_ATTR", "AdapterLayer",
]
