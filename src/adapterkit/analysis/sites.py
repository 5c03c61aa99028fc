"""Where an adapter sits: each wrapped module's transformer block and its short name.

Reports are laid out as layer x module grids (``query`` in block 3), so every
analysis first maps a module path such as ``bert.encoder.layer.3.attention.self.query``
to ``(3, "attention.self.query")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from adapterkit.core.layers import AdapterLayer, adapter_layers
from adapterkit.runtime.blocks import transformer_blocks


@dataclass(frozen=True)
class Site:
    """One adapter layer of a model.

    Attributes:
        path: the wrapped module's full path in the model.
        layer: index of the transformer block that holds it, ``None`` outside every block (a head, embeddings).
        module: the path inside its block (``attention.self.query``), or the full path outside blocks.
        wrapper: the adapter layer itself.
    """

    path: str
    layer: int | None
    module: str
    wrapper: AdapterLayer


def layer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks, in order: the units a "layer" of a report means.

    ``transformer_blocks`` may also list one-off modules a model declares
    unsplittable (BERT's embeddings); only block classes that occur more than
    once count as layers (in a one-layer model, every block but the embeddings).
    """
    from collections import Counter

    blocks = transformer_blocks(model)
    counts = Counter(type(b) for b in blocks)
    repeated = [b for b in blocks if counts[type(b)] > 1]
    # a one-layer model repeats nothing: then only the embeddings are left out
    return repeated or [b for b in blocks if not type(b).__name__.endswith("Embeddings")] or blocks


def block_paths(model: nn.Module) -> list[str]:
    """The full paths of the model's layer blocks (:func:`layer_blocks`), in order."""
    blocks = {id(b): i for i, b in enumerate(layer_blocks(model))}
    paths = [""] * len(blocks)
    for path, module in model.named_modules():
        if id(module) in blocks and not paths[blocks[id(module)]]:
            paths[blocks[id(module)]] = path
    return paths


def adapter_sites(model: nn.Module, name: str, method: str | None = None) -> list[Site]:
    """The layers that hold weights of adapter ``name`` (only those of ``method`` when given), in model order."""
    prefixes = [(i, p + ".") for i, p in enumerate(block_paths(model)) if p]
    sites = []
    for path, wrapper in adapter_layers(model):
        if not wrapper.has_adapter(name) or (method is not None and wrapper.method != method):
            continue
        layer, module = None, path
        for i, prefix in prefixes:
            if path.startswith(prefix):
                layer, module = i, path[len(prefix):]
                break
        # an inner wrapper of a module wrapped twice: name it by the module, not by base_layer
        module = module.replace(".base_layer", "")
        sites.append(Site(path, layer, module, wrapper))
    return sites


def grid(sites: list[Site], values: list[float]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """``values`` (one per site) laid out as rows of layers and columns of module names.

    Returns ``(layers, modules, cells)``; a cell without a site is ``None``.
    Sites outside every block are left out (they have no layer).
    """
    layers = sorted({s.layer for s in sites if s.layer is not None})
    modules = list(dict.fromkeys(s.module for s in sites if s.layer is not None))
    cells: list[list[float | None]] = [[None] * len(modules) for _ in layers]
    for site, value in zip(sites, values):
        if site.layer is not None:
            cells[layers.index(site.layer)][modules.index(site.module)] = value
    return layers, modules, cells
