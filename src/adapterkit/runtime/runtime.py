"""The runtime of one run: device, precision, rank and strategy, resolved once and passed down.

The training loop, evaluation and prediction read everything about *where*
and *how* they compute from a :class:`Runtime`: which device batches go to,
which autocast wraps the forward, whether this process is the one that
writes files, and how the model is wrapped (nothing, DDP, or FSDP2). Under
``torchrun`` the rank and world size come from its environment variables;
without it a run is one process of a world of one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from adapterkit.errors import UserError
from adapterkit.runtime.device import move_batch, resolve_device
from adapterkit.runtime.precision import autocast, resolve_precision

StrategyName = Literal["auto", "none", "ddp", "fsdp"]
STRATEGY_CHOICES = ("auto", "none", "ddp", "fsdp")


class StrategyError(UserError, ValueError):
    """A distributed strategy that is unknown or cannot run as set up."""


@dataclass(frozen=True)
class Runtime:
    """Where and how one process of a run computes.

    Attributes:
        device: where the model and every batch live.
        precision: ``fp32``, ``bf16`` or ``fp16`` (resolved, never ``auto``).
        rank: this process's rank in the world (0 without ``torchrun``).
        world_size: processes in the run.
        local_rank: this process's rank on its machine (picks its GPU).
        strategy: ``none`` (one process), ``ddp`` (DistributedDataParallel:
            every process holds the model, gradients are averaged) or ``fsdp``
            (FSDP2 ``fully_shard``: the frozen base and the adapters are
            sharded per transformer block).
    """

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        """True in the one process that writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group connects this process to others (or FSDP shards over one)."""
        return self.strategy in ("ddp", "fsdp")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this runtime's precision on its device type."""
        return autocast(self.precision, self.device)

    def move(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with its tensors on this runtime's device."""
        return move_batch(batch, self.device)

    def describe(self) -> str:
        """One line for logs: device, precision, and rank / world under a strategy."""
        where = f"{self.device} {self.precision}"
        if self.strategy == "none":
            return where
        return f"{where}, {self.strategy} rank {self.rank} of {self.world_size}"


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``torchrun``'s environment (``(0, 1, 0)`` without it)."""
    def number(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None or value == "":
            return default
        if not value.isdigit():
            raise StrategyError(f"environment variable {name} must be a non-negative integer, found {value!r}")
        return int(value)

    world = number("WORLD_SIZE", 1)
    rank, local = number("RANK", 0), number("LOCAL_RANK", 0)
    if world < 1 or rank >= world:
        raise StrategyError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of the world")
    return rank, world, local


def resolve_runtime(device: str | torch.device | None = "auto", precision: str | None = "auto",
                    strategy: str | None = "auto") -> Runtime:
    """The runtime of this process: device, precision, and (under ``torchrun``) rank and world.

    ``strategy="auto"`` is ``ddp`` when ``torchrun`` started more than one
    process and ``none`` otherwise; ``fsdp`` shards even over a world of one.
    A distributed strategy joins (or starts) the default process group:
    ``nccl`` on CUDA, ``gloo`` on the CPU.

    Raises:
        DeviceError / PrecisionError / StrategyError: a setting that cannot run here.
    """
    rank, world, local = world_from_env()
    dev = resolve_device(device, local)
    chosen = (strategy or "auto").lower()
    if chosen not in STRATEGY_CHOICES:
        raise StrategyError(f"strategy must be one of {list(STRATEGY_CHOICES)}, got {strategy!r}")
    if chosen == "auto":
        chosen = "ddp" if world > 1 else "none"
    if chosen == "none" and world > 1:
        raise StrategyError(f"strategy 'none' runs one process, but WORLD_SIZE is {world}; "
                            "use --strategy ddp or fsdp under torchrun")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if chosen in ("ddp", "fsdp"):
        from adapterkit.runtime.distributed import join_process_group

        join_process_group(dev, rank, world)
    return Runtime(device=dev, precision=resolve_precision(precision, dev), rank=rank, world_size=world,
                   local_rank=local, strategy=chosen)
