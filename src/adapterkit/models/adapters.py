"""A trained adapter folder back on its base model, and a summary of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.models.aliases import ModelNotFoundError, resolve_model_path
from adapterkit.models.loading import LABELLED_TASKS, load_model

WEIGHTS_FILE = "adapter_model.safetensors"


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not an adapter folder (no adapter_config.json); give the "
            "run's adapter/ folder, e.g. runs/<time>/adapter"
        )


def adapter_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """``adapterkit.json`` merged over ``adapter_config.json`` of an adapter folder."""
    from adapterkit.core import read_adapter_metadata

    folder = Path(folder)
    _check_folder(folder)
    return dict(read_adapter_metadata(str(folder)))


def base_model_of(metadata: dict[str, Any]) -> str:
    """The base model an adapter was trained on: its alias or folder, whichever still resolves."""
    candidates = [metadata.get("base_model"), metadata.get("base_model_path"),
                  metadata.get("base_model_name_or_path")]
    for candidate in [c for c in candidates if c]:
        try:
            resolve_model_path(candidate)
            return str(candidate)
        except ModelNotFoundError:
            continue
    raise ModelNotFoundError(
        f"the adapter's base model ({', '.join(str(c) for c in candidates if c) or 'not recorded'}) "
        "cannot be found on this machine"
    )


def load_with_adapter(
    folder: str | os.PathLike,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load the base model named in an adapter folder, then the adapter onto it.

    Returns ``(model, tokenizer, metadata)`` with the adapter active.
    """
    from adapterkit.core import load_adapter

    metadata = adapter_metadata(folder)
    task = metadata.get("task", "classification")
    labels = metadata.get("labels") if task in LABELLED_TASKS else None
    model, tokenizer = load_model(base_model_of(metadata), task=task, labels=labels)
    load_adapter(model, str(folder))
    model.eval()
    return model, tokenizer, metadata


def adapter_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Method, base model, parameter count, sizes, task, labels and metrics of an adapter."""
    metadata = adapter_metadata(folder)
    files = metadata.get("files", {})
    return {
        "folder": str(folder),
        "method": metadata.get("method") or metadata.get("peft_type"),
        "base_model": metadata.get("base_model") or metadata.get("base_model_name_or_path"),
        "task": metadata.get("task"),
        "labels": metadata.get("labels"),
        "trainable_parameters": int(metadata.get("num_parameters", 0)),
        "weights_bytes": int(files.get(WEIGHTS_FILE, 0)),
        "folder_bytes": int(sum(files.values())),
        "metrics": metadata.get("metrics", {}),
    }
