"""Adding, activating, merging, deleting and unloading adapters.

These functions take the user's own model (any ``nn.Module``) and change it in
place; the model keeps its class, so ``generate()``, the Hugging Face
``Trainer`` and ``torch.compile`` keep working on it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch.nn as nn

from adapterkit.core.config import AdapterConfig
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
    state.active = [name]
    # New layers are built in training mode; follow the model's mode so that an
    # adapter added to a model in eval mode does not apply dropout.
    model.train(model.training)
    refresh_trainable(model)


def set_active(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Choose the adapter(s) used by the next forward passes (None: the base model).

    With several names, layer adapters apply together (LoRA deltas add up) and
    the first adapter's head answers. The active adapters' parameters become
    the trainable ones.
    """
    state = get_state(model)
    wanted = [] if names is None else [names] if isinstance(names, str) else list(names)
    _check_names(state, wanted)
    state.active = wanted
    refresh_trainable(model)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model behaves as its base (merged adapters are taken out)."""
    state = get_state(model)
    merged = [(layer, n) for _, layer in adapter_layers(model) for n in list(layer.merged_adapters)]
    for layer, n in merged:
        layer.unmerge(n)
    state.disabled = True
    try:
        yield model
    finally:
        state.disabled = False
        for layer, n in merged:
            layer.merge(n)


@contextmanager
def route(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, example ``i`` of every batch uses adapter ``adapter_names[i]``.

    ``None`` routes an example to the base model. Works for any forward or
    ``generate`` call whose batch dimension matches ``adapter_names``.
    """
    state = get_state(model)
    _check_names(state, [n for n in adapter_names if n is not None])
    if any(layer.merged_adapters for _, layer in adapter_layers(model)):
        raise MergeError("route() needs unmerged adapters; call unmerge(model) first")
    previous = state.routing
    state.routing = list(adapter_names)
    try:
        yield model
    finally:
        state.routing = previous


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
    _remove(model, name, state)
    state.active = [n for n in state.active if n != name]
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
    """Names of the adapters the next forward uses."""
    return list(get_state(model).active) if has_state(model) else []


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
    for name in state.active:
        for param in adapter_parameters(model, name).values():
            param.requires_grad_(True)


def trainable_summary(model: nn.Module) -> dict[str, float | int]:
    """Counts of trainable and total parameters, and the trainable percentage."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    percent = 100.0 * trainable / total if total else 0.0
    return {"trainable": trainable, "total": total, "percent": percent}


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


def _output_embedding_paths(model: nn.Module) -> list[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [n for n, m in model.named_modules() if out is not None and m is out]


def _names_or_active(state: AdapterState, name: str | None) -> list[str]:
    names = list(state.active) if name is None else [name]
    _check_names(state, names)
    return names


def _check_names(state: AdapterState, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise UnknownNameError(f"no adapter called {unknown[0]!r}; the model has {list(state.configs)}")


__all__ = [
    "add_adapter", "set_active", "adapters_disabled", "route", "merge", "unmerge",
    "delete_adapter", "unload", "list_adapters", "active_adapters", "adapter_parameters",
    "head_parameters", "trainable_summary", "get_adapter_config", "refresh_trainable",
    "STATE_ATTR", "AdapterLayer",
]
