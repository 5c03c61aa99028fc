"""Run a task's inference over a data set in length-sorted batches.

Shared by ``evaluate``/``predict`` and by the training loop's periodic
evaluation; the model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.core.modes import evaluating
from adapterkit.data.examples import TaskData
from adapterkit.errors import UsageError
from adapterkit.tasks.base import Feature, Task


def inference_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches sorted by length, longest first: least padding, no randomness."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the CPU when asked for, else nothing."""
    if bf16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_inference(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    data: TaskData,
    max_length: int,
    batch_size: int = 64,
    features: list[Feature] | None = None,
    bf16: bool = False,
    adapter_names: Sequence[str | None] | None = None,
) -> tuple[list[Any], list[Any]]:
    """``(predictions per example, raw outputs per feature)`` for ``data``.

    With ``adapter_names`` (one per example, ``None`` for the base model), each
    batch is routed so that every example runs through its own adapter.
    """
    if features is None:
        features = task.encode(data, tokenizer, max_length)
    if adapter_names is not None and len(adapter_names) != len(data.examples):
        raise UsageError(
            f"adapter_names has {len(adapter_names)} entries for {len(data.examples)} inputs; give one per input"
        )
    outputs: list[Any] = [None] * len(features)
    with evaluating(model), torch.no_grad(), autocast(bf16):
        for indices in inference_batches([task.length(f) for f in features], batch_size):
            chunk = [features[i] for i in indices]
            batch = task.collate(chunk, tokenizer)
            with _routed(model, adapter_names, chunk):
                raw = task.infer(model, batch)
            for i, out in zip(indices, raw):
                outputs[i] = out
    return task.decode(data, features, outputs), outputs


def _routed(model: PreTrainedModel, adapter_names: Sequence[str | None] | None,
            chunk: Sequence[Feature]) -> contextlib.AbstractContextManager:
    """Route each feature of a batch to the adapter of the example it came from."""
    if adapter_names is None:
        return contextlib.nullcontext()
    from adapterkit.core import route

    return route(model, [adapter_names[f["_example"]] for f in chunk])
