"""Frozen-prefix caching: compute the blocks below the lowest adapter once per training example.

When every trainable weight sits in block ``k`` or above (``--adapter-layers
top:K``), the embeddings and blocks ``0..k-1`` are a fixed function of each
example, provided they run without dropout. The first time an example is
trained on, block ``k``'s input for its real (unpadded) tokens is kept; the
next time, the lower blocks pass their input through unchanged and block
``k`` receives the kept states, re-padded to the batch at hand. This is
AdapterDrop's observation applied to training: epochs after the first start
at the first adapted block.

The lower part runs in eval mode while caching is on (no dropout there, in
every epoch alike), which is what makes its output reusable; the adapted
blocks and the head train as usual. Memory is capped (``max_bytes``):
examples beyond the cap are recomputed each time. Padded positions are
filled with zeros; attention never reads them (their keys are masked), so
real tokens' outputs do not depend on them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from adapterkit.core.heads import HeadLayer
from adapterkit.core.layers import adapter_layers, get_store
from adapterkit.core.lifecycle import active_adapters, get_adapter_config
from adapterkit.core.targeting import block_list
from adapterkit.errors import UsageError


def adapted_block_list(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (the ModuleList the adapted modules sit in)."""
    for path, layer in adapter_layers(model):
        found = block_list(model, path) if layer.method != "head" else None
        if found is not None:
            return found[0]
    raise UsageError("frozen-prefix caching needs adapters inside the model's blocks; this model has none there")


def lowest_adapted_block(model: nn.Module) -> int:
    """The lowest block index holding a weight that trains (block 0 when something below the blocks trains)."""
    blocks = adapted_block_list(model)
    trains = [any(p.requires_grad for p in block.parameters()) for block in blocks]
    counted = {id(p) for block in blocks for p in block.parameters()}
    counted |= {id(p) for m in model.modules() if isinstance(m, HeadLayer) for p in m.parameters()}
    if any(p.requires_grad and id(p) not in counted for p in model.parameters()):
        return 0  # something outside the blocks and heads (the embeddings) trains
    return trains.index(True) if True in trains else len(blocks)


def _modules_before(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The subtrees that run before the blocks (the embeddings): modules earlier in module order than the
    block list that do not contain it."""
    ancestors = {id(m) for m in model.modules() if any(c is blocks for c in m.modules())}
    found: list[nn.Module] = []
    covered: set[int] = set()
    for module in model.modules():
        if module is blocks:
            break
        if id(module) in ancestors or id(module) in covered:
            continue
        found.append(module)
        covered.update(id(m) for m in module.modules())
    return found


class PrefixCache:
    """Keeps block ``first``'s input per training feature; see the module docstring.

    Use :meth:`batch` around each training forward with the batch's feature
    indices and attention mask; outside it (evaluation) the hooks do nothing.
    """

    def __init__(self, model: nn.Module, max_bytes: int) -> None:
        for name in active_adapters(model):
            method = get_adapter_config(model, name).method
            if method in ("prompt_tuning", "prefix_tuning"):
                raise UsageError(f"frozen-prefix caching: adapter {name!r} ({method}) changes the model's inputs, "
                                 "so no block's input is fixed; train without the cache")
        if get_store(model) is not None and len(get_store(model).adapters):
            raise UsageError("frozen-prefix caching: input-side adapters are loaded; train without the cache")
        self.blocks = adapted_block_list(model)
        self.first = lowest_adapted_block(model)
        if self.first == 0:
            raise UsageError("frozen-prefix caching needs the lowest adapter above block 0 (e.g. --adapter-layers "
                             "top:K with K below the number of blocks); here block 0 trains")
        self.model = model
        self.max_bytes = max_bytes
        self.bytes = 0
        self.store: dict[int, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self._rows: list[int] | None = None
        self._mask: torch.Tensor | None = None
        self._skip = False
        self._tuple_output: bool | None = None
        lower = [self.blocks[i] for i in range(self.first)]
        self._frozen = [*_modules_before(model, self.blocks), *lower]
        self._handles = [self.blocks[self.first].register_forward_pre_hook(self._at_first, with_kwargs=True)]
        for block in lower:
            self._handles.append(block.register_forward_hook(self._note_output))
        self._originals = {id(b): b.forward for b in lower}

    # --- per batch -------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self, rows: Sequence[int], attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Within the block, the forward is the training forward of features ``rows``."""
        if attention_mask is None:
            yield
            return
        for module in self._frozen:
            module.eval()  # the cached part runs without dropout, cached or not
        self._rows, self._mask = list(rows), attention_mask.bool()
        self._skip = all(r in self.store for r in self._rows) and self._tuple_output is not None
        passthrough = self._passthrough()
        if self._skip:
            for block in self.blocks[: self.first]:
                block.forward = passthrough
        try:
            yield
        finally:
            for block in self.blocks[: self.first]:
                block.forward = self._originals[id(block)]
            self._rows = self._mask = None
            self._skip = False

    def _passthrough(self) -> Any:
        tuple_output = self._tuple_output

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return (hidden_states,) if tuple_output else hidden_states
        return forward

    # --- hooks -------------------------------------------------------------------
    def _note_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._tuple_output is None and self._rows is not None:
            self._tuple_output = isinstance(output, tuple)

    def _at_first(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._rows is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = self._mask
        if mask is None or hidden.shape[:2] != mask.shape:
            return None  # not the layout this cache understands (packed or prefixed inputs): leave it
        if self._skip:
            filled = hidden.new_zeros(hidden.shape)
            for row, feature in enumerate(self._rows):
                filled[row, mask[row]] = self.store[feature].to(hidden.dtype)
            self.hits += len(self._rows)
            return ((filled, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": filled})
        for row, feature in enumerate(self._rows):
            if feature in self.store:
                continue
            kept = hidden[row, mask[row]].detach().clone()
            size = kept.numel() * kept.element_size()
            if self.bytes + size > self.max_bytes:
                continue
            self.store[feature] = kept
            self.bytes += size
        self.misses += len(self._rows)
        return None

    def close(self) -> None:
        """Remove the hooks and drop the kept states."""
        for handle in self._handles:
            handle.remove()
        self.store.clear()
        self.bytes = 0

