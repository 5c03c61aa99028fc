"""The adapter bookkeeping that lives on a model.

One :class:`AdapterState` hangs off the root module as ``model.adapterkit``
(a plain attribute, not a submodule). Every adapter layer holds a reference to
the same object. It records which adapters exist and the model's *default*
plan; what a given forward runs is that default unless the calling thread or
task overrides it (``core/context.py``), so nothing here changes per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from adapterkit.core.config import AdapterConfig
from adapterkit.core.plan import Plan, Sum
from adapterkit.errors import UsageError

STATE_ATTR = "adapterkit"


@dataclass(eq=False)
class AdapterState:
    """Which adapters a model carries and which plan its forwards run by default."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    # The plan forwards run unless a ``use(model, plan)`` block says otherwise.
    default: "Plan | str" = field(default_factory=Sum)
    # Bumped whenever adapters are added, removed, merged or unmerged: layers
    # cache what a plan means for them and drop the cache when it changes.
    version: int = 0
    # fusion adapter name -> the bottleneck adapters it attends over, in order
    fusions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # adapter name -> names of the head modules saved with it
    heads: dict[str, list[str]] = field(default_factory=dict)
    # adapter name -> callables that undo non-module changes (hooks, patched forwards)
    cleanups: dict[str, list[Callable[[], None]]] = field(default_factory=dict)
    # adapter name -> free-form per-method data (e.g. the prompt module's key)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    # facts derived from the adapters as they are (e.g. "is any merged?"), cleared at every change
    derived: dict[str, Any] = field(default_factory=dict)

    def changed(self) -> None:
        """Record a change of the adapters that layers' cached plans depend on."""
        self.version += 1
        self.derived.clear()

    def derive(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, remembered under ``key`` until the adapters next change."""
        try:
            return self.derived[key]
        except KeyError:
            value = self.derived[key] = compute()
            return value


def get_state(model: nn.Module, create: bool = False) -> AdapterState:
    """The model's :class:`AdapterState`; create it on first use when ``create``."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        if not create:
            raise UsageError(
                f"{type(model).__name__} carries no adapters; call add_adapter(model, name, config) first"
            )
        state = AdapterState()
        model.__dict__[STATE_ATTR] = state
    return state


def has_state(model: nn.Module) -> bool:
    """True when adapters were ever added to ``model``."""
    return model.__dict__.get(STATE_ATTR) is not None


def drop_state(model: nn.Module) -> None:
    """Forget all adapter bookkeeping (used by ``unload``)."""
    model.__dict__.pop(STATE_ATTR, None)
