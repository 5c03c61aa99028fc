"""Compute the last block only at the position the task head reads.

A BERT-family sequence classifier (BERT, RoBERTa, XLM-R, ELECTRA) reads one
position of the last block's output, the first: its pooler or classification
head takes ``hidden[:, 0]``. The last block computes every other position only
to throw it away. Inside a block, self-attention is the one step that mixes
positions; after it (the attention's output projection, residual and norm, the
feed-forward, and every adapter placed there) each position is computed on its
own. So once the last block's attention has read every position's keys and
values, the rest of that block can run at position 0 alone, and the logits are
the same numbers up to the rounding of smaller matrix products.

On MiniLM (6 blocks) this leaves the last block its q/k/v projections and the
attention, a quarter of its linear work, and made a LoRA training step
0.84-0.91x as long (``docs/benchmarks.md`` section 4). Only
``*ForSequenceClassification`` models of an architecture whose table row names
a ``first_token_cut`` module are narrowed; every other model and task runs as
it is. The training loop narrows for the whole run (``TrainConfig
.trim_last_block``), inference for each pass (``runtime/inference.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from adapterkit.core.architectures import arch_spec

_NARROWED = "_adapterkit_first_position_only"  # set on the hooked module while the cut is on


def last_block_cut(model: nn.Module) -> nn.Module | None:
    """The module of ``model``'s last block whose inputs can be cut to position 0, or None.

    None unless ``model`` is a sequence classifier of an architecture that
    names such a module (``ArchSpec.first_token_cut``).
    """
    spec = arch_spec(model)
    if spec is None or spec.first_token_cut is None or not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    blocks_path, inner = spec.first_token_cut
    try:  # two attribute walks, not a search of every module: inference looks it up on each pass
        blocks = model.base_model.get_submodule(blocks_path)
        return blocks[len(blocks) - 1].get_submodule(inner) if len(blocks) else None
    except (AttributeError, TypeError):
        return None


def _first_position(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the (attention output, residual) pair cut to the first position."""
    if len(args) == 2 and all(isinstance(a, torch.Tensor) and a.dim() == 3 for a in args):
        return tuple(a[:, :1] for a in args)
    return None  # a call of another shape: leave it whole


@contextlib.contextmanager
def first_position_only(model: nn.Module) -> Iterator[bool]:
    """Within the block, ``model``'s last block runs past its attention at position 0 only.

    Yields whether the cut is on: False for a model it does not apply to, or
    when an enclosing call already holds it (nesting is free). The model's
    ``last_hidden_state`` then has one position; the logits do not change.
    """
    module = last_block_cut(model)
    if module is None or getattr(module, _NARROWED, False):
        yield False
        return
    handle = module.register_forward_pre_hook(_first_position)
    setattr(module, _NARROWED, True)
    try:
        yield True
    finally:
        handle.remove()
        delattr(module, _NARROWED)
