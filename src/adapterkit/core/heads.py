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

from adapterkit.core.compose import Algebra, cached_fold, route_groups
from adapterkit.core.config import AdapterConfig
from adapterkit.core.layers import AdapterLayer, MergeError
from adapterkit.core.plan import Fuse, Plan, Route

# Which head copies answer, with what weight: ((adapter or None for the base head, weight), ...).
Choice = tuple[tuple[str | None, float], ...]


class HeadChoice(Algebra[Choice]):
    """Which head answers a plan: Sum's first part, Stack's last, Average's weighted outputs, a fusion's own."""

    def __init__(self, layer: "HeadLayer") -> None:
        self.layer = layer

    def leaf(self, name: str) -> Choice | None:
        return ((name, 1.0),) if name in self.layer.copies else None

    def sum(self, parts: list[Choice]) -> Choice:
        return parts[0]

    def stack(self, parts: list[Choice]) -> Choice:
        return parts[-1]  # a task adapter stacked on a language adapter answers with its own head

    def average(self, parts: list[tuple[Choice | None, float]]) -> Choice:
        choice: list[tuple[str | None, float]] = []
        for part, weight in parts:
            for name, inner in part if part is not None else ((None, 1.0),):
                choice.append((name, inner * weight))
        return tuple(choice)

    def fuse(self, node: Fuse, parts: list[Choice | None]) -> Choice | None:
        own = self.leaf(node.fusion) if node.fusion is not None else None
        return own if own is not None else next((p for p in parts if p is not None), None)


class HeadLayer(AdapterLayer):
    """The task head, with one copy per adapter; the first active copy answers."""

    method = "head"
    containers = ("copies",)

    def __init__(self, base_layer: nn.Module, state: Any) -> None:
        super().__init__(base_layer, state)
        self.copies = nn.ModuleDict()
        self.algebra = HeadChoice(self)

    def add_adapter(self, name: str, config: AdapterConfig | None = None) -> None:
        """Give adapter ``name`` its own copy of the head, starting from the current weights."""
        head = copy.deepcopy(self.base_layer)
        for param in head.parameters():
            param.requires_grad_(True)
        self.copies[name] = head

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        plan = self.plan()
        if isinstance(plan, Route):
            return self._routed(hidden, plan, *args, **kwargs)
        return self._answer(cached_fold(self, plan, self.algebra), hidden, *args, **kwargs)

    @torch.no_grad()
    def fold_into_base(self, plan: "Plan | str", apply: bool = True) -> nn.Module:
        """The head that answers ``plan`` as a plain module (an Average of linear heads as one linear head)."""
        choice = self.effect(plan)
        if choice is None:
            return self.base_layer
        if len(choice) == 1 and choice[0][1] == 1.0:
            return self._module(choice[0][0])
        modules = [self._module(n) for n, _ in choice]
        if not all(type(m) is nn.Linear and m.weight.shape == modules[0].weight.shape for m in modules):
            raise MergeError(
                "the plan averages several task heads; only plain linear heads of one shape combine into "
                f"a single head, these are {sorted({type(m).__name__ for m in modules})}"
            )
        first = modules[0]
        head = nn.Linear(first.in_features, first.out_features, bias=first.bias is not None,
                         device=first.weight.device, dtype=first.weight.dtype)
        head.weight.copy_(sum(m.weight * w for m, (_, w) in zip(modules, choice)))
        if head.bias is not None:
            head.bias.copy_(sum(m.bias * w for m, (_, w) in zip(modules, choice)))
        return head

    def _answer(self, choice: Choice | None, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if choice is None:
            return self.base_layer(hidden, *args, **kwargs)
        if len(choice) == 1 and choice[0][1] == 1.0:
            return self._module(choice[0][0])(hidden, *args, **kwargs)
        outputs = [self._module(name)(hidden, *args, **kwargs) * weight for name, weight in choice]
        return sum(outputs[1:], outputs[0])

    def _module(self, name: str | None) -> nn.Module:
        return self.base_layer if name is None else self.copies[name]

    def _routed(self, hidden: torch.Tensor, route: Route, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each example through the head its plan chooses."""
        out: torch.Tensor | None = None
        for entry, rows in route_groups(route, hidden.shape[0]).items():
            choice = None if entry is None else cached_fold(self, entry, self.algebra)
            index = torch.tensor(rows, device=hidden.device)
            part = self._answer(choice, hidden.index_select(0, index), *args, **kwargs)
            if out is None:
                out = part.new_empty((hidden.shape[0],) + tuple(part.shape[1:]))
            out.index_copy_(0, index, part)
        assert out is not None
        return out
