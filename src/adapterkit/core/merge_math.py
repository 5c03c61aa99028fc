"""The tensor arithmetic of merging adapters, apart from models and layers.

LoRA updates are handled as factor pairs in one orientation: ``b`` (p, r) and
``a`` (r, q) with a coefficient ``c`` (the adapter's weight times its
scaling), so that the update is ``c * b @ a``. For a linear layer p, q are
(out, in); for an embedding (dim, num). Every function here returns factors
with coefficient 1.

The task-vector combinations (TIES, DARE, magnitude pruning) follow the
papers as PEFT implements them (``peft.utils.merge_utils``, 0.21):

- magnitude pruning keeps the ``int(density * numel)`` entries of largest
  absolute value of each task tensor and zeroes the rest;
- DARE (Yu et al., 2024) drops each entry with probability ``1 - density``
  and divides the survivors by ``density``;
- TIES (Yadav et al., 2023) prunes by magnitude, elects a sign per entry
  from the *unweighted* pruned tensors (``"total"``: the sign of their sum;
  ``"frequency"``: the sign held by more of them; a tie counts as +), then
  averages the *weighted* entries that carry the elected sign over how many
  carry it ("disjoint merge"). DARE-TIES prunes at random instead.

A density of 1 (or more) prunes nothing and draws no random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

MajoritySign = Literal["total", "frequency"]
Combination = Literal["svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


# --- LoRA factor pairs ---------------------------------------------------------------
def cat_factors(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                coefs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``sum c_i b_i a_i`` as one pair of rank ``sum r_i``: the a's stacked, the scaled b's side by side.

    Returns ``(a, b)``: a (sum r_i, q), b (p, sum r_i).
    """
    a = torch.cat(list(a_list), dim=0)  # (R, q)
    b = torch.cat([c * b_i for c, b_i in zip(coefs, b_list)], dim=1)  # (p, R)
    return a, b


def linear_factors(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                   coefs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``linear`` LoRA merge: a = sum sign(c) sqrt|c| a_i, b = sum sqrt|c| b_i.

    Equal ranks are required. The product ``b @ a`` holds the wanted
    ``sum c_i b_i a_i`` plus the cross terms ``sqrt|c_i c_j| b_i a_j`` (i != j),
    so it is exact only for a single adapter.
    """
    a = sum((math.copysign(math.sqrt(abs(c)), c) * a_i for c, a_i in zip(coefs, a_list)),
            torch.zeros_like(a_list[0]))  # (r, q)
    b = sum((math.sqrt(abs(c)) * b_i for c, b_i in zip(coefs, b_list)),
            torch.zeros_like(b_list[0]))  # (p, r)
    return a, b


def truncated_factors(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``target`` (p, q) by truncated SVD (Eckart-Young).

    Returns ``(a, b, error)`` with a (rank, q), b (p, rank) and ``b @ a`` the
    truncation; the singular values are split evenly between the two (their
    square roots on each side). ``error`` is the relative Frobenius error
    ``||target - b a|| / ||target||`` (0 for a zero target), read off the
    discarded singular values. A rank above ``min(p, q)`` is padded with zeros.
    """
    u, s, vh = torch.linalg.svd(target, full_matrices=False)  # (p, k), (k,), (k, q)
    return _split(u, s, vh, rank) + (tail_error(s, rank),)


def truncated_product(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`truncated_factors` of ``b @ a`` (a (R, q), b (p, R)) without forming the p x q product.

    With ``b = Q_b R_b`` and ``a^T = Q_a R_a`` (reduced QR), ``b a = Q_b (R_b R_a^T) Q_a^T``;
    the SVD of the small core ``R_b R_a^T`` gives that of ``b a``.
    """
    q_b, r_b = torch.linalg.qr(b)  # (p, k), (k, R)
    q_a, r_a = torch.linalg.qr(a.T)  # (q, m), (m, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (k, m)
    return _split(q_b @ u, s, vh @ q_a.T, rank) + (tail_error(s, rank),)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of the leading ``rank`` singular triplets, zero-padded to ``rank``."""
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()  # (keep,)
    a = vh.new_zeros(rank, vh.shape[1])
    b = u.new_zeros(u.shape[0], rank)
    a[:keep] = root[:, None] * vh[:keep]  # (keep, q)
    b[:, :keep] = u[:, :keep] * root  # (p, keep)
    return a, b


def tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """``sqrt(sum_{k >= rank} s_k^2 / sum_k s_k^2)``: the relative error of keeping ``rank`` values."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    return 0.0 if total == 0.0 else math.sqrt(float(energy[rank:].sum()) / total)


def relative_error(approx: torch.Tensor, target: torch.Tensor) -> float:
    """``||approx - target||_F / ||target||_F`` (0 when both are zero, inf when only the target is)."""
    diff, norm = float((approx - target).double().norm()), float(target.double().norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


# --- task-vector combinations -----------------------------------------------------------
def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries zeroed."""
    if density >= 1.0:
        return tensor
    count = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(count).indices] = True
    return (flat * mask).reshape(tensor.shape)


def drop_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and divided by it, else zeroed.

    The draws are taken on the CPU (from ``generator``, or torch's global one)
    so that a seed gives the same mask on every device.
    """
    if density >= 1.0:
        return tensor
    draws = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)  # (p, q), on the CPU
    keep = (draws < density).to(tensor.device)
    return tensor * keep / density


def elect_signs(stacked: torch.Tensor, majority_sign: MajoritySign) -> torch.Tensor:
    """The elected sign (+1 / -1) of every entry of the (n, p, q) stack; ties go to +1."""
    votes = stacked.sum(0) if majority_sign == "total" else stacked.sign().sum(0)  # (p, q)
    return torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Mean over the adapters of the weighted entries whose sign is the elected one.

    ``stacked`` (n, p, q) unweighted task tensors, ``weights`` (n,), ``signs`` (p, q).
    An entry no adapter agrees on is 0.
    """
    agree = stacked.sign() == signs  # (n, p, q); a zero entry never agrees
    weighted = stacked * weights.view(-1, 1, 1)  # (n, p, q)
    count = agree.sum(0).clamp(min=1)  # (p, q)
    return (weighted * agree).sum(0) / count


def combine(method: Combination, deltas: Sequence[torch.Tensor], weights: Sequence[float],
            density: float = 1.0, majority_sign: MajoritySign = "total",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The merged (p, q) update of the task tensors ``deltas`` (each (p, q)) under ``method``.

    ``svd`` is the plain weighted sum ``sum w_i delta_i``.
    """
    w = torch.tensor(list(weights), dtype=deltas[0].dtype, device=deltas[0].device)  # (n,)
    if method == "svd":
        pruned = list(deltas)
    elif method in ("ties", "magnitude_prune"):
        pruned = [keep_largest(d, density) for d in deltas]
    elif method in ("dare_linear", "dare_ties"):
        pruned = [drop_random(d, density, generator) for d in deltas]
    else:
        raise ValueError(f"unknown combination {method!r}")
    stacked = torch.stack(pruned)  # (n, p, q)
    if method in ("ties", "dare_ties"):
        return disjoint_mean(stacked, w, elect_signs(stacked, majority_sign))
    return (stacked * w.view(-1, 1, 1)).sum(0)


__all__ = [
    "cat_factors", "combine", "disjoint_mean", "drop_random", "elect_signs", "keep_largest",
    "linear_factors", "relative_error", "tail_error", "truncated_factors", "truncated_product",
]
