"""Which plan a forward runs: the model's default, or a per-call override.

The default lives on the model's :class:`~adapterkit.core.state.AdapterState`
(``set_active``). Overrides live in a :class:`contextvars.ContextVar`, so they
belong to the thread or asyncio task that set them: two threads calling one
model inside ``use(model, "a")`` and ``use(model, "b")`` each get their own
adapter, and nothing is written onto the model.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from adapterkit.core.plan import Plan
from adapterkit.core.state import AdapterState

# id(state) -> plan, for the models this context overrides. A fresh dict is set
# on every entry, so a context never sees another one's changes.
_OVERRIDES: ContextVar[dict[int, "Plan | str"] | None] = ContextVar("adapterkit_plan_overrides", default=None)


def current_plan(state: AdapterState) -> "Plan | str":
    """The plan the next forward of the model owning ``state`` runs in this context."""
    overrides = _OVERRIDES.get()
    if overrides:
        plan = overrides.get(id(state))
        if plan is not None:
            return plan
    return state.default


def is_overridden(state: AdapterState) -> bool:
    """True inside a ``use`` block for this model in the current context."""
    return id(state) in (_OVERRIDES.get() or {})


@contextmanager
def override(state: AdapterState, plan: "Plan | str") -> Iterator[None]:
    """Run ``plan`` on the model owning ``state`` within the block, in this context only."""
    mapping = dict(_OVERRIDES.get() or {})
    mapping[id(state)] = plan
    token = _OVERRIDES.set(mapping)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


class PerThread(threading.local):
    """Attributes private to each thread (values a hook hands to the forward that follows it).

    Copying or pickling a model gives a fresh, empty one: what a thread had
    in flight belongs to that thread's call, not to the model.
    """

    def __deepcopy__(self, memo: dict) -> "PerThread":
        return type(self)()

    def __reduce__(self) -> tuple:
        return (type(self), ())
