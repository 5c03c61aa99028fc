"""``analyze``: everything this package can say about one adapter, as one dict; ``write_report`` draws it.

The pieces (each its own file): per-module weight-update figures
(``updates.py``), what the other methods' parameters mean
(``parameters.py``), subspace similarity with a second adapter
(``subspace.py``), behaviour on data (``behaviour.py``), layer ablation
(``ablation.py``) and cost (``cost.py``); ``figures.py`` and ``html.py`` turn
the dict into ``report.html``, PNG files and ``analysis.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from adapterkit.analysis import figures as draw
from adapterkit.analysis.ablation import ablate_layers
from adapterkit.analysis.behaviour import activation_changes, both_predictions, prediction_changes
from adapterkit.analysis.cost import cost_report
from adapterkit.analysis.html import write_html
from adapterkit.analysis.parameters import parameter_report
from adapterkit.analysis.subspace import subspace_similarity
from adapterkit.analysis.task_views import task_view
from adapterkit.analysis.updates import update_sites, weight_and_update, weight_update_report
from adapterkit.core.atomic import write_text_atomically
from adapterkit.core.lifecycle import (active_plan, delete_adapter, get_adapter_config, list_adapters, set_active,
                                       use)
from adapterkit.core.serialization import load_adapter
from adapterkit.data.examples import TaskData
from adapterkit.errors import UnknownNameError, UsageError

HIDDEN_STATE_EXAMPLES = 256  # examples whose hidden states are compared layer by layer
BASE_NOTE = ("base model = the same model with the adapter switched off; where the adapter trained a task head "
             "(the base has none for this task), that head answers in both columns")


def _task_name(model: nn.Module) -> str | None:
    """The model's task, ``None`` for a bare model without a head (its weights can still be analysed)."""
    from adapterkit.tasks import task_name_for_model

    try:
        return task_name_for_model(model)
    except UsageError:
        return None


def _tokenizer_of(model: nn.Module) -> PreTrainedTokenizerBase:
    from adapterkit.models.loading import model_source

    path = model_source(model).get("path") or getattr(model, "name_or_path", None)
    if not path or not Path(path).is_dir():
        raise UsageError("analysing with data needs the model's tokenizer: pass tokenizer=..., or load the model "
                         "with ak.load_model so its folder is known")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _data(model: nn.Module, data: Any, split: str, max_examples: int | None,
          columns: dict[str, str] | None = None) -> TaskData:
    from adapterkit.data import load_data
    from adapterkit.evaluate.api import model_labels

    task = _task_name(model)
    if task is None:
        raise UsageError("analysing with data needs a model loaded for a task (ak.load_model(..., task=...)); "
                         f"this {type(model).__name__} has no task head")
    labels = model_labels(model)
    if not isinstance(data, TaskData):
        data = load_data(data, task=task, split=split, labels=labels, **(columns or {}))
    from adapterkit.tasks import get_task

    data = get_task(task).relabel(data, labels)
    if max_examples is not None and len(data.examples) > max_examples:
        data = TaskData(data.task, data.examples[:max_examples], data.labels, data.source, dict(data.columns))
    return data


def compare_subspaces(model: nn.Module, name: str, other: str) -> dict[str, Any]:
    """φ(i, j) per module shared by adapters ``name`` and ``other`` (both loaded on ``model``)."""
    mine = {s.path: s for s in update_sites(model, name)}
    theirs = {s.path: s for s in update_sites(model, other)}
    shared = [p for p in mine if p in theirs]
    if not shared:
        raise UsageError(f"adapters {name!r} and {other!r} change no weight in common, so their subspaces cannot be "
                         "compared (subspace similarity needs two weight-update adapters, e.g. two LoRAs, on the "
                         "same modules)")
    rank_mine = getattr(get_adapter_config(model, name), "rank", None)
    rank_theirs = getattr(get_adapter_config(model, other), "rank", None)
    modules = []
    for path in shared:
        _, first = weight_and_update(mine[path], name)
        _, second = weight_and_update(theirs[path], other)
        phi = subspace_similarity(first, second, rank_mine or min(first.shape), rank_theirs or min(second.shape))
        flat = [v for row in phi for v in row]
        modules.append({"path": path, "layer": mine[path].layer, "module": mine[path].module, "phi": phi,
                        "phi_mean": sum(flat) / len(flat)})
    return {"modules": modules, "ranks": [rank_mine, rank_theirs]}


def analyze(model: nn.Module, name: str, data: Any = None, compare: str | os.PathLike | None = None,
            ablate: bool = False, *, tokenizer: PreTrainedTokenizerBase | None = None,
            output: str | os.PathLike | None = None, split: str = "validation", max_examples: int | None = None,
            batch_size: int = 64, max_length: int | None = None, adapter_dir: str | os.PathLike | None = None,
            baseline_run: str | os.PathLike | None = None, columns: dict[str, str] | None = None) -> dict[str, Any]:
    """What adapter ``name`` of ``model`` learned, where, and what it cost.

    Args:
        model: a model with adapter ``name`` loaded (unmerged).
        name: the adapter to analyse; it runs active for the analysis, the model's own setting is untouched.
        data: labelled examples (a ``TaskData`` or anything ``load_data`` reads) for the behaviour section
            and the ablation; classification, NER and extractive QA.
        compare: another adapter, by name on ``model`` or by folder (loaded for the analysis and removed
            after), for the subspace similarity of the two updates.
        ablate: re-evaluate the task metric with the adapter removed from each layer and from every layer
            below / above each cut (needs ``data``).
        tokenizer: the model's tokenizer (default: read from the folder the model was loaded from).
        output: when given, the report is written there (``write_report``).
        split: the split of a built-in data set.
        max_examples: use only the first this many examples of ``data``.
        batch_size / max_length: inference batching and input length (default: the task's for the data).
        adapter_dir: the folder the adapter was loaded from: its file size, and its run folder's training figures.
        baseline_run: a run folder of another training of the same task (full fine-tuning) to set the cost beside.
        columns: column names for reading ``data`` (``{"text_column": "sentence"}``), as ``load_data`` takes them.

    Returns:
        A JSON-ready dict: ``adapter``, ``method``, ``task``, ``config``, ``updates`` (weight-update methods),
        ``parameters`` (the others), ``compare``, ``behaviour``, ``ablation``, ``cost``, ``notes``; sections
        not asked for are ``None``. With ``output``, also ``files`` (what was written).
    """
    if name not in list_adapters(model):
        raise UnknownNameError(f"no adapter {name!r} on this model; it has {list_adapters(model)}")
    if ablate and data is None:
        raise UsageError("--ablate re-evaluates the task metric, so it needs --data (labelled examples)")
    from adapterkit.core.layers import adapter_layers

    if any(name in layer.merged_adapters for _, layer in adapter_layers(model)):
        raise UsageError(f"adapter {name!r} is merged into the base weights, where it cannot be told apart from "
                         f"them; ak.unmerge(model, {name!r}) first")
    config = get_adapter_config(model, name)
    from adapterkit.models.loading import model_source

    report: dict[str, Any] = {"adapter": name, "method": config.method, "task": _task_name(model),
                              "base_model": model_source(model).get("name"), "config": config.to_dict(),
                              "updates": None, "parameters": None, "compare": None, "behaviour": None,
                              "ablation": None, "notes": []}
    needs_tokenizer = data is not None or config.method in ("prompt_tuning", "prefix_tuning")
    if tokenizer is None and needs_tokenizer:
        tokenizer = _tokenizer_of(model) if data is not None else _try_tokenizer(model)
    with use(model, name):
        _progress("weights")
        report["updates"] = weight_update_report(model, name)
        report["parameters"] = parameter_report(model, name, tokenizer)
        if compare is not None:
            _progress("subspace similarity")
            report["compare"] = _with_other(model, name, compare)
        if data is not None:
            report.update(_with_data(model, name, tokenizer, _data(model, data, split, max_examples, columns),
                                     batch_size, max_length, ablate))
    report["cost"] = cost_report(model, name, Path(adapter_dir) if adapter_dir else None,
                                 Path(baseline_run) if baseline_run else None)
    if output is not None:
        report["files"] = write_report(report, output)
    return report


def _try_tokenizer(model: nn.Module) -> PreTrainedTokenizerBase | None:
    try:
        return _tokenizer_of(model)
    except (UsageError, OSError):
        return None


def _progress(stage: str) -> None:
    print(f"analyze: {stage}", file=sys.stderr, flush=True)


def _with_other(model: nn.Module, name: str, compare: str | os.PathLike) -> dict[str, Any]:
    if str(compare) in list_adapters(model):
        return {"other": str(compare), **compare_subspaces(model, name, str(compare))}
    folder = Path(compare)
    if not folder.is_dir():
        raise UsageError(f"--compare {compare}: expected an adapter folder or the name of an adapter on the model "
                         f"({list_adapters(model)}); found neither")
    temporary = f"{name}__compared"
    before = active_plan(model)  # loading makes the new adapter active; the user's setting comes back after
    load_adapter(model, folder, name=temporary)
    try:
        return {"other": str(folder), **compare_subspaces(model, name, temporary)}
    finally:
        delete_adapter(model, temporary)
        set_active(model, before)


def _with_data(model: nn.Module, name: str, tokenizer: PreTrainedTokenizerBase, examples: TaskData,
               batch_size: int, max_length: int | None, ablate: bool) -> dict[str, Any]:
    from adapterkit.tasks import get_task

    view = task_view(examples.task)  # ``_data`` read it for the model's task, refusing a model without one
    task = get_task(examples.task)
    length = max_length or task.default_lengths(examples, tokenizer, model)["max_length"]
    _progress(f"behaviour on {len(examples.examples)} examples")
    runs = both_predictions(model, tokenizer, task, examples, name, length, batch_size)
    sample = TaskData(examples.task, examples.examples[:HIDDEN_STATE_EXAMPLES], examples.labels, examples.source,
                      dict(examples.columns))
    result: dict[str, Any] = {"behaviour": {
        "data": str(examples.source), "base_note": BASE_NOTE, "max_length": length,
        "predictions": prediction_changes(view, examples, runs),
        "activations": activation_changes(model, tokenizer, task, sample, name, length, batch_size)}}
    if ablate:
        _progress("ablation")
        result["ablation"] = ablate_layers(model, tokenizer, task, view, examples, name, length, batch_size)
    return result


def _finite(value: Any) -> Any:
    """``value`` with infinities and NaNs as strings, so ``analysis.json`` is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(report: dict[str, Any], output: str | os.PathLike) -> dict[str, str]:
    """Write ``report.html``, the PNG pictures and ``analysis.json`` into ``output``; returns name -> file."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, Path | None] = {}
    updates = report.get("updates")
    if updates:
        pictures["update_heatmaps"] = draw.plot_update_heatmaps(updates["modules"], folder / "update_heatmaps.png")
        pictures["spectra"] = draw.plot_spectra(updates["modules"], folder / "spectra.png")
    if report.get("parameters"):
        pictures["parameters"] = draw.plot_parameters(report["parameters"], folder / "parameters.png")
    if report.get("compare"):
        pictures["subspace_similarity"] = draw.plot_subspace_similarity(report["compare"]["modules"],
                                                                        folder / "subspace_similarity.png")
    if report.get("behaviour"):
        behaviour = report["behaviour"]
        pictures["prediction_changes"] = draw.plot_prediction_changes(behaviour["predictions"],
                                                                      folder / "prediction_changes.png")
        pictures["hidden_state_change"] = draw.plot_hidden_state_change(
            behaviour["activations"]["block_cosine_distance"], folder / "hidden_state_change.png")
    if report.get("ablation"):
        pictures["ablation"] = draw.plot_ablation(report["ablation"], folder / "ablation.png")
    found = {k: v for k, v in pictures.items() if v is not None}
    write_html(report, found, folder / "report.html")
    files = {k: str(v) for k, v in found.items()}
    files["report"] = str(folder / "report.html")
    files["json"] = str(folder / "analysis.json")
    body = {k: v for k, v in report.items() if k != "files"}
    write_text_atomically(folder / "analysis.json", json.dumps(_finite({**body, "files": files}), indent=1))
    return files
