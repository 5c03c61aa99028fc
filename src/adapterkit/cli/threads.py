"""The command line's thread policy: how many torch threads each ``adapterkit`` process uses.

The library leaves torch's thread count alone (``TrainConfig.num_threads``
sets it when asked). The command line applies this documented default:

- ``--threads N``: N threads.
- otherwise one per core this process may use (its CPU affinity), divided
  among the processes ``torchrun`` started on this machine
  (``LOCAL_WORLD_SIZE``), at least one;
- and one thread when the machine is already busier than its cores
  (1-minute load average above the core count): threads that wait on each
  other while other processes hold the cores make each step many times slower.
"""

from __future__ import annotations

import os

import torch


def default_threads() -> int:
    """The policy's thread count for this process (see the module docstring)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    share = max(1, cores // max(1, int(local) if local.isdigit() else 1))
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores
    return 1 if busy else share


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` or the policy's default; returns the number set."""
    count = threads if threads is not None else default_threads()
    if count < 1:
        from adapterkit.errors import UsageError

        raise UsageError(f"--threads must be 1 or more, got {count}")
    torch.set_num_threads(count)
    return count
