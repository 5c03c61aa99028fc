"""Task heads that train with an adapter.

A freshly initialised task head (``classifier``, ``score``, ``qa_outputs``)
belongs to the task, not to the pretrained base, so each adapter gets its own
trainable copy, saved with it. The original head stays in ``base_layer`` and
is what the model uses with adapters disabled.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from adapterkit.core.config import AdapterConfig
from adapterkit.core.layers import AdapterLayer


class HeadLayer(AdapterLayer):
    """The task head, with one copy per adapter; the first active copy answers."""

    method = "head"
    containers = ("copies",)

    def __init__(self, base_layer: nn.Module, state: Any) -> None:
        super().__init__(base_layer, state)
        self.copies = nn.ModuleDict()

    def add_adapter(self, name: str, config: AdapterConfig | None = None) -> None:
        """Give adapter ``name`` its own copy of the head, starting from the current weights."""
        head = copy.deepcopy(self.base_layer)
        for param in head.parameters():
            param.requires_grad_(True)
        self.copies[name] = head

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        routes = self.routing(hidden.shape[0])
        if routes is not None:
            return self._routed(hidden, routes, *args, **kwargs)
        active = self.active_adapters()
        module = self.copies[active[0]] if active else self.base_layer
        return module(hidden, *args, **kwargs)

    def _routed(self, hidden: torch.Tensor, routes: list[str | None], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each example through the head of the adapter it is routed to."""
        held = self.adapter_names()
        out: torch.Tensor | None = None
        groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(routes):
            groups.setdefault(name if name in held else None, []).append(row)
        for name, rows in groups.items():
            module = self.copies[name] if name is not None else self.base_layer
            index = torch.tensor(rows, device=hidden.device)
            part = module(hidden.index_select(0, index), *args, **kwargs)
            if out is None:
                out = part.new_empty((hidden.shape[0],) + tuple(part.shape[1:]))
            out.index_copy_(0, index, part)
        assert out is not None
        return out
