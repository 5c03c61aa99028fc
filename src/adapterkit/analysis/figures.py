"""The report's pictures, drawn with matplotlib (Agg) into PNG files; one function per picture.

Each function takes the numbers ``analyze`` put in the report and a path,
writes the PNG and returns the path, so the HTML page and a user's notebook
show the same files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.evaluate.plots import _pyplot

UPDATE_FIGURES = [("norm_ratio", "‖ΔW‖ / ‖W‖"), ("stable_rank", "stable rank"), ("energy_rank", "rank at 90% energy"),
                  ("amplification", "amplification ‖ΔW‖/‖UᵀWV‖"), ("intruders", "intruder dimensions")]


def _cells(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[str], np.ndarray]:
    """A layer x module array of ``row[key]`` (NaN where absent; rows outside blocks left out)."""
    layers = sorted({r["layer"] for r in rows if r.get("layer") is not None})
    modules = list(dict.fromkeys(r["module"] for r in rows if r.get("layer") is not None))
    grid = np.full((len(layers), len(modules)), np.nan)
    for r in rows:
        value = r.get(key)
        if r.get("layer") is not None and isinstance(value, (int, float)) and math.isfinite(value):
            grid[layers.index(r["layer"]), modules.index(r["module"])] = value
    return layers, modules, grid


def _heatmap(ax: Any, layers: list[int], modules: list[str], grid: np.ndarray, title: str,
             cmap: str = "viridis") -> None:
    image = ax.imshow(grid, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(modules)), labels=modules, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), labels=[str(x) for x in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    if grid.size <= 160:
        for (row, col), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=6, color="white")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _rows_size(layers: int, modules: int) -> tuple[float, float]:
    return max(3.2, 0.55 * modules + 1.8), max(2.6, 0.32 * layers + 1.6)


def plot_update_heatmaps(modules: list[dict[str, Any]], path: Path) -> Path:
    """One layer x module heatmap per weight-update figure."""
    plt = _pyplot()
    layers, names, _ = _cells(modules, "norm_ratio")
    width, height = _rows_size(len(layers), len(names))
    fig, axes = plt.subplots(1, len(UPDATE_FIGURES), figsize=(width * len(UPDATE_FIGURES), height), squeeze=False)
    for ax, (key, title) in zip(axes[0], UPDATE_FIGURES):
        _heatmap(ax, *_cells(modules, key), title)
    return _save(fig, path)


def plot_spectra(modules: list[dict[str, Any]], path: Path) -> Path:
    """Each module's singular values of ΔW relative to its largest, on a log scale, one panel per module type."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(m["module"] for m in modules))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.0), squeeze=False)
    cmap = plt.get_cmap("viridis")
    layers = sorted({m["layer"] for m in modules if m["layer"] is not None}) or [0]
    for ax, kind in zip(axes[0], kinds):
        for m in (m for m in modules if m["module"] == kind):
            values = np.asarray(m["singular_values"][:max(m.get("numerical_rank") or 0, 1)], dtype=float)
            if not len(values) or values[0] <= 0:
                continue
            shade = (layers.index(m["layer"]) / max(len(layers) - 1, 1)) if m["layer"] in layers else 0.0
            ax.semilogy(np.arange(1, len(values) + 1), np.maximum(values / values[0], 1e-12), marker=".",
                        color=cmap(shade), label=f"layer {m['layer']}")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("singular value index")
        ax.set_ylabel("σᵢ / σ₁")
        ax.set_ylim(1e-4, 1.5)
    axes[0][0].legend(fontsize=6)
    return _save(fig, path)


def plot_subspace_similarity(entries: list[dict[str, Any]], path: Path, limit: int = 24) -> Path:
    """φ(i, j) for each compared module (the first ``limit``), one small heatmap per module."""
    plt = _pyplot()
    shown = entries[:limit]
    columns = min(6, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    image = None
    for ax, entry in zip(axes.flat, shown):
        phi = np.asarray(entry["phi"], dtype=float)
        image = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="magma", origin="lower",
                  extent=(0.5, phi.shape[1] + 0.5, 0.5, phi.shape[0] + 0.5), aspect="auto")
        ax.set_title(f"L{entry['layer']} {entry['module']}", fontsize=7)
        ax.set_xlabel("j (second)", fontsize=6)
        ax.set_ylabel("i (first)", fontsize=6)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), fraction=0.02, pad=0.02, label="φ(i, j)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_parameters(report: dict[str, Any], path: Path) -> Path | None:
    """The picture of a non-weight-update method's parameters (see ``parameters.py``)."""
    plt = _pyplot()
    method = report["method"]
    if method in ("ia3", "bitfit", "bottleneck"):
        key, title = {"ia3": ("mean_abs_deviation", "IA3: mean |scale - 1|"),
                      "bitfit": ("offset_norm", "BitFit: ‖bias offset‖"),
                      "bottleneck": ("up_norm", "bottleneck: ‖up projection‖")}[method]
        layers, names, grid = _cells(report["modules"], key)
        fig, ax = plt.subplots(figsize=_rows_size(len(layers), len(names)))
        _heatmap(ax, layers, names, grid, title)
        return _save(fig, path)
    if method == "prompt_tuning":
        norms = [t["norm_ratio"] for t in report["tokens"]]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(norms) + 2), 3.0))
        ax.bar(range(len(norms)), norms)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("virtual token")
        ax.set_ylabel("norm / mean vocabulary norm")
        ax.set_title("prompt tuning: virtual token norms", fontsize=9)
        return _save(fig, path)
    if method == "prefix_tuning":
        layers = report["layers"]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 3.0))
        x = np.arange(len(layers))
        ax.bar(x - 0.2, [e["key_norm"] for e in layers], width=0.4, label="keys")
        ax.bar(x + 0.2, [e["value_norm"] for e in layers], width=0.4, label="values")
        ax.set_xticks(x, labels=[str(e["layer"]) for e in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("mean norm per prefix token")
        ax.legend(fontsize=7)
        ax.set_title("prefix tuning: key and value norms", fontsize=9)
        return _save(fig, path)
    return None


def plot_prediction_changes(changes: dict[str, Any], path: Path) -> Path:
    """The base (rows) x adapted (columns) confusion matrix of predictions, counts annotated."""
    plt = _pyplot()
    units, matrix = changes["confusion"]["units"], np.asarray(changes["confusion"]["matrix"])
    size = max(3.5, 0.45 * len(units) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    ax.set_xticks(range(len(units)), labels=units, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(units)), labels=units, fontsize=7)
    ax.set_xlabel("adapted model")
    ax.set_ylabel("base model")
    ax.set_title(f"{changes['changed']} of {changes['examples']} predictions changed", fontsize=9)
    if matrix.size <= 400:
        top = np.log1p(matrix).max() / 2 if matrix.size else 0
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(col, row, str(value), ha="center", va="center", fontsize=6,
                    color="white" if np.log1p(value) > top else "black")
    return _save(fig, path)


def plot_hidden_state_change(distances: list[float], path: Path) -> Path:
    """Mean cosine distance between base and adapted block outputs, per block."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(distances) + 2), 3.0))
    ax.plot(range(len(distances)), distances, marker="o")
    ax.set_xlabel("layer (block output)")
    ax.set_ylabel("mean cosine distance")
    ax.set_title("how far the adapter moves each layer's hidden states", fontsize=9)
    ax.set_xticks(range(len(distances)))
    return _save(fig, path)


def plot_ablation(ablation: dict[str, Any], path: Path) -> Path:
    """Metric drop (points, 95% bootstrap interval) for each single layer and each cut below / above."""
    plt = _pyplot()
    panels = [("single", "adapter removed from one layer", "layer"),
              ("below", "removed from every layer below the cut", "cut"),
              ("above", "removed from the cut up", "cut")]
    panels = [p for p in panels if ablation[p[0]]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (kind, title, xlabel) in zip(axes[0], panels):
        entries = ablation[kind]
        x = [e["cut"] for e in entries]
        drops = np.array([e["drop"] for e in entries])
        errors = np.array([[e["drop"] - e["low"] for e in entries], [e["high"] - e["drop"] for e in entries]])
        ax.errorbar(x, drops, yerr=np.maximum(errors, 0), fmt="o", capsize=3)
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.axhline(ablation["tolerance_points"], color="tab:red", linestyle="--", linewidth=1)
        ax.set_xticks(x)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ablation['metric']} drop (points)")
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
