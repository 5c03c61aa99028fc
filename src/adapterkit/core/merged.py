"""``merge_and_unload``: a plan folded into the weights, and every adapterkit module gone.

The result is the user's own model class holding only torch and transformers
modules, so it saves with ``save_pretrained`` and loads without adapterkit.
Each adapter layer folds its part of the plan into the weights it wraps
(innermost wrapper first, so stacked wrappers fold in the order they apply)
through the one base-weight operation of ``core/base_weight.py``.
"""

from __future__ import annotations

import torch.nn as nn

from adapterkit.core.compose import resolve_plan
from adapterkit.core.context import current_plan
from adapterkit.core.layers import STORE_ATTR, AdapterLayer, MergeError, candidate_modules, get_store, set_submodule
from adapterkit.core.plan import Plan, PlanLike, Route, describe, plan_names
from adapterkit.core.registry import get_method
from adapterkit.core.state import drop_state, get_state, has_state


def merge_and_unload(model: nn.Module, plan: PlanLike | Plan = None) -> nn.Module:
    """Fold ``plan`` (default: the current one) into the weights and strip every adapter.

    Returns ``model`` itself, now a plain model whose outputs equal the
    adapted model's under ``plan`` within float rounding. Methods whose change
    no weight can absorb (bottleneck, prefix, prompt, fusion) are refused by
    name before anything is changed; adapters outside the plan are dropped.
    """
    if not has_state(model):
        return model
    state = get_state(model)
    resolved = current_plan(state) if plan is None else resolve_plan(state, plan)
    if isinstance(resolved, Route):
        raise MergeError(f"{describe(resolved)} gives each example its own plan; fold one plan into the weights")
    for name in plan_names(resolved):
        method = get_method(state.configs[name])
        if method.layer_class is None or method.fusable or method.name == "fusion":
            raise MergeError(
                f"cannot fold {describe(resolved)} into the weights: {name!r} is a {method.name} adapter, and "
                f"{method.not_mergeable_because}"
            )
    _check_untied(model)
    outermost = [(p, m) for p, m in candidate_modules(model) if isinstance(m, AdapterLayer)]
    for _, layer in outermost:  # check every layer before changing any weight
        _fold_chain(layer, resolved, apply=False)
    replacements = [(path, _fold_chain(layer, resolved)) for path, layer in outermost]
    for path, module in replacements:
        set_submodule(model, path, module)
    for undos in state.cleanups.values():
        for undo in undos:
            undo()
    if get_store(model) is not None:
        delattr(model, STORE_ATTR)
    flags = state.extras.get("__base_requires_grad", {})
    for pname, param in model.named_parameters():
        param.requires_grad_(flags.get(pname, True))
    drop_state(model)
    return model


def _fold_chain(layer: AdapterLayer, plan: "Plan | str", apply: bool = True) -> nn.Module:
    """Fold ``layer`` and every wrapper inside it; the plain module that replaces the stack."""
    if isinstance(layer.base_layer, AdapterLayer):
        inner = _fold_chain(layer.base_layer, plan, apply)
        if apply:
            layer.base_layer = inner
    return layer.fold_into_base(plan, apply)


def _check_untied(model: nn.Module) -> None:
    """Refuse to fold into a weight that another module shares (tied input and output embeddings)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, AdapterLayer) or path.startswith(STORE_ATTR):
            continue
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(path)
    for _, layer in candidate_modules(model):
        if not isinstance(layer, AdapterLayer) or layer.method == "head":
            continue
        inner = layer
        while isinstance(inner, AdapterLayer):
            inner = inner.base_layer
        weight = getattr(inner, "weight", None)
        shared = owners.get(id(weight), []) if weight is not None else []
        if len({p.replace(".base_layer", "") for p in shared}) > 1:
            raise MergeError(
                f"the weight of {shared[0]} is shared with {shared[1:]} (tied embeddings); folding an "
                "adapter into it would change both. Untie them first (config.tie_word_embeddings=False)"
            )


__all__ = ["merge_and_unload"]
