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
.hashed_dropout``), and for the attention dropout that transformers hands to
``torch.nn.functional.scaled_dot_product_attention``: on a CPU, PyTorch
computes attention with dropout by its reference ("math") formula with a
``bernoulli_`` mask, and within the context that formula runs with a hashed
mask instead (:func:`attention_with_hashed_dropout`). Attention without
dropout, and on other devices, stays PyTorch's own kernel.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn as nn

from adapterkit.runtime.forward_patches import patched_forwards

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
    return _kept(shape, p, seeds, device).bool()


def _kept(shape: torch.Size | tuple[int, ...], p: float, seeds: tuple[int, int],
          device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`dropout_mask` as float32 ones (kept) and zeros (dropped)."""
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
    # kept where the half is at or above the threshold. Its distance above threshold - 1 is >= 1 there and <= 0
    # elsewhere, exactly (float32 holds every 16-bit integer), so clamping it to [0, 1] gives the mask as numbers:
    # on CPUs, PyTorch compares into booleans and converts booleans back several times more slowly than this
    halves = h.view(torch.int16)[:numel].to(torch.float32)
    return halves.sub_(threshold - 1).clamp_(0.0, 1.0).view(shape)


def _draw_seeds() -> tuple[int, int]:
    first, second = torch.randint(-(2**31), 2**31 - 1, (2,), dtype=torch.int64).tolist()
    return first, second


class _HashedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, p: float) -> torch.Tensor:
        kept = _kept(x.shape, p, _draw_seeds(), x.device)
        byte = kept.to(torch.uint8)  # kept for the backward: a byte an element, as nn.Dropout's boolean mask
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(byte)
        ctx.scale = scale
        return _dropped(x, kept if x.dtype in _WIDE else byte, scale)  # as F.dropout: a NaN stays NaN

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (kept,) = ctx.saved_tensors
        return _dropped(grad, kept, ctx.scale), None


_WIDE = (torch.float32, torch.float64)  # dtypes whose kernels scale in their own precision


def _dropped(x: torch.Tensor, kept: torch.Tensor, scale: float) -> torch.Tensor:
    """``x * kept * scale`` for a mask ``kept`` of ones and zeros, bit for bit.

    In float32 and float64 the factors (``scale`` or 0) are made in ``x``'s dtype
    and applied in one product: ``scale`` is what PyTorch multiplies by there
    anyway. A ``kept`` already in that dtype becomes the factors in place.
    Narrower dtypes take ``kept`` as uint8 and multiply by it, then by ``scale``:
    their kernels scale by a float32 ``scale``, which a bfloat16 factor would round.
    """
    if x.dtype not in _WIDE:
        return x.mul(kept).mul_(scale)
    return x.mul(kept.to(x.dtype).mul_(scale))


def hashed_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a hashed mask (see the module's docstring)."""
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p == 1.0:
        return x * 0.0
    if (x.numel() + 1) // 2 > _LARGEST:
        return nn.functional.dropout(x, p, training)
    return _HashedDropout.apply(x, p)


_PYTORCH_SDPA = nn.functional.scaled_dot_product_attention
_SDPA_LOCK = threading.Lock()
_sdpa_users = 0  # contexts that have the hashed attention installed


def attention_with_hashed_dropout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                  is_causal: bool = False, scale: float | None = None,
                                  enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with a hashed mask for its dropout on a CPU.

    With ``dropout_p > 0`` on a CPU this is the reference formula PyTorch
    documents (and runs there in that case): softmax of the scaled scores plus
    the mask (zeros for a query that may attend to nothing), dropped, times the
    values; anything else goes to PyTorch's own.
    """
    if dropout_p == 0.0 or query.device.type != "cpu" or torch.compiler.is_compiling():
        return _PYTORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.size(-3) != query.size(-3):
        groups = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)).mul_(factor)
    if is_causal:
        allowed = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    # a query that may attend to nothing gets zeros, as in PyTorch's own formula, not NaN
    probs = hashed_dropout(safe_softmax(scores), dropout_p, True)
    return torch.matmul(probs, value)


# The longest rows for which whole-tensor passes beat PyTorch's CPU softmax kernel, which works row by row:
# forward and backward at (32, 12, L, L), 2 threads, AMD Zen 5: 0.18x its time at L = 14, 0.54x at 32,
# 0.66x at 64, 1.29x at 128
SHORT_ROWS = 64


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension with zeros for a row of ``-inf`` (PyTorch's ``_safe_softmax``).

    Rows of up to ``SHORT_ROWS`` values on a CPU take :class:`_ShortRowSoftmax`.
    """
    if scores.device.type == "cpu" and scores.size(-1) <= SHORT_ROWS and scores.dtype in (torch.float32,
                                                                                          torch.float64):
        return _ShortRowSoftmax.apply(scores)
    return torch.ops.aten._safe_softmax(scores, -1)


class _ShortRowSoftmax(torch.autograd.Function):
    """Softmax of short rows as a few passes over the whole tensor, forward and backward.

    The same formula as PyTorch's kernel (the exponentials of the scores less
    their row's maximum, over their sum; the gradient ``p * (g - sum(g * p))``),
    so the values agree to rounding; a row of ``-inf`` gives zeros.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, scores: torch.Tensor) -> torch.Tensor:
        peak = scores.amax(-1, keepdim=True)
        peak.masked_fill_(peak == float("-inf"), 0.0)  # a row of -inf: exponentials of 0, a sum of 0
        probs = (scores - peak).exp_()
        total = probs.sum(-1, keepdim=True)
        probs.div_(total.masked_fill_(total == 0, 1.0))
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        return probs * (grad - (grad * probs).sum(-1, keepdim=True))


@contextlib.contextmanager
def _hashed_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` is :func:`attention_with_hashed_dropout` while any context holds it."""
    global _sdpa_users
    with _SDPA_LOCK:
        _sdpa_users += 1
        nn.functional.scaled_dot_product_attention = attention_with_hashed_dropout
    try:
        yield
    finally:
        with _SDPA_LOCK:
            _sdpa_users -= 1
            if _sdpa_users == 0:
                nn.functional.scaled_dot_product_attention = _PYTORCH_SDPA


def _forward(self: nn.Dropout, input: torch.Tensor) -> torch.Tensor:
    return hashed_dropout(input, self.p, self.training)


@contextlib.contextmanager
def use_hashed_dropout(model: nn.Module) -> Iterator[int]:
    """Within the context, every ``nn.Dropout`` of ``model`` draws hashed masks; yields how many.

    Attention dropout passed to ``F.scaled_dot_product_attention`` on a CPU
    draws hashed masks too while the context is on (for every caller: the
    function is PyTorch's module attribute, and the distribution is the same).
    Modules already patched by an enclosing call are left to it. The modules'
    own ``forward`` and PyTorch's function come back on exit, on error as well;
    eval mode is, as always, the identity.
    """
    with patched_forwards(model, _MARK, lambda m: _forward if type(m) is nn.Dropout else None) as count, \
            _hashed_attention():
        yield count
