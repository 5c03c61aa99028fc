"""The wrapper every layer-level method builds on, and module-tree utilities.

An :class:`AdapterLayer` keeps the original module as ``base_layer`` and the
per-adapter weights in containers keyed by adapter name (``lora_A["sst2"]``),
so adding, switching, deleting and unloading never touch the base weights.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Iterator

import torch
import torch.nn as nn

from adapterkit.core.config import AdapterConfig
from adapterkit.core.state import AdapterState
from adapterkit.errors import UnknownNameError, UsageError, UserError


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

    def active_adapters(self) -> list[str]:
        """Adapters to apply on top of the (possibly merged) base output."""
        state = self.__dict__["_state"]
        if state.disabled or not state.active:
            return []
        held = self.adapter_names()
        merged = self.merged_adapters
        return [n for n in state.active if n in held and n not in merged]

    def routing(self, batch_size: int) -> list[str | None] | None:
        """The per-example adapter list when routing is on, checked against the batch."""
        state = self.__dict__["_state"]
        routes = state.routing
        if routes is None or state.disabled:
            return None
        if len(routes) != batch_size:
            raise UsageError(
                f"route() was given {len(routes)} adapter names but the batch holds "
                f"{batch_size} examples; give one name (or None) per example"
            )
        return routes

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

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter weights go: the base weights' device, float32 unless base is float64."""
        ref = next(self.base_layer.parameters(), None)
        if ref is None:
            return torch.device("cpu"), torch.float32
        dtype = ref.dtype if ref.dtype == torch.float64 else torch.float32
        return ref.device, dtype


def routed_sum(
    x: torch.Tensor,
    routes: list[str | None],
    held: list[str],
    delta: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
    out: torch.Tensor,
) -> torch.Tensor:
    """Add ``delta(name, x_rows, out_rows)`` to the rows of ``out`` routed to each adapter.

    ``x`` and ``out`` have the batch on dim 0; rows routed to ``None`` or to an
    adapter this layer does not hold are left as they are.
    """
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(routes):
        if name is not None and name in held:
            groups.setdefault(name, []).append(row)
    if not groups:
        return out
    if len(groups) == 1 and len(next(iter(groups.values()))) == len(routes):
        return out + delta(next(iter(groups)), x, out)
    result = out.clone()
    for name, rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        part = delta(name, x.index_select(0, index), out.index_select(0, index))
        result.index_add_(0, index, part.to(out.dtype))
    return result


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
