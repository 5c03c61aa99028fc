"""Base class for method configurations.

Every adapter method declares one frozen-field dataclass deriving from
:class:`AdapterConfig`. A config knows its method name, validates its own
fields, and converts to and from plain dictionaries (the ``adapter_config.json``
written next to the weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from adapterkit.errors import UserError


class ConfigError(UserError, ValueError):
    """A method configuration holds a value outside what the method accepts."""


@dataclass
class AdapterConfig:
    """Fields shared by every method config; subclasses add their own."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` when a field is out of range."""

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, with the method name under ``"method"``."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"method": self.method, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build the config from :meth:`to_dict` output, rejecting unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        payload = {k: v for k, v in data.items() if k != "method"}
        unknown = sorted(set(payload) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} got unknown field(s) {unknown}; expected some of {sorted(names)}"
            )
        return cls(**payload)


def check_positive(config: AdapterConfig, field: str) -> None:
    """Require ``config.<field>`` to be an integer greater than zero."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"{type(config).__name__}.{field} must be a positive integer, got {value!r}"
        )


def check_choice(config: AdapterConfig, field: str, choices: Sequence[str]) -> None:
    """Require ``config.<field>`` to be one of ``choices``."""
    value = getattr(config, field)
    if value not in choices:
        raise ConfigError(
            f"{type(config).__name__}.{field} must be one of {list(choices)}, got {value!r}"
        )


def check_layers(config: AdapterConfig, field: str = "layers") -> None:
    """Layers are None or a non-empty list of distinct block numbers (kept sorted)."""
    value = getattr(config, field)
    if value is None:
        return
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        if len(set(value)) == len(value):
            setattr(config, field, sorted(value))
            return
    raise ConfigError(f"{type(config).__name__}.{field} must be None or a non-empty list of distinct block "
                      f"numbers (0 = the first block), got {value!r}")


def peft_layers(data: dict) -> list[int] | None:
    """PEFT's ``layers_to_transform`` (an int or a list) as a list of block numbers; refuses ``layers_pattern``
    naming something other than the model's block list, which adapterkit finds on its own."""
    value = data.get("layers_to_transform")
    if value is None:
        return None
    pattern = data.get("layers_pattern")
    if pattern not in (None, "", [], "layer", "layers", "h", "block", "blocks"):
        raise ConfigError(f"PEFT config uses layers_pattern={pattern!r}; adapterkit numbers the blocks of the model's "
                          "first block list and supports only the usual names (layer, layers, h, block, blocks)")
    return [value] if isinstance(value, int) else list(value)


def check_targets(config: AdapterConfig, field: str = "targets") -> None:
    """Targets are None, a regex string, ``"all-linear"``, or a list of names."""
    value = getattr(config, field)
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        setattr(config, field, list(value))
        return
    raise ConfigError(
        f"{type(config).__name__}.{field} must be None, a regex string, 'all-linear' "
        f"or a non-empty list of module names, got {value!r}"
    )
