"""Where and how a run computes: device, precision, rank, strategy; below both training and evaluation.

- :mod:`~adapterkit.runtime.device`: ``--device auto|cpu|cuda|mps``, moving batches.
- :mod:`~adapterkit.runtime.precision`: ``--precision auto|fp32|bf16|fp16``, autocast, fp16's scaler.
- :mod:`~adapterkit.runtime.runtime`: :class:`Runtime`, resolved once per run.
- :mod:`~adapterkit.runtime.distributed`: process group, DDP / FSDP2, reductions, full state.
- :mod:`~adapterkit.runtime.inference`: a task's inference over a data set, on the model's device.
"""

from adapterkit.runtime.device import DEVICE_CHOICES, DeviceError, model_device, move_batch, resolve_device
from adapterkit.runtime.precision import (
    AUTO_PRECISION_RULE,
    PRECISION_CHOICES,
    PrecisionError,
    autocast,
    cpu_has_native_bf16,
    native_bf16,
    resolve_precision,
)
from adapterkit.runtime.runtime import STRATEGY_CHOICES, Runtime, StrategyError, resolve_runtime

__all__ = ["AUTO_PRECISION_RULE", "DEVICE_CHOICES", "DeviceError", "PRECISION_CHOICES", "PrecisionError", "Runtime",
           "STRATEGY_CHOICES", "StrategyError", "autocast", "cpu_has_native_bf16", "model_device", "move_batch",
           "native_bf16", "resolve_device", "resolve_precision", "resolve_runtime"]
