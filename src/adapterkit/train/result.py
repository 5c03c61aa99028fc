"""What ``train`` returns, how a run stops on a bad loss, and how a run saves its adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from adapterkit.data.examples import TaskData
from adapterkit.errors import UserError
from adapterkit.models.loading import model_source
from adapterkit.train.checkpoint import LoopState, find_checkpoint
from adapterkit.train.config import TrainConfig
from adapterkit.train.records import scalar_metrics

if TYPE_CHECKING:
    from adapterkit.train.run_folder import RunFolder


@dataclass
class TrainResult:
    """The outcome of ``train``.

    Attributes:
        step: optimizer steps done.
        epochs: epochs done (fractional).
        metrics: evaluation metrics of the weights the model ends with (the
            best checkpoint's with ``load_best``); empty without eval data.
        best_metric / best_step: the best value of ``metric`` and where.
        metric: the metric that chose the best checkpoint.
        history: one record of scalar metrics per evaluation.
        stopped_early: early stopping ended the run.
        wall_time_s: seconds spent in ``train``.
        output_dir: the run folder, if any.
        adapter_dir: where the adapter was saved, if it was.
    """

    step: int
    epochs: float
    metrics: dict[str, Any]
    best_metric: float | None
    best_step: int | None
    metric: str
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    wall_time_s: float = 0.0
    output_dir: str | None = None
    adapter_dir: str | None = None


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the run stopped before stepping on it."""

    @classmethod
    def at(cls, value: float, state: LoopState, folder: "RunFolder | None") -> "NonFiniteLossError":
        """The error for a loss of ``value`` during step ``state.step + 1`` of the run in ``folder``."""
        kept = find_checkpoint(folder.path / "checkpoints" / "last") if folder else None
        if folder is not None and folder.staging:
            where = (f"nothing of this run is kept, and the earlier run in {folder.final} is untouched "
                     "(--overwrite replaces it only once the new run has written its first checkpoint)")
        elif kept is not None:
            step = json.loads((kept / "state.json").read_text())["loop"]["step"]
            where = (f"this run's last good checkpoint (step {step}) is kept in {kept}; "
                     f"continue from it with --resume --output {folder.final if folder else ''}")
        else:
            where = "this run had written no checkpoint yet"
        return cls(
            f"training loss became {value} at step {state.step + 1} (epoch {state.epoch + 1}); "
            f"stopped without applying it; {where}. Try a lower learning rate, "
            "gradient clipping (max_grad_norm), or turning bf16 off."
        )


def adapter_metadata(model: nn.Module, data: TaskData, config: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """What ``adapterkit.json`` records about a trained adapter."""
    source = model_source(model)
    return {
        "task": data.task,
        "labels": data.labels,
        "columns": {k: v for k, v in data.columns.items() if v is not None},
        "base_model": source.get("name"),
        "base_model_path": source.get("path"),
        "max_length": config.max_length,
        **({"max_target_length": config.max_target_length} if config.max_target_length else {}),
        "metrics": {"validation": scalar_metrics(result.metrics)} if result.metrics else {},
        "training": {"steps": result.step, "epochs": round(result.epochs, 4), "seed": config.seed,
                     "lr": config.lr, "batch_size": config.batch_size},
    }


def save_run_adapter(model: nn.Module, folder: Path, data: TaskData, config: TrainConfig,
                     result: TrainResult, extra: dict[str, Any] | None = None) -> str | None:
    """Save the model's single active adapter (with metadata) into ``folder``.

    Returns the folder, or ``None`` when the model has no single active adapter.
    """
    from adapterkit.core import active_adapters, save_adapter

    active = active_adapters(model)
    if len(active) != 1:
        return None
    metadata = adapter_metadata(model, data, config, result)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(metadata.get(key), dict):
            metadata[key] = {**metadata[key], **value}
        else:
            metadata[key] = value
    save_adapter(model, active[0], str(folder), metadata=metadata)
    return str(folder)
