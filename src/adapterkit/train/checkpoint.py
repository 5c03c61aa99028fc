"""Atomic checkpoints that let a run resume exactly where it stopped.

A checkpoint folder holds:

- ``trainable.safetensors``: every trainable parameter (adapter + head), by name;
- ``optimizer.pt`` / ``scheduler.pt``: their ``state_dict()``s;
- ``rng.pt``: torch's CPU generator state;
- ``state.json``: loop position (step, epoch, batch in epoch), best metric,
  evaluation history, Python and numpy RNG states, and the settings that
  must match on resume.

It is written to a temporary folder beside its final place and then renamed,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"


@dataclass
class LoopState:
    """Where the loop is, and what it has learned so far about the best checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # next micro-batch of the current epoch
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records
    stopped_early: bool = False


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states (torch's as a tensor, the rest as JSON data)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Undo ``rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved trainable parameters back; the names must match exactly."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the checkpoint does not fit this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same "
            "model, method and adapter settings"
        )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(tensors[name])


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final``: rename the old one aside, rename, then delete the old."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def write_atomically(final: Path, files: dict[str, Any]) -> None:
    """Write ``{filename: content}`` into ``final`` through a temporary folder.

    Content types: a dict of tensors (safetensors), a dict/list (JSON),
    anything else (``torch.save``).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        for name, content in files.items():
            path = tmp / name
            if name.endswith(".safetensors"):
                save_file(content, str(path))
            elif name.endswith(".json"):
                path.write_text(json.dumps(content, indent=1))
            else:
                torch.save(content, path)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: LoopState,
    rng: dict[str, Any],
    fingerprint: dict[str, Any],
) -> None:
    """Everything needed to continue the run, written atomically to ``folder``."""
    write_atomically(folder, {
        WEIGHTS_FILE: trainable_state(model),
        "optimizer.pt": optimizer.state_dict(),
        "scheduler.pt": scheduler.state_dict(),
        "rng.pt": rng["torch"],
        STATE_FILE: {
            "loop": asdict(state),
            "rng": {"python": rng["python"], "numpy": rng["numpy"]},
            "fingerprint": fingerprint,
        },
    })


def find_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint at ``folder`` (or its ``.old`` twin left by a crash mid-swap)."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict[str, Any],
) -> LoopState:
    """Restore weights, optimizer, scheduler and RNGs; return the loop position."""
    meta = json.loads((folder / STATE_FILE).read_text())
    saved = meta["fingerprint"]
    differs = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differs.items())
        raise ValueError(f"cannot resume from {folder}: settings differ ({detail}); "
                         "resume with the settings of the interrupted run")
    load_trainable_state(model, load_file(str(folder / WEIGHTS_FILE)), str(folder))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state({**meta["rng"], "torch": torch.load(folder / "rng.pt", weights_only=True)})
    return LoopState(**meta["loop"])
