"""Before and after: an adapter and its own base model on the same examples, the same way.

A fine-tuning figure means something only next to the base model's figure on
the same examples with the same input length, prompt template and generation
settings. ``compare_with_base`` evaluates both in one call: the model with its
active adapter(s), then the same model with its adapters switched off
(``adapters_disabled``), so every setting is shared by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedModel

from adapterkit.evaluate.report import format_settings

# Metrics where a fall is the improvement (the rest improve by rising).
FALLING_IS_BETTER = frozenset({"loss", "perplexity"})


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The plain numbers of a metrics dict (no tables, lists or settings)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare_with_base(model: PreTrainedModel, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``{"adapter": ..., "base": ..., "change": ..., "settings": ...}`` from two runs of ``run``.

    ``run`` evaluates ``model`` as it is; it is called once with the adapters
    active and once inside ``adapters_disabled(model)``. ``change`` holds, for
    each scalar metric both runs report, ``adapter - base`` and the ratio
    ``adapter / base``.
    """
    from adapterkit.core import adapters_disabled

    adapter = run()
    with adapters_disabled(model):
        base = run()
    change: dict[str, dict[str, float]] = {}
    after, before = scalar_metrics(adapter), scalar_metrics(base)
    for name in after:
        if name in before and name != "count":
            delta = after[name] - before[name]
            change[name] = {"difference": delta,
                            "ratio": after[name] / before[name] if before[name] else float("nan")}
    settings = adapter.get("settings", {})
    return {"adapter": adapter, "base": base, "change": change, "settings": settings}


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as a table: metric, base, adapter, change."""
    after, before = scalar_metrics(result["adapter"]), scalar_metrics(result["base"])
    rows = [f"{'metric':<22}{'base':>12}{'adapter':>12}{'change':>12}"]
    for name, change in result["change"].items():
        if name in FALLING_IS_BETTER and change["ratio"] == change["ratio"]:
            shown = f"x{change['ratio']:.3f}"
        else:
            shown = f"{change['difference']:+.4f}"
        rows.append(f"{name:<22}{before[name]:>12.4f}{after[name]:>12.4f}{shown:>12}")
    if "count" in after:
        rows.append(f"{'examples':<22}{int(before.get('count', 0)):>12}{int(after['count']):>12}")
    base_settings, settings = result["base"].get("settings") or {}, result.get("settings") or {}
    if settings:
        same = "the same for both columns" if base_settings == settings else "DIFFERENT between the columns"
        rows.append(f"settings ({same}): {format_settings(settings)}")
    return "\n".join(rows)
