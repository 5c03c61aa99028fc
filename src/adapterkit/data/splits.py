"""Fixed, seeded, stratified splits: of built-in data sets, and of a training file
into training and validation when no validation file is given."""

from __future__ import annotations

import numpy as np
import pandas as pd

from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData

SPLIT_SEED = 20240607  # fixed forever: changing it changes every reported number
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
HOLDOUT_FRACTION = 0.1


def split_indices(
    strata: list | None,
    n: int,
    fractions: dict[str, float] = SPLIT_FRACTIONS,
    seed: int = SPLIT_SEED,
) -> dict[str, list[int]]:
    """Fixed split of ``range(n)`` by ``fractions``, stratified by ``strata`` when given.

    Every class is shuffled with the same seeded generator and cut at the
    fractions (the last split takes the rest), so each split keeps the class
    proportions. Indices come back sorted, i.e. in file order.
    """
    rng = np.random.default_rng(seed)
    groups = pd.Series(strata if strata is not None else [0] * n)
    names = list(fractions)
    splits: dict[str, list[int]] = {name: [] for name in names}
    for _, members in sorted(groups.groupby(groups).groups.items()):
        members = rng.permutation(np.asarray(members))
        start = 0
        for name in names[:-1]:
            stop = start + int(round(len(members) * fractions[name]))
            splits[name] += members[start:stop].tolist()
            start = stop
        splits[names[-1]] += members[start:].tolist()
    return {name: sorted(idx) for name, idx in splits.items()}


def holdout(data: TaskData, fraction: float = HOLDOUT_FRACTION, seed: int = SPLIT_SEED) -> tuple[TaskData, TaskData]:
    """Split ``data`` into ``(train, validation)``, stratified by label when examples have one."""
    strata = [e.get("label") for e in data.examples]
    if any(s is None for s in strata):
        strata = None
    parts = split_indices(strata, len(data), {"train": 1.0 - fraction, "validation": fraction}, seed)
    if not parts["validation"] or not parts["train"]:
        raise DataError(data.source, f"expected enough examples to hold out a {fraction:.0%} validation "
                        f"split, found only {len(data)}; give a validation file instead")
    return (data.subset(parts["train"], f"{data.source}[train {1 - fraction:.0%}]"),
            data.subset(parts["validation"], f"{data.source}[validation {fraction:.0%}]"))
