"""Swap some modules' ``forward`` for the length of a context, and give it back.

The training loop's speed levers (hashed dropout masks, oneDNN products) each
replace the ``forward`` of certain modules of one model while a run lasts. They
share how: the replacement is set on the module instance (the class stays
untouched), each touched module carries a marker so that a nested context leaves
it to the outer one, and everything comes back on exit, on error as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch.nn as nn

#: ``choose(module)`` answers with the forward to install (a function of ``(module, *args)``), ``MARK_ONLY``
#: to set the marker alone (the module's own forward reads it), or ``None`` to leave the module be.
MARK_ONLY = object()


@contextlib.contextmanager
def patched_forwards(model: nn.Module, marker: str,
                     choose: Callable[[nn.Module], Callable | object | None]) -> Iterator[int]:
    """Within the context, each module of ``model`` that ``choose`` picks runs its new forward; yields how many.

    Modules that already carry ``marker`` belong to an enclosing context and are skipped.
    """
    touched: list[nn.Module] = []
    try:
        for module in model.modules():
            if getattr(module, marker, False):
                continue
            forward = choose(module)
            if forward is None:
                continue
            if forward is not MARK_ONLY:
                module.forward = forward.__get__(module)
            setattr(module, marker, True)
            touched.append(module)
        yield len(touched)
    finally:
        for module in touched:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(marker, None)
