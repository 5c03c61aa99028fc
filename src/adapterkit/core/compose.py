"""The one mechanism that evaluates a plan, for every method.

A method describes how its adapters' effects combine (an :class:`Algebra`:
LoRA's are weighted deltas that add, IA3's are scale vectors that multiply,
bottleneck adapters' are functions that compose); :func:`fold` walks a plan
with it. Layers cache the folded result per plan (:func:`cached_fold`), so a
forward costs one dictionary lookup on top of the method's own arithmetic.

:func:`resolve_plan` checks a plan against a model before it is used: that
every name exists, that fusion adapters expand to their ``Fuse`` block, and
that every combination is one the methods involved can compute.
"""

from __future__ import annotations

from typing import Generic, Sequence, TypeVar

import torch

from adapterkit.core.plan import Average, Fuse, Plan, Route, Stack, Sum, as_plan, describe
from adapterkit.core.state import AdapterState
from adapterkit.errors import UnknownNameError, UsageError, UserError

T = TypeVar("T")


class CompositionError(UserError, ValueError):
    """A plan combines adapters in a way their methods cannot compute."""


class Algebra(Generic[T]):
    """How one layer combines the effects of the adapters it holds.

    ``leaf`` returns an adapter's effect at this layer, or None when it has
    none here (the adapter targets other modules, or is merged into the base).
    The combinators get only non-None parts, except :meth:`average`, which
    gets None for parts without an effect (an average is not invariant to
    dropping a part: half of nothing is still half of the weight).
    """

    def leaf(self, name: str) -> T | None:
        raise NotImplementedError

    def stack(self, parts: list[T]) -> T:
        raise NotImplementedError

    def sum(self, parts: list[T]) -> T:
        raise NotImplementedError

    def average(self, parts: list[tuple[T | None, float]]) -> T:
        raise NotImplementedError

    def fuse(self, node: Fuse, parts: list[T | None]) -> T | None:
        raise CompositionError(f"{describe(node)}: this layer's method has no fusion")


def fold(plan: "Plan | str", algebra: Algebra[T]) -> T | None:
    """The effect of ``plan`` at one layer; None means the layer's base output is left as it is.

    A block with a single effective part is that part itself, so ``Sum("a")``
    and ``"a"`` compute exactly the same thing.
    """
    if isinstance(plan, str):
        return algebra.leaf(plan)
    if isinstance(plan, (Sum, Stack)):
        parts = [p for p in (fold(item, algebra) for item in plan.items) if p is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return algebra.sum(parts) if isinstance(plan, Sum) else algebra.stack(parts)
    if isinstance(plan, Average):
        weighted = [(fold(item, algebra), w) for item, w in zip(plan.items, plan.weights)]
        if all(p is None for p, _ in weighted):
            return None
        return algebra.average(weighted)
    if isinstance(plan, Fuse):
        parts = [algebra.leaf(n) for n in plan.items]
        return algebra.fuse(plan, parts)
    raise CompositionError(f"{describe(plan)} can only be the whole plan, not part of one")


def cached_fold(layer: torch.nn.Module, plan: "Plan | str", algebra: Algebra[T]) -> T | None:
    """:func:`fold` of ``plan`` at ``layer``, remembered until the model's adapters change.

    Only folds whose result holds no tensors built from trainable weights are
    worth caching; algebras return closures or (name, weight) lists for that.
    """
    state: AdapterState = layer.__dict__["_state"]
    cache = layer.__dict__.get("_plan_cache")
    if cache is None or cache[0] != state.version:
        cache = (state.version, {})
        layer.__dict__["_plan_cache"] = cache
    table = cache[1]
    try:
        return table[plan]
    except KeyError:
        value = fold(plan, algebra)
        if len(table) > 256:  # plans come and go (routing lists); keep the cache small
            table.clear()
        table[plan] = value
        return value


def route_groups(route: Route, batch: int) -> dict["Plan | str | None", list[int]]:
    """Rows of the batch per distinct entry of ``route`` (checked against the batch size)."""
    if len(route.entries) != batch:
        raise UsageError(
            f"route() was given {len(route.entries)} entries but the batch holds {batch} examples; "
            "give one adapter name, plan or None per example"
        )
    groups: dict["Plan | str | None", list[int]] = {}
    for row, entry in enumerate(route.entries):
        groups.setdefault(entry, []).append(row)
    return groups


# --- checking a plan against a model -----------------------------------------------
def resolve_plan(state: AdapterState, value: object) -> "Plan | str":
    """``value`` as a plan that runs on the model owning ``state``.

    Names must exist; a fusion adapter's name becomes its ``Fuse`` block; a
    ``Fuse`` without a fusion name gets the model's fusion over those adapters.
    Every block is checked against the methods of the adapters in it, so a
    combination no method can compute fails here, with the reason, rather
    than in the middle of a forward.
    """
    plan = as_plan(value)  # type: ignore[arg-type]
    if isinstance(plan, Route):
        entries = [None if e is None else _resolve(state, e, top=True) for e in plan.entries]
        inputs = {_input_adapters(state, e) for e in entries if e is not None} - {()}
        if inputs and (len(set(entries)) > 1):
            raise CompositionError(
                f"route() sends examples to different plans and some use prefix/prompt adapters "
                f"{sorted({n for group in inputs for n in group})}; virtual tokens need the whole batch on one "
                "plan. Route prefix/prompt adapters per batch."
            )
        return plan.with_entries(entries)
    return _resolve(state, plan, top=True)


def _resolve(state: AdapterState, plan: "Plan | str", top: bool) -> "Plan | str":
    if isinstance(plan, str):
        _check_known(state, plan)
        fusion = state.fusions.get(plan)
        if fusion is not None:
            return Fuse(*fusion, fusion=plan)
        return plan
    if isinstance(plan, Route):
        raise CompositionError(f"{describe(plan)}: a Route can only be the whole plan (one entry per example)")
    if isinstance(plan, Fuse):
        return _resolve_fuse(state, plan)
    items = [_resolve(state, p, top=False) for p in plan.parts()]
    if isinstance(plan, Average):
        _refuse_inside(state, plan, items)
        resolved: Plan = Average(list(zip(items, plan.raw_weights)), normalize=plan.normalize)
    else:
        _refuse_inside(state, plan, items)
        resolved = type(plan)(*items)
    if top:
        inputs = _input_adapters(state, resolved)
        if len(inputs) > 1:
            raise CompositionError(
                f"{describe(resolved)} uses the prefix/prompt adapters {list(inputs)} together; only one "
                "adapter that adds virtual tokens can take part in a plan, since their tokens would have to "
                "agree on where they sit"
            )
    return resolved


def _resolve_fuse(state: AdapterState, plan: Fuse) -> Fuse:
    for name in plan.items:
        _check_known(state, name)
        method = _method_of(state, name)
        if not method.fusable:
            raise CompositionError(
                f"{describe(plan)}: {name!r} is a {method.name} adapter; AdapterFusion attends over the outputs "
                "of bottleneck adapters, and this method adds no output of its own to attend over"
            )
    if plan.fusion is not None:
        _check_known(state, plan.fusion)
        members = state.fusions.get(plan.fusion)
        if members is None:
            raise UnknownNameError(f"{describe(plan)}: {plan.fusion!r} is not a fusion adapter (add one with add_fusion)")
        if tuple(members) != tuple(plan.items):
            raise CompositionError(
                f"{describe(plan)}: fusion {plan.fusion!r} was made over {list(members)}, in that order"
            )
        return plan
    matches = [f for f, members in state.fusions.items() if tuple(members) == tuple(plan.items)]
    if len(matches) != 1:
        found = "none" if not matches else f"{len(matches)} ({matches})"
        raise UnknownNameError(
            f"{describe(plan)}: the model holds {found} fusion over exactly these adapters; "
            "add one with add_fusion(model, [...], name) or name it with Fuse(..., fusion=name)"
        )
    return Fuse(*plan.items, fusion=matches[0])


def _refuse_inside(state: AdapterState, block: Plan, items: Sequence["Plan | str"]) -> None:
    """Raise when an adapter's method cannot take part in ``block``'s kind of combination."""
    for name in dict.fromkeys(n for item in items for n in trainable_names(item)):
        reason = _method_of(state, name).refuses.get(block.kind)
        if reason:
            raise CompositionError(f"{describe(block)}: {name!r} ({_method_of(state, name).name}) {reason}")


def _input_adapters(state: AdapterState, plan: "Plan | str") -> tuple[str, ...]:
    return tuple(n for n in trainable_names(plan) if _method_of(state, n).input_side)


def _method_of(state: AdapterState, name: str):  # -> Method (import cycle otherwise)
    from adapterkit.core.registry import get_method

    return get_method(state.configs[name])


def _check_known(state: AdapterState, name: str) -> None:
    if name not in state.configs:
        raise UnknownNameError(f"no adapter called {name!r}; the model has {list(state.configs)}")


def trainable_names(plan: "Plan | str") -> list[str]:
    """The adapters whose weights a plan trains: every name, except that a fusion trains only itself."""
    if isinstance(plan, str):
        return [plan]
    if isinstance(plan, Fuse):
        return [plan.fusion] if plan.fusion is not None else []
    return list(dict.fromkeys(n for p in plan.parts() for n in trainable_names(p)))


__all__ = ["Algebra", "CompositionError", "fold", "cached_fold", "route_groups", "resolve_plan",
           "trainable_names"]
