"""Layer importance by ablation, as AdapterDrop measures it.

The adapter is taken out of one block at a time, then out of every block
below a cut and every block from a cut up, and the task metric is evaluated
again on the same features each time. Each drop (metric with the whole
adapter minus the metric without those layers) comes with a 95% bootstrap
interval over examples, paired: the same resampled examples score both
sides. The verdict names the layers that can go and the fewest top layers
that keep the metric within ``TOLERANCE_POINTS``, which is what
``--adapter-layers top:K`` needs to know.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from adapterkit.analysis.sites import adapter_sites
from adapterkit.analysis.task_views import TaskView
from adapterkit.core.state import get_state
from adapterkit.data.examples import TaskData
from adapterkit.runtime.inference import run_inference
from adapterkit.tasks.base import Task

BOOTSTRAP = 1000
TOLERANCE_POINTS = 0.5
SEED = 0


@contextlib.contextmanager
def dropped(model: nn.Module, name: str, layers: set[int]) -> Iterator[nn.Module]:
    """Within the block, adapter ``name`` is absent from the blocks in ``layers`` (its weights are put back after)."""
    taken = []
    for site in adapter_sites(model, name):
        if site.layer not in layers:
            continue
        for attr in site.wrapper.containers:
            container = site.wrapper._modules[attr]
            if name in container:
                taken.append((container, container[name]))
                del container[name]
    state = get_state(model)
    state.changed()
    try:
        yield model
    finally:
        for container, value in taken:
            container[name] = value
        state.changed()


def bootstrap_drop(view: TaskView, full: np.ndarray, ablated: np.ndarray,
                   rng: np.random.Generator) -> tuple[float, float, float]:
    """``(drop, low, high)`` in percentage points: the metric lost, with its paired 95% bootstrap interval."""
    drop = float(view.reduce(full) - view.reduce(ablated)) * view.points
    samples = rng.integers(0, len(full), size=(BOOTSTRAP, len(full)))
    drops = (view.reduce(full[samples]) - view.reduce(ablated[samples])) * view.points
    low, high = np.percentile(drops, [2.5, 97.5])
    return drop, float(low), float(high)


def ablate_layers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, view: TaskView, data: TaskData,
                  name: str, max_length: int, batch_size: int) -> dict[str, Any]:
    """Every ablation of this module's docstring, with the verdict.

    Returns ``{"metric", "full", "layers", "single": [...], "below": [...],
    "above": [...], "droppable", "top_k", "verdict"}``; each entry has the
    dropped ``layers``, the ``metric`` without them and ``drop``/``low``/``high``.
    """
    features = task.encode(data, tokenizer, max_length)
    layers = sorted({s.layer for s in adapter_sites(model, name) if s.layer is not None})
    runs: list[tuple[str, int, set[int]]] = [("single", layer, {layer}) for layer in layers]
    runs += [("below", cut, {x for x in layers if x < cut}) for cut in layers[1:]]
    runs += [("above", cut, {x for x in layers if x >= cut}) for cut in layers[1:]]

    def stats(drop_layers: set[int]) -> np.ndarray:
        with dropped(model, name, drop_layers):
            predictions, _ = run_inference(model, tokenizer, task, data, max_length, batch_size, features=features)
        return view.stats(data, predictions)

    progress = tqdm(total=len(runs) + 1, desc="ablate", unit="eval", file=sys.stderr, dynamic_ncols=True)
    full = stats(set())
    progress.update()
    rng = np.random.default_rng(SEED)
    report: dict[str, Any] = {"metric": view.metric, "full": float(view.reduce(full)), "layers": layers,
                              "single": [], "below": [], "above": [], "bootstrap": BOOTSTRAP,
                              "tolerance_points": TOLERANCE_POINTS}
    for kind, cut, drop_layers in runs:
        ablated = stats(drop_layers)
        drop, low, high = bootstrap_drop(view, full, ablated, rng)
        report[kind].append({"cut": cut, "layers": sorted(drop_layers), "metric": float(view.reduce(ablated)),
                             "drop": drop, "low": low, "high": high})
        progress.update()
    progress.close()
    report["droppable"] = [e["cut"] for e in report["single"] if e["high"] <= TOLERANCE_POINTS]
    # adapters only in the top K layers = every layer below the cut dropped
    keep_top = [(len([x for x in layers if x >= e["cut"]]), e) for e in report["below"]
                if e["drop"] <= TOLERANCE_POINTS]
    best = min(keep_top, key=lambda item: item[0], default=(len(layers), None))
    report["top_k"] = best[0]
    report["verdict"] = verdict(report, best[1])
    return report


def verdict(report: dict[str, Any], best_cut: dict[str, Any] | None) -> str:
    """One paragraph a user acts on: which single layers can go, and how many top layers to keep."""
    layers = report["layers"]
    parts = []
    if report["droppable"]:
        parts.append(f"dropping the adapter from any one of layers {report['droppable']} alone costs at most "
                     f"{TOLERANCE_POINTS} points (upper end of the 95% interval)")
    else:
        parts.append(f"every layer's adapter matters: removing any one costs more than {TOLERANCE_POINTS} points "
                     "at the upper end of its 95% interval")
    if best_cut is not None:
        parts.append(f"adapters in the top {report['top_k']} of {len(layers)} layers only (layers {best_cut['cut']} "
                     f"and up) lose {best_cut['drop']:.2f} points [{best_cut['low']:.2f}, {best_cut['high']:.2f}], "
                     f"so --adapter-layers top:{report['top_k']} trades that for skipping the backward below layer "
                     f"{best_cut['cut']}")
    else:
        parts.append(f"no cut keeps the metric within {TOLERANCE_POINTS} points: keep adapters in all "
                     f"{len(layers)} layers")
    return "; ".join(parts) + "."
