"""A trained adapter folder back on its base model, and a summary of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.models.aliases import ModelNotFoundError, resolve_model_path
from adapterkit.models.loading import LABELLED_TASKS, TASK_MODEL_CLASSES, load_model

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
KIT_FILE = "adapterkit.json"


def adapter_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """``adapterkit.json`` merged over ``adapter_config.json`` of an adapter folder.

    A path that is not an adapter folder (a file, a run folder, nothing) raises
    :class:`~adapterkit.core.MissingAdapterFileError`; damaged or contradictory
    files raise :class:`~adapterkit.core.AdapterFileError`.
    """
    from adapterkit.core import read_adapter_metadata

    return dict(read_adapter_metadata(Path(folder)))


# where a saved adapter may name its base model: (metadata key, what to call it in messages)
BASE_MODEL_SOURCES: tuple[tuple[str, str], ...] = (
    ("base_model", f"{KIT_FILE} base_model"),
    ("base_model_path", f"{KIT_FILE} base_model_path"),
    ("base_model_name_or_path", f"{CONFIG_FILE} base_model_name_or_path"),
)


def base_model_of(metadata: dict[str, Any]) -> str:
    """The base model an adapter was trained on: its alias or folder, whichever still resolves.

    Tried in turn: adapterkit.json's ``base_model`` (an alias) and
    ``base_model_path``, PEFT's ``base_model_name_or_path``, and the
    fingerprint's ``name_or_path``.
    """
    from adapterkit.core import AdapterFileError

    fingerprint = metadata.get("fingerprint") or {}
    named = [(source, metadata.get(key)) for key, source in BASE_MODEL_SOURCES]
    named.append((f"{KIT_FILE} fingerprint.name_or_path", fingerprint.get("name_or_path")))
    named = [(source, value) for source, value in named if isinstance(value, str) and value]
    for _, candidate in named:
        try:
            resolve_model_path(candidate)
            return candidate
        except ModelNotFoundError:
            continue
    if not named:
        raise AdapterFileError(
            f"the adapter does not say which base model it needs: neither {KIT_FILE} (base_model) nor "
            f"{CONFIG_FILE} (base_model_name_or_path) names one; set base_model_name_or_path in "
            f"{CONFIG_FILE} to the base model's alias or folder")
    said = "; ".join(f"{source} is {value!r}" for source, value in named)
    raise ModelNotFoundError(
        f"the adapter's base model cannot be found on this machine ({said}); install or download it, "
        f"or set base_model_name_or_path in {CONFIG_FILE} to where it is")


def adapter_task(metadata: dict[str, Any], folder: str | os.PathLike) -> str:
    """The task to load the adapter's base model for; an unknown or unstated one is an AdapterFileError."""
    from adapterkit.core import AdapterFileError
    from adapterkit.core.peft_format import PEFT_TASKS

    task = metadata.get("task")
    if task in TASK_MODEL_CLASSES:
        return str(task)
    known = sorted(TASK_MODEL_CLASSES)
    types = ", ".join(f"{t} ({name})" for t, name in PEFT_TASKS.items())
    if task is not None:
        raise AdapterFileError(
            f"{Path(folder) / KIT_FILE}: task {task!r} is not one adapterkit knows; expected one of {known}")
    task_type = (metadata.get("adapter_config") or {}).get("task_type")
    peft_says = (f"its task_type {task_type!r} names no adapterkit task" if task_type
                 else "it has no task_type")
    kit = "adapterkit.json has no task" if (Path(folder) / KIT_FILE).is_file() else "there is no adapterkit.json"
    raise AdapterFileError(
        f"the task of the adapter in {folder} is unknown: {kit}, and {CONFIG_FILE} does not say ({peft_says}). "
        f"Give it in one of two ways: set task_type in {CONFIG_FILE} to one of {types}; or put "
        f'"task": "classification" (or another of {known}) in {KIT_FILE}')


def load_with_adapter(
    folder: str | os.PathLike,
    device: str | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load the base model named in an adapter folder, then the adapter onto it.

    The task comes from adapterkit.json, else from PEFT's ``task_type``; the
    head size from the saved labels, else from the saved head's tensors.
    Returns ``(model, tokenizer, metadata)`` with the adapter active, on
    ``device``, its base stored as ``quantize`` says (see ``load_model``).
    """
    from adapterkit.core import load_adapter

    metadata = adapter_metadata(folder)
    task = adapter_task(metadata, folder)
    metadata["task"] = task
    labels = metadata.get("labels") if task in LABELLED_TASKS else None
    num_labels = metadata.get("head_outputs") if task in LABELLED_TASKS and not labels else None
    model, tokenizer = load_model(base_model_of(metadata), task=task, labels=labels, num_labels=num_labels,
                                  device=device, quantize=quantize)
    load_adapter(model, str(folder))
    model.eval()
    return model, tokenizer, metadata


def adapter_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Method, base model, parameter count, sizes, task, labels and metrics of an adapter.

    ``unsupported`` is present when the folder asks for PEFT features
    adapterkit cannot load (it says which).
    """
    metadata = adapter_metadata(folder)
    files = metadata.get("files", {})
    fingerprint = metadata.get("fingerprint") or {}
    info = {
        "folder": str(folder),
        "method": metadata.get("method") or metadata.get("peft_type"),
        "base_model": (metadata.get("base_model") or metadata.get("base_model_name_or_path")
                       or fingerprint.get("name_or_path")),
        "task": metadata.get("task"),
        "labels": metadata.get("labels"),
        "trainable_parameters": int(metadata.get("num_parameters", 0)),
        "weights_bytes": int(files.get(WEIGHTS_FILE, 0)),
        "folder_bytes": int(sum(files.values())),
        "metrics": metadata.get("metrics") or {},
    }
    if metadata.get("unsupported"):
        info["unsupported"] = metadata["unsupported"]
    return info
