"""Tolerances for comparing two floating-point computations of the same quantity.

Two computations of one value that group or order their operations differently
(a merged weight against a separate delta, a routed batch against one example at
a time, PEFT's layers against ours, a library kernel against a hand-written
formula) round differently, and *how* differently depends on the CPU's vector
width (AVX2, AVX-512, AMX), on the kernel torch picks for it and on the number of
threads. A tolerance fitted to one machine's rounding fails on another, so every
such comparison in this suite goes through :func:`assert_close_scaled`, whose
tolerance follows from the dtype and the size of the numbers compared.

Where a check is about algebra (two LoRA deltas sum, a merged weight computes
what the unmerged layer did, a routed row equals its adapter's own run), the
tests run the tiny model in float64 instead, so that a tight tolerance derived
from float64's epsilon is meaningful. (Hugging Face's Llama RMSNorm and T5
attention softmax still round to float32 inside a float64 model; both sides
agree to about 1e-15 relative before each such rounding, so they round alike
except with a probability near 1e-8 per element.)

Bit-exact checks (``torch.equal``, ``assert_close(..., rtol=0, atol=0)``) stay
where both sides run the very same operations on the very same numbers in the
same order in one process (adapters disabled against the base model's own
output, an adapter at its identity initialisation adding exact zeros, weights
restored from a saved copy): those hold on every CPU.
"""

from __future__ import annotations

import numpy as np
import torch

#: Safety factor over the first-order error bound, see :func:`assert_close_scaled`.
SAFETY = 16.0


def assert_close_scaled(actual: torch.Tensor | float, expected: torch.Tensor | float, *, ops: int,
                        scale: float | None = None, dtype: torch.dtype | None = None,
                        k: float = SAFETY, msg: str = "") -> float:
    """Assert ``|actual - expected| <= k * eps(dtype) * ops * scale`` elementwise.

    The error model is the classical bound for a sum or dot product of ``n``
    terms in floating point (Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., section 3.1)::

        |fl(x_1 + ... + x_n) - (x_1 + ... + x_n)| <= gamma_{n-1} * sum |x_i|,
        gamma_n = n u / (1 - n u),  u = eps / 2,

    whatever the order of summation, so two computations of the same value that
    each obey it differ by at most about ``n * eps * sum |x_i|``. A network
    stacks such reductions; to first order their relative errors add, so for a
    forward pass ``ops`` is the sum of the reduction lengths along the longest
    path through the model (:func:`forward_ops`), and for a single layer it is
    the layer's own reduction length (its ``in_features``) plus the few
    elementwise operations around it.

    - ``eps``: ``torch.finfo(dtype).eps`` of ``dtype``, by default the less
      precise of the two tensors' dtypes (float32: 1.2e-7, float64: 2.2e-16).
    - ``scale``: the magnitude of the terms summed, by default ``max |expected|``.
      Pass the real ``sum |x_i|`` (e.g. ``(|x| @ |W|).max()``) where it is known
      and larger than the result, as in a dot product with cancellation.
    - ``k``: the safety factor, 16 by default. It covers what the first-order
      model leaves out: the conditioning of the network (layer norms and
      softmax over large attention scores amplify relative errors, residual
      sums cancel) and the elementwise operations between the reductions.
      Measured over this suite with torch's default, AVX2 and AVX-512 kernels
      and one or two threads, the largest difference was 2.1 times the bound
      with ``k = 1`` (BART in float64 with LoRA deltas that dominate its
      weights, under the scalar kernels); T5 in float32 reached 1.3 times it
      (the case that once missed a fixed ``atol=1e-5``); most comparisons stay
      below a tenth of it. For the tiny models here the tolerance is near
      ``16 * 1.2e-7 * 400 = 8e-4`` of the output's magnitude in float32 and
      ``1.4e-12`` in float64, and still catches real defects: a LoRA scaling
      off by 1e-6 relative fails every float64 algebra check, one off by 1%
      the float32 LoRA comparisons with PEFT.

    Returns the tolerance used, so that a test can also assert that the effect
    it guards (an adapter's change to the output) is far above it.
    """
    actual_t, expected_t = _as_tensor(actual), _as_tensor(expected)
    if dtype is None:
        dtype = max(actual_t.dtype, expected_t.dtype, key=lambda d: torch.finfo(d).eps)
    eps = torch.finfo(dtype).eps
    if actual_t.shape != expected_t.shape:
        raise AssertionError(f"{msg}shapes differ: {tuple(actual_t.shape)} vs {tuple(expected_t.shape)}")
    actual64, expected64 = actual_t.detach().double(), expected_t.detach().double()
    if scale is None:
        scale = float(expected64.abs().max()) if expected64.numel() else 0.0
    tolerance = k * eps * ops * scale
    error = (actual64 - expected64).abs()
    worst = float(error.max()) if error.numel() else 0.0
    if not worst <= tolerance:  # also fails on NaN
        bad = int((error > tolerance).sum())
        raise AssertionError(
            f"{msg}{bad} of {error.numel()} elements differ by more than {tolerance:.3g} "
            f"(= {k:g} * eps({dtype}) {eps:.3g} * ops {ops} * scale {scale:.3g}); "
            f"largest difference {worst:.3g}")
    return tolerance


def _as_tensor(value: object) -> torch.Tensor:
    """A tensor of ``value``: numpy arrays keep their dtype, Python numbers become float64."""
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
    return tensor if tensor.dtype.is_floating_point else tensor.double()


def forward_ops(model: torch.nn.Module, tokens: int = 0) -> int:
    """The summed reduction lengths along the longest path of a transformer's forward pass.

    Every block reduces over the hidden size (attention projections, the
    attention output, the norm) and over the FFN's inner size (its down
    projection); attention itself reduces over ``tokens`` positions (give the
    sequence length when it is not small against the hidden size). An
    encoder-decoder's decoder runs after its encoder, so their blocks add up.
    One more hidden-size reduction is the output head.
    """
    config = model.config
    hidden = config.hidden_size
    inner = (getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None)
             or getattr(config, "encoder_ffn_dim", None) or getattr(config, "n_inner", None) or 4 * hidden)
    blocks = config.num_hidden_layers
    if getattr(config, "is_encoder_decoder", False):
        blocks += getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or 0
    return blocks * (hidden + inner + tokens) + hidden
