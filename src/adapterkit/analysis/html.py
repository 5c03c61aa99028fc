"""``report.html``: one self-contained page (inline style, pictures embedded as data URIs, no script).

Every section is always present, so a reader sees what was analysed and, for
a section that was not, what to pass to get it.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

SECTIONS = [("summary", "Summary"), ("updates", "Weight updates per module"),
            ("parameters", "What the parameters mean"), ("compare", "Subspace similarity with another adapter"),
            ("behaviour", "Behaviour on data"),
            ("ablation", "Layer ablation"), ("cost", "Cost")]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
p.note { color: #666; font-style: italic; } nav a { margin-right: 1em; }
"""


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(_format(v) for v in value))
    return html.escape(str(value))


def table(rows: list[dict[str, Any]], columns: list[str], text_columns: tuple[str, ...] = ()) -> str:
    """An HTML table of ``rows`` with the given columns (missing cells empty)."""
    head = "".join(f'<th class="{"text" if c in text_columns else ""}">{html.escape(c)}</th>' for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"text" if c in text_columns else ""}">{_format(r.get(c, ""))}</td>'
                         for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(path: Path | None, alt: str) -> str:
    """The PNG at ``path`` embedded in the page."""
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _summary(report: dict[str, Any]) -> str:
    rows = [{"what": k, "value": report[k]} for k in ("adapter", "method", "task", "base_model") if report.get(k)]
    config = report.get("config") or {}
    rows += [{"what": f"config.{k}", "value": v} for k, v in config.items() if k != "method"]
    return table(rows, ["what", "value"], ("what", "value")) + "".join(note(n) for n in report.get("notes", []))


def _updates(report: dict[str, Any], figures: dict[str, Path]) -> str:
    updates = report.get("updates")
    if not updates:
        return note(f"the {report.get('method')} method does not change weight matrices; see the next section")
    columns = ["layer", "module", "shape", "norm_ratio", "stable_rank", "energy_rank", "amplification", "intruders",
               "recommended_rank"]
    return (image(figures.get("update_heatmaps"), "layer x module heatmaps") +
            image(figures.get("spectra"), "singular value spectra") +
            f"<p>Recommended rank: {html.escape(updates['rank_rule'])}.</p>" +
            table(updates["modules"], columns, ("module",)))


def _parameters(report: dict[str, Any], figures: dict[str, Path]) -> str:
    params = report.get("parameters")
    if not params:
        return note("a weight-update method: its parameters are read through ΔW in the previous section")
    out = image(figures.get("parameters"), "parameters")
    method = params["method"]
    if method in ("ia3", "bottleneck", "bitfit"):
        columns = [c for c in params["modules"][0] if c not in ("path",)] if params["modules"] else []
        out += table(params["modules"], columns, ("module", "scales"))
    elif method == "prompt_tuning":
        rows = [{"token": t["index"], "norm": t["norm"], "norm_ratio": t["norm_ratio"],
                 "nearest": [f"{n['token']} ({n['cosine']:.2f})" for n in t["nearest"]]} for t in params["tokens"]]
        out += table(rows, ["token", "norm", "norm_ratio", "nearest"], ("nearest",))
    elif method == "prefix_tuning":
        out += table(params["layers"], ["layer", "key_norm", "value_norm"])
        nearest = params.get("first_layer_value_nearest")
        if nearest:
            rows = [{"prefix token": i,
                     "nearest (first-layer values)": [f"{n['token']} ({n['cosine']:.2f})" for n in ns]}
                    for i, ns in enumerate(nearest)]
            out += table(rows, ["prefix token", "nearest (first-layer values)"], ("nearest (first-layer values)",))
        elif params.get("note"):
            out += note(params["note"])
    return out


def _compare(report: dict[str, Any], figures: dict[str, Path]) -> str:
    compare = report.get("compare")
    if not compare:
        return note("not computed: pass --compare DIR (another adapter of the same base) to see it")
    rows = [{"layer": e["layer"], "module": e["module"], "phi_top1": e["phi"][0][0],
             "phi_mean": e["phi_mean"]} for e in compare["modules"]]
    return (f"<p>Against <b>{html.escape(str(compare['other']))}</b>: φ(i, j) = ‖V₁[:, :i]ᵀ V₂[:, :j]‖²_F / min(i, j) "
            "over the right singular vectors of the two updates (1: the same directions, 0: orthogonal).</p>" +
            image(figures.get("subspace_similarity"), "subspace similarity") +
            table(rows, ["layer", "module", "phi_top1", "phi_mean"], ("module",)))


def _behaviour(report: dict[str, Any], figures: dict[str, Path]) -> str:
    behaviour = report.get("behaviour")
    if not behaviour:
        return note("not computed: pass --data FILE|NAME to compare the adapted model with its base on examples")
    changes = behaviour["predictions"]
    out = (f"<p>{changes['changed']} of {changes['examples']} predictions differ from the base model's "
           f"({100 * changes['changed_share']:.1f}%); {html.escape(changes['metric'])}: base "
           f"{changes['base_metric']:.4f}, adapted {changes['adapted_metric']:.4f}.</p>")
    out += note(behaviour["base_note"])
    out += image(figures.get("prediction_changes"), "base vs adapted predictions")
    if changes.get("changed_by_class"):
        rows = [{"class": k, **v} for k, v in changes["changed_by_class"].items()]
        out += table(rows, ["class", "examples", "changed"], ("class",))
    out += "<h3>Most changed examples</h3>" + table(
        changes["most_changed"], ["index", "change", "base", "adapted", "text"], ("base", "adapted", "text"))
    out += "<h3>Hidden states</h3>" + image(figures.get("hidden_state_change"), "hidden-state change per layer")
    ratios = behaviour["activations"].get("bottleneck_output_ratio")
    if ratios:
        out += "<p>Bottleneck outputs relative to the output they are added to:</p>" + table(
            ratios, ["layer", "module", "ratio"], ("module",))
    return out


def _ablation(report: dict[str, Any], figures: dict[str, Path]) -> str:
    ablation = report.get("ablation")
    if not ablation:
        return note("not computed: pass --ablate (with --data) to measure each layer's importance")
    rows = [{"removed": f"{kind} {e['cut']}", "layers removed": e["layers"], ablation["metric"]: e["metric"],
             "drop (points)": e["drop"], "95% low": e["low"], "95% high": e["high"]}
            for kind in ("single", "below", "above") for e in ablation[kind]]
    return (f"<p><b>{html.escape(ablation['verdict'])}</b></p>"
            f"<p>With the whole adapter: {html.escape(ablation['metric'])} = {ablation['full']:.4f}; "
            f"{ablation['bootstrap']} paired bootstrap resamples.</p>" +
            image(figures.get("ablation"), "ablation") +
            table(rows, ["removed", "layers removed", ablation["metric"], "drop (points)", "95% low", "95% high"],
                  ("removed", "layers removed")))


def _cost(report: dict[str, Any]) -> str:
    cost = report["cost"]
    rows = [{"what": k, "value": v} for k, v in cost.items() if not isinstance(v, dict)]
    out = table(rows, ["what", "value"], ("what",))
    for key, title in (("training", "Training (this run)"), ("baseline", "Baseline run"),
                       ("ratios", "This run / baseline")):
        if cost.get(key):
            out += f"<h3>{title}</h3>" + table([{"what": k, "value": v} for k, v in cost[key].items()],
                                               ["what", "value"], ("what", "value"))
    if "training" not in cost:
        out += note("no run folder beside the adapter: training time, speed and memory are unknown")
    return out


def write_html(report: dict[str, Any], figures: dict[str, Path], path: Path) -> Path:
    """Write the report page to ``path`` (pictures from ``figures``: name -> PNG path)."""
    bodies = {"summary": _summary(report), "updates": _updates(report, figures),
              "parameters": _parameters(report, figures), "compare": _compare(report, figures),
              "behaviour": _behaviour(report, figures), "ablation": _ablation(report, figures), "cost": _cost(report)}
    nav = "".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>{bodies[key]}</section>'
                       for key, title in SECTIONS)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<title>adapterkit analysis: {html.escape(str(report.get("adapter")))}</title>'
            f'<style>{STYLE}</style></head><body>'
            f'<h1>What adapter {html.escape(str(report.get("adapter")))} learned</h1>'
            f'<nav>{nav}</nav>{sections}</body></html>')
    path.write_text(page, encoding="utf-8")
    return path
