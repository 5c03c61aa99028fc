"""Deterministic batch orders, grouped by length to cut padding.

The order of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run
rebuilds exactly the batches an uninterrupted run would have seen; nothing
about the data order needs saving beyond the epoch and the batch position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Examples are sorted by length inside windows of this many batches: enough
# to make batches homogeneous, small enough to keep the order random.
GROUP_WINDOW_BATCHES = 50


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Lists of example indices, one list per batch, for one epoch.

    With ``group_by_length`` the shuffled indices are cut into windows, each
    window is sorted by length (longest first) and cut into batches, and the
    batches are shuffled again so long and short ones interleave.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        window = batch_size * GROUP_WINDOW_BATCHES
        lengths_arr = np.asarray(lengths)
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        # stable sort keeps the shuffled order among equal lengths
        order = np.concatenate([c[np.argsort(-lengths_arr[c], kind="stable")] for c in chunks])
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

