"""What a weight update ΔW is made of: its size, spectrum and rank, and how it relates to W.

Every method whose effect is a change of a weight matrix (LoRA with its
variants rsLoRA and DoRA, and adapters produced by merging) is read through
the same ``ΔW = merged weight - W``, so the figures mean the same thing for all
of them. The quantities follow the papers that introduced them:

- ``norm_ratio``: ‖ΔW‖_F / ‖W‖_F.
- ``singular_values``: the spectrum of ΔW (largest first, at most ``SPECTRUM``).
- ``stable_rank``: ‖ΔW‖_F² / σ₁², a rank that small singular values cannot inflate.
- ``energy_rank``: the fewest singular directions holding ``ENERGY`` of ‖ΔW‖_F².
- ``amplification``: section 7.3 of the LoRA paper, ‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V
  the top-r left and right singular vectors of ΔW (r: the adapter's rank, or
  ΔW's numerical rank when smaller): how much ΔW amplifies directions that W
  itself barely uses.
- ``intruders``: the intruder dimensions of arXiv 2410.21228: of the top
  ``INTRUDER_TOP`` left singular vectors of W + ΔW, those whose largest
  absolute cosine similarity with any left singular vector of W is below
  ``INTRUDER_THRESHOLD``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SPECTRUM = 64  # singular values kept per module
ENERGY = 0.9
INTRUDER_TOP = 10
INTRUDER_THRESHOLD = 0.5
RANK_RULE = (f"the smallest power of two at or above the rank that holds {ENERGY:.0%} of the update's energy "
             "(‖ΔW‖_F²), and never above the rank it was trained with")
# Singular values below this share of the largest count as zero (float32 round-off of a low-rank product).
NUMERICAL_ZERO = 1e-6


def spectrum(delta: torch.Tensor) -> torch.Tensor:
    """All singular values of ``delta`` in float64, largest first."""
    return torch.linalg.svdvals(delta.detach().double())


def energy_rank(values: torch.Tensor, share: float = ENERGY) -> int:
    """The fewest leading singular values whose squares hold ``share`` of the total (0 for a zero matrix)."""
    energy = values.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # tolerate round-off exactly at the boundary (a planted spectrum hitting 90% on the dot)
    return int(torch.searchsorted(cumulative, torch.tensor(share - 1e-12, dtype=torch.float64)).item()) + 1


def stable_rank(values: torch.Tensor) -> float:
    """‖ΔW‖_F² / σ₁² from the singular values (0 for a zero matrix)."""
    top = float(values[0]) if len(values) else 0.0
    return float((values.double() ** 2).sum()) / top ** 2 if top > 0 else 0.0


def numerical_rank(values: torch.Tensor) -> int:
    """How many singular values are above round-off relative to the largest."""
    if not len(values) or float(values[0]) == 0.0:
        return 0
    return int((values > values[0] * NUMERICAL_ZERO).sum())


def amplification(weight: torch.Tensor, delta: torch.Tensor, rank: int) -> float:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F over the top ``rank`` singular directions of ΔW (``inf`` when W has none there)."""
    if rank == 0:
        return 0.0
    u, _, vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    projected = u[:, :rank].T @ weight.detach().double() @ vh[:rank].T  # (rank, rank)
    denominator = float(torch.linalg.matrix_norm(projected))
    numerator = float(torch.linalg.matrix_norm(delta.detach().double()))
    return numerator / denominator if denominator > 0 else math.inf


def intruder_dimensions(weight: torch.Tensor, delta: torch.Tensor, top: int = INTRUDER_TOP,
                        threshold: float = INTRUDER_THRESHOLD) -> tuple[int, list[float]]:
    """Intruders among the top ``top`` left singular vectors of W + ΔW, and each one's best similarity with W's."""
    w = weight.detach().double()
    u_base = torch.linalg.svd(w, full_matrices=False)[0]  # (out, min(out, in))
    u_tuned = torch.linalg.svd(w + delta.detach().double(), full_matrices=False)[0][:, :top]
    best = (u_tuned.T @ u_base).abs().max(dim=1).values  # (top,)
    return int((best < threshold).sum()), [float(b) for b in best]


def recommended_rank(energy: int, trained_rank: int | None) -> int:
    """The rank :data:`RANK_RULE` recommends for an update with ``energy`` = its 90%-energy rank."""
    if energy <= 0:
        return 0
    power = 1 << (energy - 1).bit_length()
    return min(power, trained_rank) if trained_rank else power


def update_statistics(weight: torch.Tensor, delta: torch.Tensor, trained_rank: int | None) -> dict[str, Any]:
    """Every per-module figure of this file for base weight ``weight`` and update ``delta`` (both (out, in))."""
    if weight.shape != delta.shape:
        raise ValueError(f"the update has shape {tuple(delta.shape)} but the weight {tuple(weight.shape)}")
    values = spectrum(delta)
    rank = numerical_rank(values)
    used = min(rank, trained_rank) if trained_rank else rank
    base_norm = float(torch.linalg.matrix_norm(weight.detach().double()))
    energy = energy_rank(values)
    intruders, similarities = intruder_dimensions(weight, delta)
    return {
        "shape": list(weight.shape),
        "trained_rank": trained_rank,
        "norm": float(torch.linalg.matrix_norm(delta.detach().double())),
        "norm_ratio": float(torch.linalg.matrix_norm(delta.detach().double())) / base_norm if base_norm else math.inf,
        "singular_values": [float(v) for v in values[:SPECTRUM]],
        "numerical_rank": rank,
        "stable_rank": stable_rank(values),
        "energy_rank": energy,
        "amplification": amplification(weight, delta, used),
        "intruders": intruders,
        "intruder_similarity": similarities,
        "recommended_rank": recommended_rank(energy, trained_rank),
    }
