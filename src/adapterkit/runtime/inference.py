"""Run a task's inference over a data set in length-sorted batches, on the model's device.

Shared by ``evaluate``/``predict``, the training loop's periodic evaluation
and the encoder server; it sits below all of them. The model's train/eval
mode is restored afterwards.
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
from adapterkit.runtime.cpu_matmul import resolve_cpu_matmul, use_onednn_linear
from adapterkit.runtime.device import model_device, move_batch
from adapterkit.runtime.precision import autocast
from adapterkit.tasks.base import Feature, Task


def inference_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches sorted by length, longest first: least padding, no randomness."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def infer_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    features: Sequence[Feature],
    batch_size: int = 64,
    precision: str = "fp32",
    adapter_names: Sequence[str | None] | None = None,
) -> list[Any]:
    """The task's raw output for each feature (in feature order), batches on the model's device.

    ``precision``: ``fp32``, ``bf16`` or ``fp16`` autocast. ``adapter_names``:
    one per *example* (``feature["_example"]``), each batch routed accordingly.
    """
    device = model_device(model)
    outputs: list[Any] = [None] * len(features)
    onednn = device.type == "cpu" and resolve_cpu_matmul("auto")  # runtime/cpu_matmul.py: rounding only
    with evaluating(model), torch.no_grad(), autocast(precision, device), task.narrowed(model), \
            use_onednn_linear(model, onednn):
        for indices in inference_batches([task.length(f) for f in features], batch_size):
            chunk = [features[i] for i in indices]
            batch = move_batch(task.collate(chunk, tokenizer), device)
            with _routed(model, adapter_names, chunk):
                raw = task.infer(model, batch)
            for i, out in zip(indices, raw):
                outputs[i] = out
    return outputs


def run_inference(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    data: TaskData,
    max_length: int,
    batch_size: int = 64,
    features: list[Feature] | None = None,
    precision: str = "fp32",
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
    outputs = infer_outputs(model, tokenizer, task, features, batch_size, precision, adapter_names)
    return task.decode(data, features, outputs), outputs


def _routed(model: PreTrainedModel, adapter_names: Sequence[str | None] | None,
            chunk: Sequence[Feature]) -> contextlib.AbstractContextManager:
    """Route each feature of a batch to the adapter of the example it came from."""
    if adapter_names is None:
        return contextlib.nullcontext()
    from adapterkit.core import route

    return route(model, [adapter_names[f["_example"]] for f in chunk])
