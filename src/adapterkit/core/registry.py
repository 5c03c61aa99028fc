"""The method registry: every adapter method registers one :class:`Method`.

The rest of adapterkit reaches methods only through this table: by method
name (``"lora"``), by config class, or by PEFT ``peft_type``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn

from adapterkit.core.config import AdapterConfig
from adapterkit.core.layers import (
    STORE_ATTR,
    AdapterLayer,
    adapter_layers,
    find_layer,
    get_store,
    set_submodule,
)
from adapterkit.core.state import AdapterState
from adapterkit.errors import UnknownNameError, UnsupportedError, UsageError, UserError


class Method:
    """How one adapter method attaches to, and detaches from, a model.

    Layer methods set ``layer_class`` and implement :meth:`target_paths`; the
    default :meth:`attach` wraps each path. Methods that work at the model's
    input (prompt, prefix) override :meth:`attach` and keep their weights in
    the model's adapter store.
    """

    name: ClassVar[str] = ""
    # Shorter names the command line and configs accept (``"prefix"`` for ``"prefix_tuning"``).
    aliases: ClassVar[tuple[str, ...]] = ()
    # The peak learning rate that works for this method when a run sets none:
    # input-side methods (prompt, prefix) need far larger steps than LoRA.
    default_lr: ClassVar[float] = 1e-3
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    layer_class: ClassVar[type[AdapterLayer] | None] = None
    peft_type: ClassVar[str | None] = None
    mergeable: ClassVar[bool] = False
    # Composition (see core/compose.py): whether a Fuse block may attend over this
    # method's adapters; whether it adds virtual tokens to the input (at most one
    # such adapter per plan); block kind -> why this method cannot take part in it.
    fusable: ClassVar[bool] = False
    input_side: ClassVar[bool] = False
    refuses: ClassVar[dict[str, str]] = {}
    # The ``AdapterLayer.method`` whose layers hold this method's weights (default: ``name``);
    # a fusion keeps its weights in bottleneck layers.
    layer_method: ClassVar[str | None] = None
    # False for methods built over other adapters (a fusion): not trainable from scratch on its own.
    standalone: ClassVar[bool] = True
    # Why ``merge`` refuses this method (shown to the user); methods may say it better.
    not_mergeable_because: ClassVar[str] = (
        "its update is not a change of existing weights (it adds a non-linear computation "
        "or changes the sequence), so no weight matrix of the base model can absorb it"
    )

    @property
    def held_by(self) -> str:
        """The layer method name under which this method's weights live."""
        return self.layer_method or self.name

    # --- attaching ------------------------------------------------------
    def target_paths(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        """Module paths the method wraps for ``config``."""
        raise NotImplementedError

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, state: AdapterState) -> None:
        """Insert adapter ``name`` into ``model``."""
        assert self.layer_class is not None
        for path in self.target_paths(model, config):
            layer = wrap(model, path, self.layer_class, state)
            layer.add_adapter(name, config)

    def detach(self, model: nn.Module, name: str, state: AdapterState) -> None:
        """Remove every trace of adapter ``name``; unwrap layers left empty."""
        for _, layer in list(adapter_layers(model)):
            if layer.method == self.held_by and layer.has_adapter(name):
                layer.remove_adapter(name)
        store = get_store(model)
        if store is not None and name in store.adapters and self.layer_class is None:
            del store.adapters[name]
        for undo in state.cleanups.pop(name, []):
            undo()
        prune_empty_layers(model)

    # --- weights ----------------------------------------------------------
    def parameters_of(self, model: nn.Module, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Full-path (name, parameter) pairs of adapter ``name``."""
        for path, layer in adapter_layers(model):
            if layer.method == self.held_by:
                for local, param in layer.adapter_parameters(name):
                    yield f"{path}.{local}", param
        store = get_store(model)
        if store is not None and name in store.adapters and self.layer_class is None:
            for local, param in store.adapters[name].named_parameters():
                yield f"adapterkit_store.adapters.{name}.{local}", param

    def export_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under their on-disk names.

        The default names a tensor by its parameter path with the adapter-name
        component and any wrapper (``base_layer``) components removed, e.g.
        ``bert.encoder.layer.0.attention.self.query.lora_A.weight`` -- PEFT's
        own naming, less its ``base_model.model.`` prefix. Methods whose
        tensors live elsewhere (prompt, prefix) override this pair of methods.
        """
        return {key: param.detach() for key, param in self.disk_parameters(model, name).items()}

    def import_tensors(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as by :meth:`export_tensors` into adapter ``name``.

        A tensor whose shape differs from the parameter's only by size-1
        dimensions (``(out, 1)`` against ``(out,)``) is reshaped.
        """
        own = self.disk_parameters(model, name)
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise UsageError(
                f"adapter {name!r} ({self.name}): the saved tensors do not fit the model: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}); was it saved from another base model or config?"
            )
        with torch.no_grad():
            for key, param in own.items():
                param.copy_(fit_shape(tensors[key], param, key).to(param.dtype))

    def disk_parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """On-disk name -> parameter for adapter ``name`` (see :meth:`export_tensors`)."""
        return {disk_name(model, path, name): param for path, param in self.parameters_of(model, name)}

    # --- PEFT interchange (methods PEFT also has override these) -----------
    def peft_config(self, config: AdapterConfig, model: nn.Module) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content for ``config`` on ``model``.

        Must hold ``peft_type``; ``modules_to_save`` and an unset ``task_type``
        are filled in by the saver. Tensor names come from :meth:`export_tensors`.
        """
        raise UnsupportedError(f"{self.name} has no PEFT counterpart")

    def config_from_peft(self, data: dict[str, Any]) -> AdapterConfig:
        """Our config for a PEFT ``adapter_config.json`` (raise ConfigError for what we cannot honour)."""
        raise UnsupportedError(f"{self.name} has no PEFT counterpart")


WRAPPER_COMPONENT = "base_layer"


def disk_name(model: nn.Module, path: str, name: str) -> str:
    """``path`` of a parameter of adapter ``name`` without the adapter name and wrappers.

    The adapter-name component is the one right after an adapter layer's
    container (``query.lora_A.<name>.weight``) or the store's
    ``adapters.<name>``; failing both, its last occurrence.
    """
    parts = path.split(".")
    drop = None
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] != name:
            continue
        owner = ".".join(parts[: i - 1])
        module = model.get_submodule(owner) if _has_submodule(model, owner) else None
        in_store = i == 2 and parts[:2] == [STORE_ATTR, "adapters"]
        if in_store or (isinstance(module, AdapterLayer) and parts[i - 1] in module.containers):
            drop = i
            break
        if drop is None:
            drop = i
    if drop is not None:
        parts = parts[:drop] + parts[drop + 1:]
    return ".".join(p for p in parts if p != WRAPPER_COMPONENT)


class ShapeMismatchError(UserError, ValueError):
    """A saved tensor's shape does not fit the parameter it should load into."""


def fit_shape(tensor: torch.Tensor, param: torch.Tensor, key: str) -> torch.Tensor:
    """``tensor`` in ``param``'s shape, if it only lacks or adds size-1 dimensions.

    ``(out,)`` fits ``(out, 1)``; ``(1, n)`` does not fit ``(n, 1)``, since
    that swap changes what the tensor means.
    """
    if tensor.shape == param.shape:
        return tensor
    squeeze = lambda shape: [d for d in shape if d != 1]  # noqa: E731
    if tensor.dim() != param.dim() and squeeze(tensor.shape) == squeeze(param.shape):
        return tensor.reshape(param.shape)
    raise ShapeMismatchError(
        f"tensor {key} has shape {tuple(tensor.shape)} in the file but {tuple(param.shape)} "
        "in the model; the adapter was made for a base model with other layer sizes"
    )


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def wrap(model: nn.Module, path: str, layer_class: type[AdapterLayer], state: AdapterState) -> AdapterLayer:
    """The ``layer_class`` wrapper at ``path``, creating it (outermost) if absent."""
    current = model.get_submodule(path)
    existing = find_layer(current, layer_class)
    if existing is not None:
        return existing
    layer = layer_class(current, state)
    set_submodule(model, path, layer)
    return layer


def prune_empty_layers(model: nn.Module) -> None:
    """Replace wrappers that hold no adapters by what they wrap (innermost first)."""
    layers = sorted(adapter_layers(model), key=lambda item: -len(item[0]))
    for path, layer in layers:
        if not layer.adapter_names():
            set_submodule(model, path, layer.base_layer)
    store = get_store(model)
    if store is not None and len(store.adapters) == 0:
        delattr(model, "adapterkit_store")


_METHODS: dict[str, Method] = {}


def register(method_class: type[Method]) -> type[Method]:
    """Class decorator: make ``method_class`` available by name, config and PEFT type."""
    if not method_class.name:
        raise ValueError(f"{method_class.__name__} must set a method name")
    method_class.config_class.method = method_class.name
    _METHODS[method_class.name] = method_class()
    return method_class


def get_method(key: str | AdapterConfig | type[AdapterConfig]) -> Method:
    """The registered method for a name (or alias), a config, or a config class."""
    _load_builtin_methods()
    if isinstance(key, AdapterConfig) or isinstance(key, type):
        key = key.method
    if key in _METHODS:
        return _METHODS[key]
    for method in _METHODS.values():
        if key in method.aliases:
            return method
    raise UnknownNameError(f"unknown adapter method {key!r}; known: {', '.join(method_choices())}")


def method_choices() -> list[str]:
    """The names users type for the registered methods: each one's shortest alias, or its name."""
    _load_builtin_methods()
    return [min((m.name, *m.aliases), key=len) for _, m in sorted(_METHODS.items()) if m.standalone]


def method_for_peft_type(peft_type: str) -> Method:
    """The method that reads PEFT adapters of ``peft_type`` (e.g. ``"LORA"``)."""
    _load_builtin_methods()
    for method in _METHODS.values():
        if method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in _METHODS.values() if m.peft_type)
    raise UnknownNameError(f"PEFT adapter type {peft_type!r} is not supported; adapterkit reads {known}")


def registered_methods() -> list[str]:
    """Names of all registered methods."""
    _load_builtin_methods()
    return sorted(_METHODS)


def get_config_class(method: str) -> type[AdapterConfig]:
    """The config dataclass of method ``method``."""
    return get_method(method).config_class


def _load_builtin_methods() -> None:
    import adapterkit.methods  # noqa: F401  (registers the built-in methods)
