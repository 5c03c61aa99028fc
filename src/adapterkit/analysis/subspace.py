"""How much two weight updates share: the subspace similarity of section 7.2 of the LoRA paper.

For updates ΔW₁ and ΔW₂ of the same weight, with V₁ and V₂ their right singular
vectors (the input directions they act on; for LoRA the row space of A),

    φ(i, j) = ‖V₁[:, :i]ᵀ V₂[:, :j]‖_F² / min(i, j)

is 1 when the top-i directions of one lie in the top-j of the other and 0
when they are orthogonal. The paper compares two ranks (r = 8 against r = 64)
and two seeds; the same measure tells whether two tasks use the same directions.
"""

from __future__ import annotations

import torch

MAX_DIRECTIONS = 64  # largest i and j reported


def right_singular_vectors(delta: torch.Tensor, count: int) -> torch.Tensor:
    """The top ``count`` right singular vectors of ``delta`` as columns, in float64, shape (in, count)."""
    _, _, vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    return vh[:count].T


def subspace_similarity(first: torch.Tensor, second: torch.Tensor, rank_first: int,
                        rank_second: int) -> list[list[float]]:
    """φ(i, j) for i = 1..rank_first and j = 1..rank_second (capped at :data:`MAX_DIRECTIONS`).

    ``first`` and ``second`` are the two updates, both (out, in); the ranks say
    how many of each one's directions are meaningful (a LoRA's rank).
    """
    if first.shape != second.shape:
        raise ValueError(f"the updates have shapes {tuple(first.shape)} and {tuple(second.shape)}; "
                         "subspaces can only be compared on the same weight")
    rows, cols = min(rank_first, MAX_DIRECTIONS, *first.shape), min(rank_second, MAX_DIRECTIONS, *second.shape)
    overlap = right_singular_vectors(first, rows).T @ right_singular_vectors(second, cols)  # (rows, cols)
    squared = overlap ** 2
    # ‖V1[:, :i]ᵀ V2[:, :j]‖_F² for every (i, j) at once: a 2-D cumulative sum
    totals = squared.cumsum(0).cumsum(1)
    sizes = torch.minimum(torch.arange(1, rows + 1).unsqueeze(1), torch.arange(1, cols + 1).unsqueeze(0))
    return (totals / sizes).clamp(0.0, 1.0).tolist()
