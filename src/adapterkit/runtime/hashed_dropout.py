"""Dropout whose mask comes from a counter hash instead of PyTorch's generator.

On CPUs, ``nn.Dropout`` in training draws its mask with ``bernoulli_``, which
runs PyTorch's Mersenne-Twister generator element by element. For a MiniLM
LoRA step (batch 32, 14 tokens) the 14 dropout layers of the frozen base were
~13% of the step (``docs/benchmarks.md`` section 4), more than the adapters'
own work. The dropout itself (zero a fraction ``p`` of the elements, scale the
rest by ``1 / (1 - p)``) is cheap; the random numbers are not.

Here the mask is a hash of each element's index: the index, mixed with two
32-bit seeds by three multiply-xorshift rounds (each a bijection of 32-bit
integers), gives 32 well-mixed bits, and each half of them decides one element
(kept when the 16-bit value is at or above ``p * 65536``, so ``p`` is honoured
to 1/65536). That is a dozen whole-tensor integer operations on half as many
values as the input has, 4-7x faster than ``bernoulli_`` here. The two seeds
are drawn from PyTorch's default CPU generator at each call, so a run is
reproducible from its seed, a resumed run draws what the uninterrupted one
would have, and gradient checkpointing (which restores the generator's state
before recomputing a block) recomputes the same masks. The backward reuses the
forward's mask, kept as booleans, as ``nn.Dropout`` keeps its own.

The masks are not PyTorch's (a run with them is not bit-identical to one
without), but they have the same distribution: each element kept with
probability ``1 - p``, independently of its neighbours and of other calls
(``tests/runtime/test_hashed_dropout.py`` measures both). The training loop
uses them for every ``nn.Dropout`` of the model (``TrainConfig
.hashed_dropout``); attention dropout that transformers hands to
``scaled_dot_product_attention`` stays PyTorch's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

# odd 32-bit multipliers of well-known integer hashes (golden ratio; murmur3's finaliser), as signed int32
_ROUNDS = ((-1640531535, 16), (-2048144789, 13), (-1028477387, 16))
_MARK = "_adapterkit_hashed_dropout"  # set on each patched module while the context is on
_LARGEST = 2**31 - 1  # int32 counters: one per pair of elements


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, seeds: tuple[int, int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask of ``shape``: each element True (kept) with probability ``1 - p``.

    The same ``seeds`` (two integers in the int32 range) give the same mask on
    every machine; any other seeds give an independent one.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    numel = 1
    for size in shape:
        numel *= int(size)
    pairs = (numel + 1) // 2
    if pairs > _LARGEST:
        raise ValueError(f"hashed dropout counts elements in int32; a tensor of {numel} elements is too large")
    first, second = (int(s) for s in seeds)
    h = torch.arange(pairs, dtype=torch.int32, device=device)
    h.bitwise_xor_(first)
    for index, (multiplier, shift) in enumerate(_ROUNDS):
        h.mul_(multiplier)  # wraps modulo 2**32
        # a logical right shift: PyTorch shifts signed integers arithmetically, so drop the sign's copies
        h.bitwise_xor_(h.bitwise_right_shift(shift).bitwise_and_((1 << (32 - shift)) - 1))
        if index == 0:
            h.add_(second)
    threshold = -32768 + round(p * 65536)  # the 16-bit halves are uniform over [-32768, 32767]
    return h.view(torch.int16)[:numel].ge(threshold).view(shape)


def _draw_seeds() -> tuple[int, int]:
    first, second = torch.randint(-(2**31), 2**31 - 1, (2,), dtype=torch.int64).tolist()
    return first, second


class _HashedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = dropout_mask(x.shape, p, _draw_seeds(), x.device)
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(mask).mul_(scale)  # as F.dropout: a NaN stays NaN

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None


def hashed_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a hashed mask (see the module's docstring)."""
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p == 1.0:
        return x * 0.0
    if (x.numel() + 1) // 2 > _LARGEST:
        return nn.functional.dropout(x, p, training)
    return _HashedDropout.apply(x, p)


def _forward(self: nn.Dropout, input: torch.Tensor) -> torch.Tensor:
    return hashed_dropout(input, self.p, self.training)


@contextlib.contextmanager
def use_hashed_dropout(model: nn.Module) -> Iterator[int]:
    """Within the context, every ``nn.Dropout`` of ``model`` draws hashed masks; yields how many.

    Modules already patched by an enclosing call are left to it. The modules'
    own ``forward`` comes back on exit, on error as well; eval mode is, as
    always, the identity.
    """
    patched = []
    try:
        for module in model.modules():
            if type(module) is nn.Dropout and not getattr(module, _MARK, False):
                module.forward = _forward.__get__(module)
                setattr(module, _MARK, True)
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_MARK, None)
