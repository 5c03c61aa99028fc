"""Where an adapter changes the model's behaviour on data.

The same examples run through the model with the adapter and without it
(:func:`base_model`: adapters disabled, the adapter's trained task head kept),
with the same length and batching, and are compared:

- predictions: how many changed, a confusion matrix of base against adapted
  predictions (``task_views``: labels, word tags or right/wrong answers), the
  task metric both ways, and the examples that moved most;
- hidden states: the mean cosine distance between base and adapted outputs
  of every transformer block, over the real (unpadded) tokens of a sample;
- bottleneck adapters: each one's output norm over the norm of the output it
  is added to, over the same tokens.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from transformers import PreTrainedTokenizerBase

from adapterkit.analysis.sites import adapter_sites, layer_blocks
from adapterkit.analysis.task_views import TaskView
from adapterkit.core.lifecycle import adapters_disabled
from adapterkit.core.modes import evaluating
from adapterkit.core.state import get_state
from adapterkit.data.examples import TaskData
from adapterkit.runtime.device import model_device, move_batch
from adapterkit.runtime.inference import inference_batches, run_inference
from adapterkit.tasks.base import Task

MOST_CHANGED = 10
TEXT_CHARS = 200


@contextlib.contextmanager
def base_model(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """The base model, but answering with adapter ``name``'s trained task head where it has one.

    A head trained with the adapter (a classifier on MiniLM) has no pretrained
    counterpart; the base's own is untrained. Comparing against that would
    count the head's training as the adapter's doing, so for the block the
    adapter's copy of the head stands in the base head's place.
    """
    heads = [s.wrapper for s in adapter_sites(model, name, "head")]
    swapped = []
    for head in heads:
        original, trained = head._modules["base_layer"], head.copies[name]
        head._modules["base_layer"] = trained
        head.copies[name] = original
        swapped.append(head)
    state = get_state(model)
    state.changed()
    try:
        with adapters_disabled(model):
            yield model
    finally:
        for head in swapped:
            trained, original = head._modules["base_layer"], head.copies[name]
            head._modules["base_layer"] = original
            head.copies[name] = trained
        state.changed()


def both_predictions(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, data: TaskData, name: str,
                     max_length: int, batch_size: int) -> dict[str, tuple[list[Any], list[Any]]]:
    """``{"adapted": (predictions, outputs), "base": (...)}`` on the same features (base: :func:`base_model`)."""
    features = task.encode(data, tokenizer, max_length)
    adapted = run_inference(model, tokenizer, task, data, max_length, batch_size, features=features)
    with base_model(model, name):
        base = run_inference(model, tokenizer, task, data, max_length, batch_size, features=features)
    return {"adapted": adapted, "base": base}


def prediction_changes(view: TaskView, data: TaskData, runs: dict[str, tuple[list[Any], list[Any]]]) -> dict[str, Any]:
    """Changed predictions, the base x adapted confusion matrix, both metrics and the most-changed examples."""
    (adapted, adapted_out), (base, base_out) = runs["adapted"], runs["base"]
    per_example = len(adapted_out) == len(data.examples)  # one raw output per example (classification)
    changes = np.array([view.change(b, a, base_out[i] if per_example else None, adapted_out[i] if per_example else None)
                        for i, (b, a) in enumerate(zip(base, adapted))])
    base_units, adapted_units = view.units(data, base), view.units(data, adapted)
    names = sorted(set(base_units) | set(adapted_units) | set(data.labels or []))
    index = {n: i for i, n in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for b, a in zip(base_units, adapted_units):
        matrix[index[b], index[a]] += 1
    changed = [view.key(b) != view.key(a) for b, a in zip(base, adapted)]
    report: dict[str, Any] = {
        "examples": len(data.examples),
        "changed": int(sum(changed)),
        "changed_share": float(np.mean(changed)) if changed else 0.0,
        "metric": view.metric,
        "base_metric": float(view.reduce(view.stats(data, base))),
        "adapted_metric": float(view.reduce(view.stats(data, adapted))),
        "confusion": {"units": names, "matrix": matrix.tolist(), "rows": "base", "columns": "adapted"},
    }
    if data.task == "classification":
        labels = data.labels or []
        totals = Counter(labels[e["label"]] for e in data.examples)
        moved = Counter(labels[e["label"]] for e, c in zip(data.examples, changed) if c)
        report["changed_by_class"] = {k: {"examples": totals[k], "changed": moved[k]} for k in labels}
    order = np.argsort(-changes, kind="stable")[:MOST_CHANGED]
    report["most_changed"] = [
        {"index": int(i), "text": view.text(data.examples[i])[:TEXT_CHARS], "change": float(changes[i]),
         "base": view.show(base[i]), "adapted": view.show(adapted[i])}
        for i in order if changes[i] > 0
    ]
    return report


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def activation_changes(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, data: TaskData, name: str,
                       max_length: int, batch_size: int) -> dict[str, Any]:
    """Per block, the mean cosine distance of adapted from base outputs; per bottleneck, its output ratio.

    Input-side methods (prompt tuning) lengthen the sequence; the base's tokens
    are compared with the same tokens at the end of the adapted sequence.
    """
    blocks = layer_blocks(model)
    features = task.encode(data, tokenizer, max_length)
    device = model_device(model)
    distance_sum = np.zeros(len(blocks))
    bottleneck_sites = adapter_sites(model, name, "bottleneck")
    ratio_sum = np.zeros(len(bottleneck_sites))
    tokens = 0
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(key: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            seen.setdefault(key, []).append(_first_tensor(output).detach().float())
        return hook

    def run(batch: dict[str, torch.Tensor], adapted: bool) -> None:
        seen.clear()
        if adapted:
            task.infer(model, batch)
        else:
            with base_model(model, name):
                task.infer(model, batch)

    handles = [b.register_forward_hook(keep(f"block{i}")) for i, b in enumerate(blocks)]
    for j, site in enumerate(bottleneck_sites):
        handles.append(site.wrapper.base_layer.register_forward_hook(keep(f"stream{j}")))
        handles.append(site.wrapper.adapter_up[name].register_forward_hook(keep(f"adapter{j}")))
    try:
        with evaluating(model):
            for indices in inference_batches([task.length(f) for f in features], batch_size):
                batch = move_batch(task.collate([features[i] for i in indices], tokenizer), device)
                mask = batch["attention_mask"].bool()  # (batch, T)
                run(batch, adapted=False)
                base = {k: v[-1] for k, v in seen.items() if k.startswith("block")}
                run(batch, adapted=True)
                for i in range(len(blocks)):
                    b, a = base[f"block{i}"], seen[f"block{i}"][-1]
                    a = a[:, a.shape[1] - b.shape[1]:]  # the real tokens' positions (after any virtual ones)
                    distance = 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)  # (batch, T)
                    distance_sum[i] += float(distance[mask].sum())
                for j, site in enumerate(bottleneck_sites):
                    stream, change = seen[f"stream{j}"][-1], seen[f"adapter{j}"][-1]
                    if site.wrapper.parallel[name]:
                        from adapterkit.methods.bottleneck import PARALLEL_SCALING

                        change = change * PARALLEL_SCALING
                    ratio = change.norm(dim=-1) / stream.norm(dim=-1).clamp_min(1e-12)
                    ratio_sum[j] += float(ratio[mask].sum())
                tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    report: dict[str, Any] = {"tokens": tokens,
                              "block_cosine_distance": (distance_sum / max(tokens, 1)).tolist()}
    if bottleneck_sites:
        report["bottleneck_output_ratio"] = [
            {"path": s.path, "layer": s.layer, "module": s.module, "ratio": float(r / max(tokens, 1))}
            for s, r in zip(bottleneck_sites, ratio_sum)]
    return report
