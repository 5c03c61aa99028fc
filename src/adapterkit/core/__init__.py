"""Adapters on any ``torch.nn.Module``: registry, injection, lifecycle, save/load."""

from adapterkit.core.compose import CompositionError
from adapterkit.core.config import AdapterConfig, ConfigError
from adapterkit.core.layers import AdapterLayer, MergeError
from adapterkit.core.lifecycle import (
    active_adapters,
    active_plan,
    adapter_parameters,
    adapters_disabled,
    add_adapter,
    delete_adapter,
    get_adapter_config,
    head_parameters,
    place_in_layers,
    list_adapters,
    merge,
    route,
    set_active,
    trainable_summary,
    unload,
    unmerge,
    use,
)
from adapterkit.core.merged import merge_and_unload
from adapterkit.core.merging import MergeReport, merge_adapters
from adapterkit.core.plan import Average, Fuse, Plan, Route, Stack, Sum, plan_from_dict
from adapterkit.core.registry import (
    Method,
    get_config_class,
    get_method,
    register,
    registered_methods,
)
from adapterkit.core.serialization import (
    AdapterFileError,
    BaseModelMismatchError,
    MissingAdapterFileError,
    load_adapter,
    read_adapter_metadata,
    save_adapter,
)
from adapterkit.core.targeting import TargetError

__all__ = [
    "AdapterConfig", "ConfigError", "AdapterLayer", "MergeError", "TargetError", "Method",
    "active_adapters", "adapter_parameters", "adapters_disabled", "add_adapter",
    "delete_adapter", "get_adapter_config", "head_parameters", "list_adapters", "merge",
    "route", "set_active", "trainable_summary", "unload", "unmerge", "get_config_class",
    "get_method", "register", "registered_methods",
    "save_adapter", "load_adapter", "read_adapter_metadata", "AdapterFileError",
    "MissingAdapterFileError", "BaseModelMismatchError",
    "use", "active_plan", "Plan", "Stack", "Sum", "Average", "Fuse", "Route", "plan_from_dict",
    "CompositionError", "merge_and_unload", "merge_adapters", "MergeReport", "place_in_layers",
]
