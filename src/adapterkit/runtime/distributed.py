"""PyTorch's own distributed engine for training: process group, DDP / FSDP2 wrapping, reductions, state.

Nothing here assumes one machine: the process group is joined through the
``env://`` rendezvous ``torchrun`` sets up (``MASTER_ADDR``/``MASTER_PORT``
for ``--rdzv-endpoint``), and checkpoints are read by rank 0 and sent to the
others over the group, so other machines need not see the run folder.

Full state under FSDP: parameters are ``DTensor`` shards; the trainable ones
are gathered whole (``torch.distributed.checkpoint.state_dict`` with
``full_state_dict=True``) on every save, so the adapter file is the full
adapter, identical to what DDP writes, never rank 0's shard.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from adapterkit.errors import UserError
from adapterkit.runtime.blocks import transformer_blocks

if TYPE_CHECKING:
    from adapterkit.runtime.runtime import Runtime


class DistributedError(UserError, RuntimeError):
    """The process group cannot be set up, or a model cannot be wrapped as the strategy asks."""


def join_process_group(device: torch.device, rank: int, world: int) -> None:
    """Join the default process group (``nccl`` on CUDA, ``gloo`` otherwise) unless already joined.

    A world of one (FSDP over one process) with no ``torchrun`` rendezvous
    gets a private one on 127.0.0.1.
    """
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise DistributedError(f"a process group of {dist.get_world_size()} processes is already set up, "
                                   f"but WORLD_SIZE is {world}")
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world == 1 and "MASTER_ADDR" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        init = f"tcp://127.0.0.1:{port}"
    else:
        init = "env://"
    try:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"cannot join the {backend} process group as rank {rank} of {world} ({err}); "
                               "start the run with torchrun, which sets MASTER_ADDR and MASTER_PORT") from err


def wrap_model(model: nn.Module, runtime: "Runtime") -> nn.Module:
    """Put ``model`` on the runtime's device and wrap it for its strategy; returns what forward calls go to.

    ``ddp``: a ``DistributedDataParallel`` around the model (only trainable
    parameters are synchronised; the frozen base is broadcast from rank 0
    once). ``fsdp``: FSDP2's ``fully_shard`` on each transformer block
    (``runtime.blocks.transformer_blocks``), then on the whole model, in place.
    The adapter bookkeeping stays on ``model`` itself, which is returned for
    ``none`` and ``fsdp``.
    """
    model.to(runtime.device)
    if runtime.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if runtime.strategy == "fsdp":
        shard_blocks(model)
    return model


def shard_blocks(model: nn.Module) -> None:
    """FSDP2: shard every transformer block, then the rest of the model, over the default group."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise DistributedError(f"{type(model).__name__} names no transformer block classes "
                               "(_no_split_modules), so FSDP has nothing to shard per block; use --strategy ddp")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


@contextlib.contextmanager
def accumulating(wrapped: nn.Module, last: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for every micro-batch of a step but the ``last``."""
    if last or not hasattr(wrapped, "no_sync"):
        yield
        return
    with wrapped.no_sync():
        yield


def sum_across(values: list[float], runtime: "Runtime") -> list[float]:
    """Element-wise sums of ``values`` over all processes (the values themselves in one process)."""
    if not runtime.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(runtime))
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_objects(obj: Any, runtime: "Runtime") -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` in one process)."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, runtime: "Runtime") -> Any:
    """Rank 0's ``obj`` in every process."""
    if not runtime.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device(runtime))
    return box[0]


def _collective_device(runtime: "Runtime") -> torch.device:
    return runtime.device if runtime.device.type == "cuda" else torch.device("cpu")


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards (``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole copies of the trainable parameters on the CPU, gathered from FSDP shards when sharded.

    Every process must call this together when the model is sharded (the
    gather is a collective); every process gets the full tensors.
    """
    from torch.distributed.tensor import DTensor

    reshard(model)
    return {n: (p.detach().full_tensor().cpu() if isinstance(p, DTensor) else p.detach().clone()).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block an FSDP-sharded model's parameters are whole tensors (read them; do not write).

    Every process must enter together (the gather is a collective). Outside
    FSDP it does nothing. This is what lets ``save_adapter`` write the full
    adapter from a sharded model.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


def copy_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``param``; a sharded (DTensor) parameter keeps its own shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            shard = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(value)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state.

    FSDP2 keeps a module unsharded after its forward where it would only
    gather it again at once (the root, by default); its parameters are then
    plain tensors, not the shards the optimizer holds.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with whole tensors (gathered from FSDP shards when sharded; a collective)."""
    reshard(model)
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Undo :func:`full_optimizer_state` (each process takes its shard when sharded)."""
    reshard(model)
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
