"""Atomic checkpoints that let a run resume exactly where it stopped.

A checkpoint folder holds:

- ``trainable.safetensors``: every trainable parameter (adapter + head), by name;
- ``optimizer.pt`` / ``scheduler.pt``: their ``state_dict()``s;
- ``rng.pt``: torch's CPU generator state (``rng_ranks.pt``: every process's
  RNG states, in runs of several processes);
- ``scaler.pt``: fp16's gradient scaler, when it runs in fp16;
- ``best.safetensors``: the best trainable weights so far (their metrics are in ``state.json``);
- ``state.json``: loop position (step, epoch, batch in epoch), best metric,
  evaluation history, Python and numpy RNG states, and the settings that
  must match on resume.

It is written to a temporary folder beside its final place and then renamed,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from adapterkit.core.atomic import (  # noqa: F401
    OLD_MARK,
    atomic_folder,
    leftovers,
    write_text_atomically,
)
from adapterkit.errors import ResumeError
from adapterkit.runtime.distributed import copy_whole
from adapterkit.train.fingerprint import check_same_run

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
BEST_WEIGHTS_FILE = "best.safetensors"
RNG_RANKS_FILE = "rng_ranks.pt"
SCALER_FILE = "scaler.pt"


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


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved trainable parameters back; the names must match exactly."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ResumeError(
            f"{source}: the checkpoint does not fit this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same "
            "model, method and adapter settings"
        )
    for name, param in own.items():
        copy_whole(param, tensors[name])


def write_atomically(final: Path, files: dict[str, Any]) -> None:
    """Write ``{filename: content}`` as the folder ``final``, replacing it whole and atomically.

    Content types: a dict of tensors (safetensors), a dict/list (JSON),
    anything else (``torch.save``).
    """
    with atomic_folder(final) as tmp:
        for name, content in files.items():
            path = tmp / name
            if name.endswith(".safetensors"):
                save_file(content, str(path))
            elif name.endswith(".json"):
                path.write_text(json.dumps(content, indent=1))
            else:
                torch.save(content, path)


@dataclass
class CheckpointData:
    """What one checkpoint holds, read into memory (rank 0 reads it; the others get it over the group)."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loop: dict[str, Any]
    rng: dict[str, Any]
    rng_ranks: list[dict[str, Any]] | None = None  # every rank's RNGs, for runs of several processes
    scaler: dict[str, Any] | None = None  # fp16's gradient scaler
    best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None


def save_checkpoint(
    folder: Path,
    data: CheckpointData,
    fingerprint: dict[str, Any],
) -> None:
    """Everything needed to continue the run, written atomically to ``folder``.

    ``data.best``: the best weights so far and their metrics. They are kept in
    this folder too, so that a resume never pairs a loop position with a best
    checkpoint written after it.
    """
    files: dict[str, Any] = {
        WEIGHTS_FILE: data.weights,
        "optimizer.pt": data.optimizer,
        "scheduler.pt": data.scheduler,
        "rng.pt": data.rng["torch"],
    }
    if data.rng_ranks is not None:
        files[RNG_RANKS_FILE] = data.rng_ranks
    if data.scaler is not None:
        files[SCALER_FILE] = data.scaler
    if data.best is not None:
        files[BEST_WEIGHTS_FILE] = data.best[0]
    files[STATE_FILE] = {
        "loop": data.loop,
        "rng": {"python": data.rng["python"], "numpy": data.rng["numpy"]},
        "fingerprint": fingerprint,
        "best_metrics": data.best[1] if data.best is not None else None,
    }
    write_atomically(folder, files)


def _complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def find_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint at ``folder``, or the previous complete copy an interrupted save
    renamed aside (only where the swap is two renames, see ``core/atomic.py``); else None."""
    if _complete(folder):
        return folder
    for candidate in leftovers(folder):
        if OLD_MARK in candidate.name and _complete(candidate):
            return candidate
    return None


def read_best(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The best weights and metrics a checkpoint folder holds, if any."""
    if not (folder / BEST_WEIGHTS_FILE).is_file():
        return None
    metrics = json.loads((folder / STATE_FILE).read_text()).get("best_metrics") or {}
    return load_file(str(folder / BEST_WEIGHTS_FILE)), metrics


def read_checkpoint(folder: Path, fingerprint: dict[str, Any]) -> CheckpointData:
    """The checkpoint in ``folder``, after checking that it belongs to the same run.

    Raises:
        ResumeError: the run's settings differ from the checkpoint's (each listed).
    """
    meta = json.loads((folder / STATE_FILE).read_text())
    check_same_run(meta.get("fingerprint") or {}, fingerprint, str(folder.parent.parent))

    def optional(name: str) -> Any:
        path = folder / name
        return torch.load(path, weights_only=True) if path.is_file() else None

    return CheckpointData(
        weights=load_file(str(folder / WEIGHTS_FILE)),
        optimizer=torch.load(folder / "optimizer.pt", weights_only=True),
        scheduler=torch.load(folder / "scheduler.pt", weights_only=True),
        loop=meta["loop"],
        rng={**meta["rng"], "torch": torch.load(folder / "rng.pt", weights_only=True)},
        rng_ranks=optional(RNG_RANKS_FILE),
        scaler=optional(SCALER_FILE),
        best=read_best(folder),
    )
