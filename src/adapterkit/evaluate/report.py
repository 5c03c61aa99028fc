"""Human-readable text for metrics and adapter summaries."""

from __future__ import annotations

from typing import Any

HEADLINE_KEYS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "loss", "count")


def format_settings(settings: dict[str, Any], prefix: str = "") -> str:
    """``max_length=64, generation.temperature=0.0, ...``: what an evaluation ran with, on one line."""
    parts = []
    for key, value in settings.items():
        if isinstance(value, dict):
            parts.append(format_settings(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={value}")
    return ", ".join(p for p in parts if p)


def format_metrics(metrics: dict[str, Any]) -> str:
    """Headline numbers, then a per-class table and the confusion matrix when present."""
    lines = [f"{key:<16} {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"{key:<16} {metrics[key]}"
             for key in HEADLINE_KEYS if key in metrics]
    others = [k for k, v in metrics.items() if k not in HEADLINE_KEYS and isinstance(v, (int, float))]
    lines += [f"{key:<16} {metrics[key]:.4f}" for key in others]
    if metrics.get("settings"):
        lines.append(f"{'settings':<16} {format_settings(metrics['settings'])}")
    per_class = metrics.get("per_class")
    if per_class:
        width = max(8, *(len(str(label)) for label in per_class))
        lines += ["", f"{'label':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
        for label, row in per_class.items():
            lines.append(f"{label:<{width}} {row['precision']:>9.4f} {row['recall']:>9.4f} "
                         f"{row['f1']:>9.4f} {row['support']:>8d}")
    matrix = metrics.get("confusion_matrix")
    if matrix:
        labels = [str(label) for label in metrics.get("labels", range(len(matrix)))]
        width = max(6, *(len(label) for label in labels), *(len(str(v)) for row in matrix for v in row))
        lines += ["", "confusion matrix (rows: true, columns: predicted)",
                  " " * (width + 1) + " ".join(f"{label:>{width}}" for label in labels)]
        for label, row in zip(labels, matrix):
            lines.append(f"{label:>{width}} " + " ".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_adapter_info(info: dict[str, Any]) -> str:
    """``key: value`` lines for ``adapter_info``'s summary.

    Values the folder does not record show as ``-``; an ``unsupported`` note
    (PEFT features adapterkit cannot load) gets its own line.
    """
    labels = info.get("labels")
    shown_labels = ", ".join(map(str, labels)) if isinstance(labels, (list, tuple)) and labels else "-"
    lines = [
        f"adapter:          {info['folder']}",
        f"method:           {info.get('method') or '-'}",
        f"base model:       {info.get('base_model') or '-'}",
        f"task:             {info.get('task') or '-'}",
        f"labels:           {shown_labels}",
        f"trainable params: {int(info.get('trainable_parameters') or 0):,}",
        (f"weights file:     {_size(int(info.get('weights_bytes') or 0))} "
         f"(folder {_size(int(info.get('folder_bytes') or 0))})"),
    ]
    if info.get("unsupported"):
        lines.append(f"unsupported:      {info['unsupported']}")
    metrics = info.get("metrics")
    for split, values in (metrics.items() if isinstance(metrics, dict) else ()):
        if isinstance(values, dict):
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items()
                              if isinstance(v, float) and k != "count")
            lines.append(f"{str(split) + ':':<18}{shown}")
    return "\n".join(lines)
