"""Which device a run uses, and moving batches onto it.

``auto`` is CUDA when a CUDA device is present (the process's local rank
picks which one under ``torchrun``), else the CPU. Apple's ``mps`` is used
only when asked for: several operations training needs still fall back to
the CPU there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn as nn

from adapterkit.errors import UserError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(UserError, ValueError):
    """The device asked for does not exist on this machine or is not a device name."""


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    ``local_rank`` picks the GPU of a ``cuda`` or ``auto`` choice when no index
    is given (one GPU per process under ``torchrun``).

    Raises:
        DeviceError: the name is unknown, or that device is not available here.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    kind, _, index = name.partition(":")
    if kind not in DEVICE_CHOICES or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"device must be one of {list(DEVICE_CHOICES)} (or cuda:N), got {name!r}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps' was asked for, but this machine has no Apple GPU that torch can use; "
                              "use --device cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for, but torch {torch.__version__} sees no CUDA GPU "
                          "(a CPU-only build, or no driver); use --device cpu or auto")
    gpu = int(index) if index else local_rank
    if gpu >= torch.cuda.device_count():
        raise DeviceError(f"device cuda:{gpu} was asked for, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", gpu)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (the CPU for a model without parameters)."""
    ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor on ``device`` (other values as they are); no copy when already there."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
