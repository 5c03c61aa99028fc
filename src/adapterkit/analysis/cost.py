"""What an adapter cost: its parameters and file, and, from its run folder, its training.

A run folder (what ``adapterkit train`` writes) holds ``metrics.jsonl`` (the
logged training speed and, in its last ``"run"`` record, the wall time and
peak memory of the training) and ``adapter/adapterkit.json`` (steps, epochs).
``baseline`` is another run of the same task, full fine-tuning for instance:
an adapterkit run folder or a transformers ``Trainer`` output folder; it is
set beside this one with the ratios.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch.nn as nn

from adapterkit.core.lifecycle import adapter_parameters
from adapterkit.errors import UsageError
from adapterkit.train.records import METRICS_FILE

METADATA_FILE = "adapterkit.json"
TRAINER_STATE = "trainer_state.json"


def run_folder_of(adapter_dir: Path) -> Path | None:
    """The run folder holding ``adapter_dir`` (its parent with a ``metrics.jsonl``), if any."""
    for candidate in (adapter_dir, adapter_dir.parent):
        if (candidate / METRICS_FILE).is_file():
            return candidate
    return None


def trainer_figures(run: Path) -> dict[str, Any]:
    """Steps, wall time and examples/s from a Hugging Face ``Trainer`` output folder (its ``trainer_state.json``)."""
    state = json.loads((run / TRAINER_STATE).read_text())
    figures: dict[str, Any] = {"run": str(run), "steps": state.get("global_step")}
    final = next((r for r in reversed(state.get("log_history", [])) if "train_runtime" in r), {})
    if "train_runtime" in final:
        figures["wall_time_s"] = final["train_runtime"]
    if "train_samples_per_second" in final:
        figures["examples_per_s"] = final["train_samples_per_second"]
    return {k: v for k, v in figures.items() if v is not None}


def training_figures(run: Path) -> dict[str, Any]:
    """Steps, wall time, median tokens/s and examples/s, and peak memory recorded in run folder ``run``.

    ``run`` is an adapterkit run folder, or the output folder of a Hugging Face
    ``Trainer`` (how full fine-tuning is usually run), read from its ``trainer_state.json``.
    """
    if not (run / METRICS_FILE).is_file():
        if (run / TRAINER_STATE).is_file():
            return trainer_figures(run)
        raise UsageError(f"{run} is not a run folder: it has no {METRICS_FILE} (what `adapterkit train --output DIR` "
                         f"writes) and no {TRAINER_STATE} (what a transformers Trainer writes)")
    figures: dict[str, Any] = {"run": str(run)}
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    for key in ("tokens_per_s", "examples_per_s"):
        values = [r[key] for r in train if isinstance(r.get(key), (int, float))]
        if values:
            figures[key] = statistics.median(values)
    ends = [r for r in records if r.get("split") == "run"]  # logged when training finished
    for key in ("wall_time_s", "peak_rss_mib", "peak_cuda_mib"):
        if ends and key in ends[-1]:
            figures[key] = ends[-1][key]
    for folder in (run / "adapter", run):
        if (folder / METADATA_FILE).is_file():
            metadata = json.loads((folder / METADATA_FILE).read_text())
            training = metadata.get("training", {})
            for key in ("steps", "epochs"):
                if key in training:
                    figures[key] = training[key]
            if "num_parameters" in metadata:
                figures["trainable_parameters"] = metadata["num_parameters"]
            break
    return figures


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder``."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def cost_report(model: nn.Module, name: str, adapter_dir: Path | None = None,
                baseline_run: Path | None = None) -> dict[str, Any]:
    """Parameters and sizes of adapter ``name``; training figures of its run and of ``baseline_run`` when known."""
    trainable = sum(p.numel() for p in adapter_parameters(model, name).values())
    total = sum(p.numel() for p in model.parameters())
    report: dict[str, Any] = {"trainable_parameters": trainable, "total_parameters": total,
                              "trainable_percent": 100.0 * trainable / total if total else 0.0}
    if adapter_dir is not None:
        report["adapter_bytes"] = folder_bytes(adapter_dir)
        weights = adapter_dir / "adapter_model.safetensors"
        if weights.is_file():
            report["weights_bytes"] = weights.stat().st_size
        run = run_folder_of(adapter_dir)
        if run is not None:
            report["training"] = training_figures(run)
    if baseline_run is not None:
        baseline = training_figures(baseline_run)
        report["baseline"] = baseline
        mine = report.get("training", {})
        report["ratios"] = {key: mine[key] / baseline[key] for key in ("wall_time_s", "tokens_per_s", "peak_rss_mib",
                                                                        "trainable_parameters")
                            if isinstance(mine.get(key), (int, float)) and baseline.get(key)}
        if "trainable_parameters" in baseline and "trainable_parameters" not in mine:
            report["ratios"]["trainable_parameters"] = trainable / baseline["trainable_parameters"]
    return report
