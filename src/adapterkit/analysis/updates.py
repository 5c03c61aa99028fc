"""Per-module weight-update figures of one adapter, for every method that changes weights.

A method takes part when its layer can say what merging the adapter would do
to the wrapped weight (``merged_weight``): LoRA and its variants (rsLoRA,
DoRA; an adapter built by ``merge_adapters`` is a LoRA too). The update is
read as ``merged - W`` in the (out, in) layout, so DoRA's rescaling is part of it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from adapterkit.analysis.sites import Site, adapter_sites
from adapterkit.analysis.weight_updates import RANK_RULE, update_statistics
from adapterkit.core.base_weight import read_base_tensor
from adapterkit.core.layers import innermost
from adapterkit.core.lifecycle import get_adapter_config


def has_weight_update(site: Site, name: str) -> bool:
    """Whether the adapter's effect at this site is a change of the wrapped weight."""
    return hasattr(site.wrapper, "merged_weight") and name not in site.wrapper.merged_adapters


@torch.no_grad()
def weight_and_update(site: Site, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, ΔW)`` of adapter ``name`` at ``site``, both as float tensors in the (out, in) layout."""
    layer: Any = site.wrapper
    raw = read_base_tensor(innermost(layer)).float()  # under any other method's wrappers
    merged = layer.merged_weight(name, raw).float()
    transpose = getattr(layer, "fan_in_fan_out", False) and not getattr(layer, "is_embedding", False)
    weight, delta = (raw.T, (merged - raw).T) if transpose else (raw, merged - raw)
    return weight, delta


def update_sites(model: nn.Module, name: str) -> list[Site]:
    """The sites where adapter ``name`` changes a weight."""
    return [s for s in adapter_sites(model, name) if has_weight_update(s, name)]


def weight_update_report(model: nn.Module, name: str) -> dict[str, Any] | None:
    """Every module's figures (``weight_updates.update_statistics``), or ``None`` when the method changes no weight."""
    sites = update_sites(model, name)
    if not sites:
        return None
    trained_rank = getattr(get_adapter_config(model, name), "rank", None)
    modules = []
    for site in sites:
        weight, delta = weight_and_update(site, name)
        modules.append({"path": site.path, "layer": site.layer, "module": site.module,
                        **update_statistics(weight, delta, trained_rank)})
    return {"modules": modules, "rank_rule": RANK_RULE, "trained_rank": trained_rank}
