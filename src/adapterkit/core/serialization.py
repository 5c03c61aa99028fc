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
import warnings
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError

from adapterkit.core.atomic import atomic_folder, interrupted_save
from adapterkit.core.config import AdapterConfig, ConfigError
from adapterkit.core.fingerprint import (
    BaseModelMismatchError,
    check_summary,
    check_touched,
    fingerprint,
    fingerprint_problem,
)
from adapterkit.core.heads import HeadLayer
from adapterkit.core.state import get_state
from adapterkit.core.layers import adapter_layers
from adapterkit.core.lifecycle import (
    add_adapter,
    delete_adapter,
    get_adapter_config,
    list_adapters,
    set_active,
    unload,
)
from adapterkit.core.peft_format import (
    OUR_METHOD_KEY,
    SHARED_FIELDS,
    SavedConfigError,
    config_from_files,
    disagreements,
    field_type_problem,
    from_peft_names,
    own_config_for,
    peft_config_for,
    plain_name,
    task_for_task_type,
    task_type_for_class_name,
    tensor_evidence,
    tensor_value,
    to_peft_names,
)
from adapterkit.core.registry import (
    WRAPPER_COMPONENT,
    Method,
    ShapeMismatchError,
    fit_shape,
    get_method,
    registered_methods,
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
                 "peft_format", "heads", "fingerprint", "quantization")


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
        "quantization": _quantization_of(model),
        **extra,
    }


# Where models/quantize.py records how a base is stored (core reads it, never sets it).
QUANTIZATION_ATTR = "adapterkit_quantization"


def _quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """How the base the adapter was trained on was stored (``None``: float)."""
    record = getattr(model, QUANTIZATION_ATTR, None)
    return record.to_dict() if record is not None else None


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
    trained on is refused with :class:`BaseModelMismatchError`; a folder whose
    files are damaged or contradict each other with :class:`AdapterFileError`.
    """
    folder = Path(folder)
    adapter_config, kit = _read_config_files(folder)
    raw = _read_tensors(folder)
    shapes = {key: tuple(tensor.shape) for key, tensor in raw.items()}
    _check_files_agree(folder, adapter_config, kit, shapes)
    method, config = _parse_config(folder, adapter_config, kit)
    _check_tensors_fit_config(folder, adapter_config, kit, config, shapes)
    saved_base = (kit or {}).get("fingerprint") or {}
    check_summary(saved_base, model, str(folder))
    _note_quantization((kit or {}).get("quantization"), model, folder)
    name = name or (kit or {}).get("name") or "default"
    if name in list_adapters(model):
        raise ValueError(f"model already has an adapter called {name!r}; pass load_adapter(..., name=...)")
    had_adapters = bool(list_adapters(model))
    previous = get_state(model).default if had_adapters else None
    try:
        add_adapter(model, name, config)
    except BaseException as err:  # leave the model as it was, whatever went wrong
        _undo_load(model, name, had_adapters, previous)
        if isinstance(err, TargetError):
            raise BaseModelMismatchError(f"cannot load the adapter in {folder} onto "
                                         f"{type(model).__name__}: {err}") from err
        if isinstance(err, ConfigError):
            raise AdapterFileError(f"{folder / CONFIG_FILE}: {err}") from err
        raise
    try:
        rest = _load_heads(model, name, from_peft_names(raw), folder)
        method.import_tensors(model, name, rest)
        check_touched(saved_base, model, name, str(folder))
    except BaseException as err:  # leave the model as it was, whatever went wrong
        _undo_load(model, name, had_adapters, previous)
        if isinstance(err, (AdapterFileError, BaseModelMismatchError)):
            raise
        if isinstance(err, ShapeMismatchError):
            raise BaseModelMismatchError(f"cannot load the adapter in {folder} onto "
                                         f"{type(model).__name__}: {err}") from err
        if isinstance(err, ValueError):
            # Method.import_tensors reports tensors that do not fit the adapter as a ValueError
            raise AdapterFileError(f"cannot load {folder / WEIGHTS_FILE}: {err}") from err
        raise
    model.train(model.training)  # the new adapter modules follow the model's train/eval mode
    return name


def _note_quantization(trained_on: dict[str, Any] | None, model: nn.Module, folder: Path) -> None:
    """One line when the adapter was trained on a base stored otherwise than this one."""
    here = _quantization_of(model)
    then = (trained_on or {}).get("scheme")
    now = (here or {}).get("scheme")
    if then != now:
        warnings.warn(f"the adapter in {folder} was trained on a base stored in {then or 'float'} and is loaded "
                      f"onto one stored in {now or 'float'}: outputs differ by the quantisation error", stacklevel=3)


def _load_heads(model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
                folder: Path) -> dict[str, torch.Tensor]:
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
            raise AdapterFileError(f"{folder / WEIGHTS_FILE}: the saved task head {_plain_path(path)!r} "
                                   f"lacks {missing}; save the adapter again")
        with torch.no_grad():
            for key, param in own.items():
                param.copy_(fit_shape(rest.pop(key), param, key).to(param.dtype))
    return rest


def _undo_load(model: nn.Module, name: str, had_adapters: bool, previous: Any) -> None:
    """Leave ``model`` as it was before a failed load."""
    if not had_adapters:
        unload(model)
        return
    if name in list_adapters(model):
        delete_adapter(model, name)
    set_active(model, previous)


# --- reading files -----------------------------------------------------------------------
def read_adapter_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything known about a saved adapter, without loading its weights.

    ``adapter_config.json`` and ``adapterkit.json`` merged (the latter wins),
    plus ``adapter_config`` (the raw file), ``format`` ("peft" or
    "adapterkit"), ``method``, ``config``, ``num_parameters``, ``num_tensors``,
    ``head_outputs`` (outputs of the saved task head, or None) and ``files``.
    ``task`` is adapterkit.json's, else the one PEFT's ``task_type`` names,
    else the one the saved base class implies (None when nothing says).
    Settings adapterkit cannot honour are described under ``unsupported``;
    damaged files and files that contradict each other raise
    :class:`AdapterFileError`.
    """
    folder = Path(folder)
    adapter_config, kit = _read_config_files(folder)
    shapes = _read_shapes(folder)
    _check_files_agree(folder, adapter_config, kit, shapes)
    kit = kit or {}
    info: dict[str, Any] = {**adapter_config, **kit, "adapter_config": adapter_config}
    info["format"] = "adapterkit" if OUR_METHOD_KEY in adapter_config else "peft"
    config: AdapterConfig | None = None
    try:
        method, config, _ = config_from_files(adapter_config, kit)
        info.setdefault("method", method.name)
        info.setdefault("config", config.to_dict())
    except SavedConfigError as err:
        raise _config_file_error(folder, err) from err
    except ConfigError as err:  # well-formed, but asks for what adapterkit does not do
        info.setdefault("method", None)
        info["unsupported"] = str(err)
    _check_tensors_fit_config(folder, adapter_config, kit, config, shapes)
    for key in ("name", "labels"):
        info.setdefault(key, None)
    info["task"] = _task_of(adapter_config, kit)
    head = _head_output(shapes, _head_paths(adapter_config, kit))
    info["head_outputs"] = head[1][0] if head else None
    info["num_parameters"] = sum(_numel(list(shape)) for shape in shapes.values())
    info["num_tensors"] = len(shapes)
    info["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return info


def _task_of(adapter_config: dict[str, Any], kit: dict[str, Any]) -> str | None:
    """The adapter's task: adapterkit.json's, PEFT's ``task_type``'s, or the saved base class's."""
    if kit.get("task"):
        return kit["task"]
    task = task_for_task_type(adapter_config.get("task_type"))
    if task is None:
        architecture = (kit.get("fingerprint") or {}).get("architecture")
        task = task_for_task_type(task_type_for_class_name(architecture)) if architecture else None
    return task


def _read_config_files(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(adapter_config.json, adapterkit.json or None) of a saved adapter, their types checked."""
    _check_folder(folder)
    adapter_config = _read_json(folder / CONFIG_FILE, required=True)
    assert adapter_config is not None
    problem = field_type_problem(adapter_config)
    if problem:
        raise AdapterFileError(f"{folder / CONFIG_FILE}: {problem}; correct it or save the adapter again")
    kit = _read_json(folder / KIT_FILE, required=False)
    if kit is not None:
        _check_kit(kit, folder / KIT_FILE)
    return adapter_config, kit


def _weights_path(folder: Path) -> Path:
    """The folder's weights file; a missing one is a MissingAdapterFileError."""
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        return weights
    if (folder / "adapter_model.bin").is_file():
        raise MissingAdapterFileError(
            f"{folder} holds adapter_model.bin (a pickle) but no {WEIGHTS_FILE}; adapterkit reads "
            "safetensors only: re-save it with peft's save_pretrained(safe_serialization=True)")
    raise _missing(weights)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of the folder's weights file."""
    weights = _weights_path(folder)
    try:
        return safetensors.torch.load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise _corrupt(weights, err) from err


def _read_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's weights file, without reading the data."""
    weights = _weights_path(folder)
    try:
        with safetensors.safe_open(str(weights), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise _corrupt(weights, err) from err


def _check_folder(folder: Path) -> None:
    """Refuse a path that is not a folder, saying what it is and what an adapter is."""
    if folder.is_dir():
        return
    if folder.exists():
        parent = folder.parent
        hint = (f"; its folder {parent} is an adapter folder: give that"
                if (parent / CONFIG_FILE).is_file() else "")
        raise MissingAdapterFileError(
            f"{folder} is a file, not a folder: an adapter is a folder holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (and adapterkit's {KIT_FILE}){hint}")
    # a save interrupted mid-swap (a crash, not an exception) leaves the adapters beside it
    hint = interrupted_save(folder)
    raise MissingAdapterFileError(f"no adapter at {folder}: the path does not exist" + (f"; {hint}" if hint else ""))


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when absent and not ``required``."""
    if not path.is_file():
        if required:
            raise _missing(path)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, err) from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} should hold a JSON object, found {type(data).__name__}; "
                               "save the adapter again")
    return data


def _missing(path: Path) -> MissingAdapterFileError:
    """The error for a missing ``adapter_config.json`` or weights file, with what the folder holds."""
    folder = path.parent
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    present = names[:12] + ([f"... {len(names) - 12} more"] if len(names) > 12 else [])
    what = (f"{folder} is not an adapter folder (it holds {present})" if path.name == CONFIG_FILE
            else f"the folder holds {present}")
    inner = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_FILE}")) if folder.is_dir() else []
    if inner:
        hint = f"; give the adapter folder inside it: {folder / inner[0]}"
    elif path.name == CONFIG_FILE:
        hint = "; give the adapter folder itself (a run's adapter/, e.g. runs/<time>/adapter)"
    else:
        hint = ": save the adapter again"
    return MissingAdapterFileError(
        f"adapter file {path} is missing: {what}; an adapter folder holds {CONFIG_FILE} and "
        f"{WEIGHTS_FILE}{hint}")


def _corrupt(path: Path, err: Exception) -> AdapterFileError:
    return AdapterFileError(
        f"adapter file {path} is truncated or corrupt ({_message(err)}); save the adapter again")


# --- checking what the files say ------------------------------------------------------------
def _json_list_of_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# adapterkit.json key -> (test of its value, words for the message); null is always allowed
KIT_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "adapterkit_version": (lambda v: isinstance(v, str), "a version string"),
    "format_version": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "method": (lambda v: isinstance(v, str), "a method name"),
    "config": (lambda v: isinstance(v, dict), "an object of method settings"),
    "peft_format": (lambda v: isinstance(v, bool), "true or false"),
    "heads": (_json_list_of_names, "a list of module names"),
    "task": (lambda v: isinstance(v, str), "a task name such as \"classification\""),
    "labels": (lambda v: isinstance(v, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                     for x in v), "a list of label names"),
    "fingerprint": (lambda v: isinstance(v, dict), "an object describing the base model"),
    "metrics": (lambda v: isinstance(v, dict), "an object of metrics"),
    "columns": (lambda v: isinstance(v, dict), "an object of column names"),
    "base_model": (lambda v: isinstance(v, str), "a model alias or folder"),
    "base_model_path": (lambda v: isinstance(v, str), "a folder"),
    "max_length": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
}


def _check_kit(kit: dict[str, Any], path: Path) -> None:
    """Refuse an ``adapterkit.json`` whose known keys hold values of the wrong type."""
    for key, (test, expected) in KIT_FIELD_TYPES.items():
        value = kit.get(key)
        if value is not None and not test(value):
            raise AdapterFileError(f"{path}: {key!r} should be {expected}, found {json.dumps(value)}; "
                                   "correct it or save the adapter again")
    labels = kit.get("labels")
    if labels and len({str(label) for label in labels}) != len(labels):
        raise AdapterFileError(f"{path}: 'labels' should be distinct, found {json.dumps(labels)}")
    problem = fingerprint_problem(kit.get("fingerprint") or {})
    if problem:
        raise AdapterFileError(f"{path}: 'fingerprint' {problem}; save the adapter again")


def _parse_config(folder: Path, adapter_config: dict[str, Any],
                  kit: dict[str, Any] | None) -> tuple[Method, AdapterConfig]:
    """The method and config adapterkit reads from the folder's files."""
    try:
        method, config, _ = config_from_files(adapter_config, kit)
    except ConfigError as err:
        raise _config_file_error(folder, err) from err
    return method, config


def _config_file_error(folder: Path, err: ConfigError) -> AdapterFileError:
    """``err`` as an AdapterFileError that names the file it is about."""
    return AdapterFileError(f"{folder / getattr(err, 'file', CONFIG_FILE)}: {err}")


def _check_files_agree(folder: Path, adapter_config: dict[str, Any], kit: dict[str, Any] | None,
                       shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a folder whose adapter_config.json and adapterkit.json state a value differently.

    Where the tensors show the value (a LoRA rank, a prompt length), the
    message says so, which tells the user which file is right.
    """
    found = disagreements(adapter_config, kit)
    if not found:
        return
    clauses = []
    for d in found:
        clause = (f"{CONFIG_FILE} has {d.config_field} = {json.dumps(d.config_value)} but {KIT_FILE} "
                  f"has {d.kit_field} = {json.dumps(d.kit_value)}")
        shown = tensor_value(d.kit_field.removeprefix("config."), shapes) if d.kit_field.startswith("config.") else None
        if shown is not None:
            value, tensor, shape = shown
            clause += f" (the tensors say {value}: {tensor} in {WEIGHTS_FILE} has shape {shape})"
        clauses.append(clause)
    said = "; ".join(clauses)
    if OUR_METHOD_KEY in adapter_config:
        why = (f"{KIT_FILE} keeps a copy of the settings in {CONFIG_FILE}, so one of the two was changed "
               "on its own and the folder no longer says which adapter it holds; make both files say the same")
    else:
        why = (f"PEFT reads the folder by {CONFIG_FILE} and adapterkit by {KIT_FILE}, so the two would load "
               f"different adapters; make both files say the same (or delete {KIT_FILE} to read the folder "
               "as PEFT does)")
    raise AdapterFileError(f"the files of the adapter in {folder} disagree: {said}. {why}")


def _check_tensors_fit_config(folder: Path, adapter_config: dict[str, Any], kit: dict[str, Any] | None,
                              config: AdapterConfig | None, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a folder whose config or labels contradict the shapes of its own tensors."""
    evidence = tensor_evidence(config, shapes) if config is not None else None
    if evidence is not None:
        stated = _stated(adapter_config, kit, config.method, evidence.field)
        raise AdapterFileError(
            f"the files of the adapter in {folder} contradict each other: {stated}, but tensor "
            f"{evidence.tensor} in {WEIGHTS_FILE} has shape {evidence.shape}, which is {evidence.found}. "
            f"The folder is inconsistent (this is not a sign of another base model): make the stated "
            f"{evidence.field} fit the tensors, or save the adapter again")
    labels = (kit or {}).get("labels")
    head = _head_output(shapes, _head_paths(adapter_config, kit or {})) if labels else None
    if labels and head is not None and head[1][0] != len(labels):
        tensor, shape = head
        raise AdapterFileError(
            f"the files of the adapter in {folder} contradict each other: {KIT_FILE} lists {len(labels)} "
            f"labels {json.dumps(labels)}, but the task head's output tensor {tensor} in {WEIGHTS_FILE} has "
            f"shape {shape}, which is {shape[0]} outputs. The folder is inconsistent (this is not a sign of "
            f"another base model): list one label per head output in {KIT_FILE}, or save the adapter again")


def _stated(adapter_config: dict[str, Any], kit: dict[str, Any] | None, method: str, field: str) -> str:
    """Which files state config ``field`` and how (``adapterkit.json has config.rank = 4``)."""
    said = []
    kit_config = (kit or {}).get("config")
    if isinstance(kit_config, dict) and field in kit_config:
        said.append(f"{KIT_FILE} has config.{field} = {json.dumps(kit_config[field])}")
    names = {ours: theirs for theirs, ours in SHARED_FIELDS.get(method, ())}
    theirs = field if OUR_METHOD_KEY in adapter_config else names.get(field)
    if theirs is not None and theirs in adapter_config:
        said.append(f"{CONFIG_FILE} has {theirs} = {json.dumps(adapter_config[theirs])}")
    return " and ".join(said) or f"the config says {field}"


def _head_paths(adapter_config: dict[str, Any], kit: dict[str, Any]) -> list[str]:
    """Module paths of the task heads the folder saves (adapterkit.json's heads, PEFT's modules_to_save)."""
    paths = list(kit.get("heads") or []) + list(adapter_config.get("modules_to_save") or [])
    return list(dict.fromkeys(paths))


def _head_output(shapes: dict[str, tuple[int, ...]], heads: list[str]) -> tuple[str, tuple[int, ...]] | None:
    """(name, shape) of the saved task head's output weight, or None when the file does not tell.

    A head is the plain module's parameters; the output weight is its 2-D
    weight, or, for a head of several layers (RoBERTa's dense + out_proj),
    the one that is not square. Adapter tensors inside a head are skipped.
    """
    containers = _adapter_containers()
    weights = []
    for key, shape in shapes.items():
        plain = plain_name(key)
        parts = plain.split(".")
        if (len(shape) == 2 and plain.endswith(".weight") and not containers & set(parts)
                and any(plain.startswith(head + ".") for head in heads)):
            weights.append((key, shape))
    candidates = [w for w in weights if w[1][0] != w[1][1]] or weights
    if not candidates or len({shape[0] for _, shape in candidates}) != 1:
        return None
    return min(candidates)


def _adapter_containers() -> set[str]:
    """Names of the modules that hold adapter weights (``lora_A``, ``ia3_l``...) in every method."""
    out: set[str] = set()
    for method_name in registered_methods():
        layer_class = get_method(method_name).layer_class
        out.update(layer_class.containers if layer_class is not None else ())
    return out


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
