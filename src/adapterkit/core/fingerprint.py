"""What an adapter remembers about its base model, and the check made on load.

The fingerprint holds the base's family (``config.model_type``), class, hidden
size, layer count and vocabulary size, plus a hash of the names and shapes of
the base parameters the adapter touches (the modules it wraps and the task
head). A load onto a base whose fingerprint differs is refused with a message
that names the difference.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn

from adapterkit.core.layers import adapter_layers, innermost
from adapterkit.core.registry import WRAPPER_COMPONENT
from adapterkit.errors import UserError


class BaseModelMismatchError(UserError, ValueError):
    """The adapter was made for a different base model than the one it is loaded onto."""


# fingerprint field -> (config attribute, words used in messages)
SUMMARY_FIELDS: dict[str, tuple[str, str]] = {
    "hidden_size": ("hidden_size", "hidden size"),
    "num_layers": ("num_hidden_layers", "layers"),
    "vocab_size": ("vocab_size", "vocabulary size"),
}


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Family, class and main sizes of ``model`` (None where the model has no HF config)."""
    config = getattr(model, "config", None)
    summary: dict[str, Any] = {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(model).__name__,
    }
    for field, (attr, _) in SUMMARY_FIELDS.items():
        value = getattr(config, attr, None) if config is not None else None
        summary[field] = value if isinstance(value, int) else None
    return summary


def touched_parameters(model: nn.Module, name: str) -> list[str]:
    """``path:shape`` of every base parameter under a module that adapter ``name`` wraps."""
    entries: set[str] = set()
    for path, layer in adapter_layers(model):
        if not layer.has_adapter(name):
            continue
        module_path = ".".join(p for p in path.split(".") if p != WRAPPER_COMPONENT)
        core = innermost(layer)
        for pname, param in core.named_parameters():
            entries.add(f"{module_path}.{pname}:{_logical_shape(core, pname, param)}")
    return sorted(entries)


def _logical_shape(module: nn.Module, pname: str, param: torch.Tensor) -> tuple[int, ...]:
    """The shape a parameter has in float: a 4-bit weight is stored packed, its layer knows the real one."""
    if pname == "weight" and isinstance(module, nn.Linear) and param.dim() == 2 \
            and tuple(param.shape) != (module.out_features, module.in_features):
        return (module.out_features, module.in_features)
    return tuple(param.shape)


def touched_hash(model: nn.Module, name: str) -> str:
    """SHA-256 of :func:`touched_parameters`."""
    return hashlib.sha256("\n".join(touched_parameters(model, name)).encode()).hexdigest()


def fingerprint(model: nn.Module, name: str) -> dict[str, Any]:
    """The base-model fingerprint saved with adapter ``name``."""
    config = getattr(model, "config", None)
    touched = touched_parameters(model, name)
    return {
        **model_summary(model),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "touched_parameters": len(touched),
        "touched_sha256": hashlib.sha256("\n".join(touched).encode()).hexdigest(),
    }


# fingerprint field -> the JSON type its value has (None is always allowed)
FINGERPRINT_TYPES: dict[str, tuple[type, str]] = {
    "model_type": (str, "a string"),
    "architecture": (str, "a class name"),
    "hidden_size": (int, "an integer"),
    "num_layers": (int, "an integer"),
    "vocab_size": (int, "an integer"),
    "name_or_path": (str, "a string"),
    "touched_parameters": (int, "an integer"),
    "touched_sha256": (str, "a hex digest"),
}


def fingerprint_problem(saved: dict[str, Any]) -> str | None:
    """What is wrong with the types of a saved fingerprint's fields, or None when all fit.

    A field of the wrong type would make the load checks compare unlike
    values (``"32"`` against 32) and report a base-model difference that is
    not there.
    """
    for field, (kind, words) in FINGERPRINT_TYPES.items():
        value = saved.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"field {field!r} should be {words}, found {value!r}"
    return None


def check_summary(saved: dict[str, Any], model: nn.Module, where: str) -> None:
    """Refuse ``model`` when its family or main sizes differ from the ``saved`` fingerprint.

    A different class of the same family (``LlamaForCausalLM`` against
    ``LlamaForSequenceClassification``) is allowed: the touched-parameter hash
    decides whether the adapter fits.
    """
    current = model_summary(model)
    differing = [f for f in ("model_type", *SUMMARY_FIELDS) if saved.get(f) is not None and saved.get(f) != current[f]]
    if not differing:
        return
    raise BaseModelMismatchError(
        f"cannot load the adapter in {where}: it was trained on {_describe(saved, differing)}, "
        f"this model is {_describe(current, differing)}. Load it onto the base model it was trained "
        f"on{_named(saved)}."
    )


def check_touched(saved: dict[str, Any], model: nn.Module, name: str, where: str) -> None:
    """Refuse when the base parameters under adapter ``name`` differ in names or shapes."""
    expected = saved.get("touched_sha256")
    if not expected or expected == touched_hash(model, name):
        return
    count = saved.get("touched_parameters")
    raise BaseModelMismatchError(
        f"cannot load the adapter in {where}: the base parameters it adapts differ in names or shapes "
        f"from those it was trained on ({count} parameters then, {len(touched_parameters(model, name))} "
        f"now; model {model_summary(model)['architecture']} against {saved.get('architecture')}). "
        f"Load it onto the base model it was trained on{_named(saved)}."
    )


def _describe(summary: dict[str, Any], fields: list[str]) -> str:
    kind = summary.get("model_type") or "a model without a config"
    words = [f"{kind} ({summary.get('architecture')})"]
    for field in fields:
        if field in SUMMARY_FIELDS:
            words.append(f"{SUMMARY_FIELDS[field][1]} {summary.get(field)}")
    return words[0] if len(words) == 1 else f"{words[0]} with {', '.join(words[1:])}"


def _named(saved: dict[str, Any]) -> str:
    name = saved.get("name_or_path")
    return f" ({name})" if name else ""
