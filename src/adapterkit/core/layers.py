"""The wrapper every layer-level method builds on, and module-tree utilities.

An :class:`AdapterLayer` keeps the original module as ``base_layer`` and the
per-adapter weights in containers keyed by adapter name (``lora_A["sst2"]``),
so adding, switching, deleting and unloading never touch the base weights.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Iterator

import torch
import torch.nn as nn

from adapterkit.core.compose import Algebra, cached_fold, route_groups
from adapterkit.core.config import AdapterConfig
from adapterkit.core.context import current_plan, override
from adapterkit.core.plan import Plan, Route, plan_names
from adapterkit.core.state import AdapterState
from adapterkit.errors import UnknownNameError, UserError

# (adapter name, weight) pairs: what an additive method's plan reduces to at one layer.
Terms = tuple[tuple[str, float], ...]


class MergeError(UserError, RuntimeError):
    """The adapter's method has no merged form (or it is already merged)."""


class AdapterLayer(nn.Module):
    """A module wrapped with the adapters of one method.

    Subclasses set ``method`` and ``containers`` (names of the ``ModuleDict`` /
    ``ParameterDict`` attributes keyed by adapter name) and implement
    :meth:`add_adapter` and :meth:`forward`.
    """

    method: ClassVar[str] = ""
    containers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["_state"] = state  # shared, not a submodule
        self.merged_adapters: list[str] = []

    @property
    def state(self) -> AdapterState:
        """The model-wide adapter state this layer reads at every forward."""
        return self.__dict__["_state"]

    # Model code reads its projections' tensors directly (T5's FFN checks
    # ``self.wo.weight.dtype``), so a wrapper shows the wrapped ones, as PEFT's do.
    @property
    def weight(self) -> torch.Tensor:
        """The innermost wrapped module's ``weight``."""
        return innermost(self.base_layer).weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The innermost wrapped module's ``bias``."""
        return innermost(self.base_layer).bias

    # --- which adapters -------------------------------------------------
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds weights for."""
        # Read the containers straight from ``_modules``: this runs at every
        # forward, and ``nn.Module.__getattr__`` would cost more than the rest.
        modules = self._modules
        if len(self.containers) == 1:
            return list(modules[self.containers[0]].keys())
        names: dict[str, None] = {}
        for attr in self.containers:
            names.update(dict.fromkeys(modules[attr].keys()))
        return list(names)

    def has_adapter(self, name: str) -> bool:
        """True when this layer carries weights of adapter ``name``."""
        return name in self.adapter_names()

    def applies(self, name: str) -> bool:
        """True when adapter ``name`` changes this layer's output on top of the base (held, not merged)."""
        return name not in self.merged_adapters and self.has_adapter(name)

    def plan(self) -> "Plan | str":
        """The plan this forward runs: the caller's override, else the model's default."""
        return current_plan(self.__dict__["_state"])

    def active_adapters(self) -> list[str]:
        """Adapters of the current plan that apply at this layer (for inspection and tests)."""
        return [n for n in plan_names(self.plan()) if self.applies(n)]

    # --- lifecycle -------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        """Create the weights of adapter ``name`` for this layer."""
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        """Drop the weights of adapter ``name`` (unmerging it first if merged)."""
        if name in self.merged_adapters:
            self.unmerge(name)
        for attr in self.containers:
            container = getattr(self, attr)
            if name in container:
                del container[name]

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(local name, parameter) pairs that belong to adapter ``name``."""
        for local, param in self.named_parameters():
            parts = local.split(".")
            if len(parts) >= 2 and parts[0] in self.containers and parts[1] == name:
                yield local, param

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights."""
        raise MergeError(
            f"{self.method} adapters cannot be merged: they add a computation "
            "(non-linear or sequence-changing) that no weight matrix of the base layer can absorb"
        )

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` back out of the base weights."""
        raise MergeError(f"{self.method} adapters are never merged, so there is nothing to unmerge")

    # The method's composition rules (core/compose.py), set by each layer class.
    algebra: Algebra

    def effect(self, plan: "Plan | str") -> object | None:
        """What ``plan`` does at this layer (None: nothing), by the method's algebra; cached per plan."""
        return cached_fold(self, plan, self.algebra)

    def fold_into_base(self, plan: "Plan | str", apply: bool = True) -> nn.Module:
        """Fold ``plan``'s change at this layer into the wrapped weights; return the module to put in its place.

        With ``apply=False`` only check that it can be done (raising MergeError
        if not), changing nothing. The default serves methods whose change no
        weight can absorb: it succeeds only when the plan changes nothing here.
        """
        if self.effect(plan) is None:
            return self.base_layer
        raise MergeError(
            f"{self.method} adapters cannot be merged into the base weights: they add a computation "
            "(non-linear or sequence-changing) that no weight matrix of the base layer can absorb"
        )

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter weights go: the base weights' device, float32 unless base is float64."""
        ref = next(self.base_layer.parameters(), None)
        if ref is None:
            return torch.device("cpu"), torch.float32
        dtype = ref.dtype if ref.dtype == torch.float64 else torch.float32
        return ref.device, dtype


class WeightedTerms(Algebra[Terms]):
    """The algebra of additive updates (LoRA deltas, BitFit offsets): every plan is a weighted sum.

    Stack and Sum add the parts' updates, Average weights them; the result is a
    tuple of (adapter, weight) that the layer applies as ``out + sum(w * delta)``.
    """

    def __init__(self, layer: AdapterLayer) -> None:
        self.layer = layer

    def leaf(self, name: str) -> Terms | None:
        return ((name, 1.0),) if self.layer.applies(name) else None

    def sum(self, parts: list[Terms]) -> Terms:
        return tuple(t for part in parts for t in part)

    stack = sum  # an additive update does not depend on what ran before it

    def average(self, parts: list[tuple[Terms | None, float]]) -> Terms:
        return tuple((n, c * w) for part, w in parts if part is not None for n, c in part)


def apply_terms(terms: Terms, delta: Callable[[str], torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out + sum(weight * delta(name))`` with a weight of 1 costing no multiplication."""
    for name, weight in terms:
        change = delta(name).to(out.dtype)
        out = out + (change if weight == 1.0 else change * weight)
    return out


def routed_sum(
    x: torch.Tensor,
    route: Route,
    change: Callable[["Plan | str", torch.Tensor, torch.Tensor], torch.Tensor | None],
    out: torch.Tensor,
) -> torch.Tensor:
    """Add ``change(entry, x_rows, out_rows)`` to the rows of ``out`` routed to each entry.

    ``x`` and ``out`` have the batch on dim 0; rows routed to ``None``, or to a
    plan that changes nothing at this layer (``change`` returns None), are
    left as they are.
    """
    groups = route_groups(route, x.shape[0])
    if len(groups) == 1:
        entry = next(iter(groups))
        if entry is None:
            return out
        part = change(entry, x, out)
        return out if part is None else out + part.to(out.dtype)
    result = None
    for entry, rows in groups.items():
        if entry is None:
            continue
        index = torch.tensor(rows, device=x.device)
        part = change(entry, x.index_select(0, index), out.index_select(0, index))
        if part is None:
            continue
        if result is None:
            result = out.clone()
        result.index_add_(0, index, part.to(out.dtype))
    return out if result is None else result


def call_rows(route: Route, rows: list[int], state: AdapterState, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` on a sub-batch of a routed batch, with the route narrowed to those rows.

    Wrappers nested inside the caller then see a route that matches the rows
    they are given.
    """
    with override(state, route.with_entries([route.entries[r] for r in rows])):
        return fn()


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """All (path, module) pairs of ``model`` that an adapter may target.

    Adapter layers are yielded themselves (so a second method can wrap them)
    but nothing inside them, nor inside the adapter store, is.
    """
    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if child_name == STORE_ATTR and not prefix:
                continue
            yield path, child
            if not isinstance(child, AdapterLayer):
                yield from walk(path, child)

    yield from walk("", model)


def innermost(module: nn.Module) -> nn.Module:
    """The original module under any stack of adapter wrappers."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def find_layer(module: nn.Module, kind: type[AdapterLayer]) -> AdapterLayer | None:
    """The wrapper of type ``kind`` in the stack at ``module``, if any."""
    while isinstance(module, AdapterLayer):
        if isinstance(module, kind):
            return module
        module = module.base_layer
    return None


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the missing part."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise UnknownNameError(f"{type(model).__name__} has no module at {path!r}") from err


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, replacing what was there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter wrapper in ``model`` (outer wrappers before inner ones)."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


STORE_ATTR = "adapterkit_store"


class AdapterStore(nn.Module):
    """Root-level home of adapter weights that belong to no single layer.

    Prompt and prefix tuning keep their learned tokens here, keyed by adapter
    name, so that ``.to()``, ``state_dict()`` and optimisers see them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()


def get_store(model: nn.Module, create: bool = False) -> AdapterStore | None:
    """The model's :class:`AdapterStore`, created on demand when ``create``."""
    store = getattr(model, STORE_ATTR, None)
    if store is None and create:
        store = AdapterStore()
        ref = next(model.parameters(), None)
        if ref is not None:
            store.to(ref.device)
        model.add_module(STORE_ATTR, store)
    return store
