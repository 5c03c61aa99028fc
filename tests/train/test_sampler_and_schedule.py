"""Batch orders and learning-rate schedules."""

from __future__ import annotations

import numpy as np
import pytest

from adapterkit.train import TrainConfig, TrainConfigError
from adapterkit.train.optim import lr_factor, warmup_steps
from adapterkit.train.sampler import epoch_batches


def _padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(1, 60, 1000).tolist()
    first = epoch_batches(lengths, 32, seed=3, epoch=0)
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert sorted(len(b) for b in first) == [1000 % 32] + [32] * (1000 // 32)
    assert first == epoch_batches(lengths, 32, seed=3, epoch=0)
    assert first != epoch_batches(lengths, 32, seed=3, epoch=1)
    assert first != epoch_batches(lengths, 32, seed=4, epoch=0)


def test_grouping_by_length_cuts_padding():
    lengths = np.random.default_rng(1).integers(1, 60, 2000).tolist()
    grouped = epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=False)
    assert _padding(lengths, grouped) < 0.2 * _padding(lengths, plain)


def test_without_grouping_batches_are_consecutive_slices_of_one_permutation():
    plain = epoch_batches([5] * 10, 4, seed=0, epoch=0, group_by_length=False)
    order = np.random.default_rng([0, 0]).permutation(10).tolist()
    assert plain == [order[0:4], order[4:8], order[8:10]]


@pytest.mark.parametrize("kind, step, expected", [
    ("linear", 0, 1 / 3), ("linear", 1, 2 / 3), ("linear", 2, 1.0), ("linear", 6, 0.5), ("linear", 10, 0.0),
    ("cosine", 2, 1.0), ("cosine", 6, 0.5), ("cosine", 10, 0.0),
    ("constant", 0, 1 / 3), ("constant", 9, 1.0),
])
def test_warmup_then_decay(kind, step, expected):
    assert lr_factor(step, warmup=2, total=10, kind=kind) == pytest.approx(expected)


def test_warmup_length():
    assert warmup_steps(TrainConfig(warmup_ratio=0.1), 95) == 10
    assert warmup_steps(TrainConfig(warmup_steps=7), 95) == 7


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("scheduler", "step"), ("lr", -1.0),
                                          ("warmup_ratio", 1.5), ("max_steps", 2.5)])
def test_config_validation(field, value):
    with pytest.raises(TrainConfigError, match=field):
        TrainConfig(**{field: value})
    with pytest.raises(TrainConfigError, match="output_dir"):
        TrainConfig(resume=True)
