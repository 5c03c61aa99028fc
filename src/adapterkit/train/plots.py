"""The training-curve PNG: training loss and the evaluation metric against steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use (it is slow)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(records: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """Two panels: train (and eval) loss, and the eval ``metric``, by optimizer step."""
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    evals = [r for r in records if r["split"] == "eval"]
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    eval_loss = [r for r in evals if "loss" in r]
    if eval_loss:
        ax_loss.plot([r["step"] for r in eval_loss], [r["loss"] for r in eval_loss], "o-", label="eval loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    with_metric = [r for r in evals if metric in r]
    ax_metric.plot([r["step"] for r in with_metric], [r[metric] for r in with_metric], "o-", color="tab:green")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(f"eval {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
