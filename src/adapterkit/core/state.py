"""The adapter bookkeeping that lives on a model.

One :class:`AdapterState` hangs off the root module as ``model.adapterkit``
(a plain attribute, not a submodule). Every adapter layer holds a reference to
the same object, so switching the active adapter is one assignment that all
layers see at their next forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from adapterkit.core.config import AdapterConfig
from adapterkit.errors import UsageError

STATE_ATTR = "adapterkit"


@dataclass(eq=False)
class AdapterState:
    """Which adapters a model carries and how the next forward should use them."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: bool = False
    # One adapter name (or None for the base model) per example of the batch.
    routing: list[str | None] | None = None
    # adapter name -> names of the head modules saved with it
    heads: dict[str, list[str]] = field(default_factory=dict)
    # adapter name -> callables that undo non-module changes (hooks, patched forwards)
    cleanups: dict[str, list[Callable[[], None]]] = field(default_factory=dict)
    # adapter name -> free-form per-method data (e.g. the prompt module's key)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)

    def is_on(self, name: str) -> bool:
        """True when ``name`` takes part in the next (unrouted) forward."""
        return not self.disabled and name in self.active


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
