"""Saving an adapter to a folder and loading it back, in PEFT's format where PEFT has the method.

A saved adapter is a folder of four files::

    adapter_config.json         PEFT's config (or ours for methods PEFT lacks)
    adapter_model.safetensors   the adapter's tensors and its task-head copy
    adapterkit.json             what only adapterkit knows: our config, task,
                                labels, base-model fingerprint, caller metadata
    README.md                   a short model card

Folders written by ``peft`` (no ``adapterkit.json``) load too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from adapterkit.core.atomic import atomic_folder
from adapterkit.core.config import AdapterConfig, ConfigError
from adapterkit.core.fingerprint import (
    BaseModelMismatchError,
    check_summary,
    check_touched,
    fingerprint,
)
from adapterkit.core.heads import HeadLayer
from adapterkit.core.layers import adapter_layers
from adapterkit.core.lifecycle import (
    active_adapters,
    add_adapter,
    delete_adapter,
    get_adapter_config,
    list_adapters,
    set_active,
    unload,
)
from adapterkit.core.peft_format import (
    OUR_METHOD_KEY,
    config_from_files,
    from_peft_names,
    own_config_for,
    peft_config_for,
    to_peft_names,
)
from adapterkit.core.registry import (
    WRAPPER_COMPONENT,
    Method,
    ShapeMismatchError,
    fit_shape,
    get_method,
)
from adapterkit.core.targeting import TargetError
from adapterkit.errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KIT_FILE = "adapterkit.json"
CARD_FILE = "README.md"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, KIT_FILE, CARD_FILE)
FORMAT_VERSION = 1
# adapterkit.json keys that caller metadata may not override
RESERVED_KEYS = ("adapterkit_version", "format_version", "name", "method", "config",
                 "peft_format", "heads", "fingerprint")


class AdapterFileError(UserError, ValueError):
    """A file of an adapter folder is truncated, corrupt or does not fit the model."""


class MissingAdapterFileError(AdapterFileError, FileNotFoundError):
    """The adapter folder, or a file it needs, does not exist."""


# --- saving ------------------------------------------------------------------------------
def save_adapter(model: nn.Module, name: str, folder: str | os.PathLike[str],
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write adapter ``name`` (with its task-head copy) to ``folder``, replacing it atomically.

    ``metadata`` (task, labels, base model alias, metrics, ...) goes into
    ``adapterkit.json``. Files already in ``folder`` that are not part of an
    adapter are kept. Returns the folder.
    """
    config = get_adapter_config(model, name)
    method = get_method(config)
    heads = head_tensors(model, name)
    tensors = dict(method.export_tensors(model, name))
    clash = sorted(set(tensors) & set(heads))
    if clash:
        raise ValueError(f"adapter {name!r}: tensors {clash[:3]} are both adapter and head weights")
    tensors.update(heads)
    head_paths = head_modules(model, name)
    peft = peft_config_for(method, config, model, head_paths)
    if peft is not None:
        tensors = to_peft_names(model, tensors, peft["peft_type"])
    kit = _kit_record(model, name, method, config, head_paths, peft is not None, metadata)
    texts = {
        CONFIG_FILE: _json_text(peft if peft is not None else own_config_for(method, config), CONFIG_FILE),
        KIT_FILE: _json_text(kit, KIT_FILE),
        CARD_FILE: _card(kit, tensors, peft is not None),
    }
    arrays = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_folder(folder, ADAPTER_FILES) as tmp:
        (tmp / CONFIG_FILE).write_text(texts[CONFIG_FILE], encoding="utf-8")
        safetensors.torch.save_file(arrays, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / KIT_FILE).write_text(texts[KIT_FILE], encoding="utf-8")
        (tmp / CARD_FILE).write_text(texts[CARD_FILE], encoding="utf-8")
    return Path(folder)


def head_modules(model: nn.Module, name: str) -> list[str]:
    """Paths of the task heads adapter ``name`` has its own copy of (PEFT's ``modules_to_save``)."""
    return [_plain_path(path) for path, layer in adapter_layers(model)
            if isinstance(layer, HeadLayer) and layer.has_adapter(name)]


def head_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s head copy, named like the plain head (``classifier.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        if isinstance(layer, HeadLayer) and layer.has_adapter(name):
            for pname, param in layer.copies[name].named_parameters():
                out[f"{_plain_path(path)}.{pname}"] = param.detach()
    return out


def _kit_record(model: nn.Module, name: str, method: Method, config: AdapterConfig, heads: list[str],
                peft_format: bool, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The content of ``adapterkit.json``."""
    extra = dict(metadata or {})
    reserved = sorted(set(extra) & set(RESERVED_KEYS))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved for adapterkit; rename them")
    return {
        "adapterkit_version": _version(),
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": method.name,
        "config": config.to_dict(),
        "peft_format": peft_format,
        "heads": heads,
        "task": extra.pop("task", None),
        "labels": extra.pop("labels", None) or (_config_labels(model) if heads else None),
        "fingerprint": fingerprint(model, name),
        **extra,
    }


def _card(kit: dict[str, Any], tensors: dict[str, torch.Tensor], peft_format: bool) -> str:
    """A short ``README.md`` model card."""
    base = kit["fingerprint"].get("name_or_path") or kit.get("base_model")
    count = sum(t.numel() for t in tensors.values())
    lines = ["---", f"library_name: {'peft' if peft_format else 'adapterkit'}"]
    lines += [f"base_model: {base}"] if base else []
    lines += ["tags:", "- adapterkit", f"- {kit['method']}", "---", "", f"# {kit['name']}", ""]
    arch = kit["fingerprint"].get("architecture")
    lines.append(f"A {kit['method']} adapter for {base or 'its base model'} ({arch}), "
                 f"saved by adapterkit {kit['adapterkit_version']}: {count:,} parameters.")
    lines.append("")
    for key in ("task", "labels", "metrics"):
        if kit.get(key):
            lines.append(f"- {key}: {json.dumps(kit[key])}")
    lines += ["", "```python", "import adapterkit as ak", "name = ak.load_adapter(model, folder)", "```"]
    if peft_format:
        lines += ["", "It follows PEFT's format: `peft.PeftModel.from_pretrained(base, folder)` loads it too."]
    return "\n".join(lines) + "\n"


# --- loading -----------------------------------------------------------------------------
def load_adapter(model: nn.Module, folder: str | os.PathLike[str], name: str | None = None) -> str:
    """Add the adapter saved in ``folder`` to ``model``, make it active, and return its name.

    ``name`` defaults to the saved name (``"default"`` for PEFT folders). The
    folder may come from :func:`save_adapter` or from ``peft``'s
    ``save_pretrained``. A base model other than the one the adapter was
    trained on is refused with :class:`BaseModelMismatchError`.
    """
    folder = Path(folder)
    adapter_config, kit, raw = _read_folder(folder)
    try:
        method, config, _ = config_from_files(adapter_config, kit)
    except (ConfigError, KeyError, TypeError) as err:
        raise AdapterFileError(f"{folder / CONFIG_FILE}: {_message(err)}") from err
    saved_base = (kit or {}).get("fingerprint") or {}
    check_summary(saved_base, model, str(folder))
    name = name or (kit or {}).get("name") or "default"
    if name in list_adapters(model):
        raise ValueError(f"model already has an adapter called {name!r}; pass load_adapter(..., name=...)")
    had_adapters, previous = bool(list_adapters(model)), active_adapters(model)
    try:
        add_adapter(model, name, config)
    except Exception as err:
        _undo_load(model, name, had_adapters, previous)
        if isinstance(err, TargetError):
            raise BaseModelMismatchError(f"cannot load the adapter in {folder} onto "
                                         f"{type(model).__name__}: {err}") from err
        if isinstance(err, ConfigError):
            raise AdapterFileError(f"{folder / CONFIG_FILE}: {err}") from err
        raise
    try:
        rest = _load_heads(model, name, from_peft_names(raw))
        method.import_tensors(model, name, rest)
        check_touched(saved_base, model, name, str(folder))
    except Exception as err:
        _undo_load(model, name, had_adapters, previous)
        if isinstance(err, BaseModelMismatchError):
            raise
        if isinstance(err, ShapeMismatchError):
            raise BaseModelMismatchError(f"cannot load the adapter in {folder} onto "
                                         f"{type(model).__name__}: {err}") from err
        raise AdapterFileError(f"cannot load {folder / WEIGHTS_FILE}: {_message(err)}") from err
    model.train(model.training)  # the new adapter modules follow the model's train/eval mode
    return name


def _load_heads(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy saved head weights into adapter ``name``'s head copies; return the other tensors.

    A head absent from the file (a PEFT adapter without ``modules_to_save``)
    keeps the base head's weights, as PEFT does.
    """
    rest = dict(tensors)
    for path, layer in adapter_layers(model):
        if not (isinstance(layer, HeadLayer) and layer.has_adapter(name)):
            continue
        own = {f"{_plain_path(path)}.{k}": p for k, p in layer.copies[name].named_parameters()}
        present = [k for k in own if k in rest]
        if not present:
            continue
        missing = sorted(set(own) - set(present))
        if missing:
            raise ValueError(f"the saved task head {_plain_path(path)!r} lacks {missing}")
        with torch.no_grad():
            for key, param in own.items():
                param.copy_(fit_shape(rest.pop(key), param, key).to(param.dtype))
    return rest


def _undo_load(model: nn.Module, name: str, had_adapters: bool, previous: list[str]) -> None:
    """Leave ``model`` as it was before a failed load."""
    if not had_adapters:
        unload(model)
        return
    if name in list_adapters(model):
        delete_adapter(model, name)
    set_active(model, previous or None)


# --- reading files -----------------------------------------------------------------------
def read_adapter_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything known about a saved adapter, without loading its weights.

    ``adapter_config.json`` and ``adapterkit.json`` merged (the latter wins),
    plus ``adapter_config`` (the raw file), ``format`` ("peft" or
    "adapterkit"), ``method``, ``config``, ``num_parameters`` and ``files``.
    """
    folder = Path(folder)
    _check_folder(folder)
    adapter_config = _read_json(folder / CONFIG_FILE, required=True)
    kit = _read_json(folder / KIT_FILE, required=False) or {}
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise _missing(weights)
    try:
        with safetensors.safe_open(str(weights), framework="pt") as handle:
            shapes = [handle.get_slice(k).get_shape() for k in handle.keys()]
    except Exception as err:
        raise _corrupt(weights, err) from err
    info: dict[str, Any] = {**adapter_config, **kit, "adapter_config": adapter_config}
    info["format"] = "adapterkit" if OUR_METHOD_KEY in adapter_config else "peft"
    try:
        method, config, _ = config_from_files(adapter_config, kit)
        info.setdefault("method", method.name)
        info.setdefault("config", config.to_dict())
    except (ConfigError, KeyError) as err:
        info.setdefault("method", None)
        info["unsupported"] = _message(err)
    for key in ("name", "task", "labels"):
        info.setdefault(key, None)
    info["num_parameters"] = sum(_numel(shape) for shape in shapes)
    info["num_tensors"] = len(shapes)
    info["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return info


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapterkit.json or None, tensors) of a saved adapter."""
    _check_folder(folder)
    adapter_config = _read_json(folder / CONFIG_FILE, required=True)
    kit = _read_json(folder / KIT_FILE, required=False)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise MissingAdapterFileError(
                f"{folder} holds adapter_model.bin (a pickle) but no {WEIGHTS_FILE}; adapterkit reads "
                "safetensors only: re-save it with peft's save_pretrained(safe_serialization=True)")
        raise _missing(weights)
    try:
        tensors = safetensors.torch.load_file(str(weights))
    except Exception as err:
        raise _corrupt(weights, err) from err
    return adapter_config, kit, tensors


def _check_folder(folder: Path) -> None:
    if folder.is_dir():
        return
    what = "is a file, not a folder" if folder.exists() else "does not exist"
    # a save interrupted mid-swap (a crash, not an exception) leaves the adapters beside it
    leftovers = folder.parent.glob(f".{folder.name}.*-*") if not folder.exists() else []
    aside = sorted(str(p) for p in leftovers if p.is_dir())
    hint = f"; an interrupted save left {aside}: rename the complete one to {folder.name}" if aside else ""
    raise MissingAdapterFileError(f"no adapter at {folder}: the path {what}{hint}")


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when absent and not ``required``."""
    if not path.is_file():
        if required:
            raise _missing(path)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, err) from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _missing(path: Path) -> MissingAdapterFileError:
    present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
    return MissingAdapterFileError(
        f"adapter file {path} is missing (the folder holds {present}); an adapter folder needs "
        f"{CONFIG_FILE} and {WEIGHTS_FILE}: save the adapter again")


def _corrupt(path: Path, err: Exception) -> AdapterFileError:
    return AdapterFileError(
        f"adapter file {path} is truncated or corrupt ({_message(err)}); save the adapter again")


# --- small helpers -----------------------------------------------------------------------
def _plain_path(path: str) -> str:
    return ".".join(p for p in path.split(".") if p != WRAPPER_COMPONENT)


def _json_text(data: dict[str, Any], file: str) -> str:
    try:
        return json.dumps(data, indent=2, sort_keys=file == CONFIG_FILE) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot write {file}: {err}; metadata must be JSON data "
                         "(dicts, lists, strings, numbers, booleans, None)") from err


def _config_labels(model: nn.Module) -> list[str] | None:
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        labels = [str(id2label[i]) for i in range(len(id2label))]
    except KeyError:
        return None
    return None if labels == [f"LABEL_{i}" for i in range(len(labels))] else labels  # HF's placeholders


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adapterkit")
    except PackageNotFoundError:
        return "unknown"


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


__all__ = ["save_adapter", "load_adapter", "read_adapter_metadata", "AdapterFileError",
           "MissingAdapterFileError", "BaseModelMismatchError"]
