"""Subspace similarity φ(i, j): 1 for the same directions, 0 for orthogonal ones, and the paper's formula between."""

from __future__ import annotations

import torch

import adapterkit as ak
from adapterkit.analysis import analyze
from adapterkit.analysis.subspace import subspace_similarity

from tests.analysis.test_weight_updates import orthonormal, plant, tiny_bert

EPS64 = torch.finfo(torch.float64).eps


def update(u: torch.Tensor, s: list[float], v: torch.Tensor) -> torch.Tensor:
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def test_identical_orthogonal_and_partial_overlap():
    basis = orthonormal(12, 12, 0)
    u = orthonormal(10, 3, 1)
    first = update(u, [3.0, 2.0, 1.0], basis[:, :3])
    assert torch.allclose(torch.tensor(subspace_similarity(first, first, 3, 3), dtype=torch.float64),
                          torch.ones(3, 3, dtype=torch.float64), atol=64 * EPS64)
    orthogonal = update(u, [3.0, 2.0, 1.0], basis[:, 3:6])
    assert torch.allclose(torch.tensor(subspace_similarity(first, orthogonal, 3, 3), dtype=torch.float64),
                          torch.zeros(3, 3, dtype=torch.float64), atol=64 * EPS64)
    # second shares only the first's top direction, as its own top one
    partial = update(u, [3.0, 2.0, 1.0], torch.stack([basis[:, 0], basis[:, 4], basis[:, 5]], dim=1))
    phi = torch.tensor(subspace_similarity(first, partial, 3, 3), dtype=torch.float64)
    # every ‖V1[:, :i]ᵀ V2[:, :j]‖² is 1 (the one shared direction), so φ(i, j) = 1 / min(i, j)
    expected = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [1.0, 0.5, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(phi, expected, rtol=0, atol=64 * EPS64)


def test_two_ranks_keep_their_own_sizes():
    v = orthonormal(16, 8, 3)
    u = orthonormal(16, 8, 4)
    phi = subspace_similarity(update(u[:, :2], [2.0, 1.0], v[:, :2]), update(u, [8, 7, 6, 5, 4, 3, 2, 1], v), 2, 8)
    assert len(phi) == 2 and len(phi[0]) == 8
    assert abs(phi[1][7] - 1.0) < 64 * EPS64  # the rank-2 subspace lies inside the rank-8 one


def test_compare_loads_a_folder_and_leaves_the_model_as_it_was(tmp_path):
    model = tiny_bert(layers=2)
    for name, seed in (("one", 0), ("two", 0), ("other", 5)):
        ak.add_adapter(model, name, ak.LoraConfig(rank=2, alpha=4, targets=["value"]))
        for i, (_, layer) in enumerate(x for x in ak.core.layers.adapter_layers(model) if x[1].method == "lora"):
            plant(layer, name, orthonormal(32, 2, 100 + i), torch.tensor([2.0, 1.0], dtype=torch.float64),
                  orthonormal(32, 2, seed + i))
    ak.save_adapter(model, "two", str(tmp_path / "two"))
    ak.save_adapter(model, "other", str(tmp_path / "other"))
    ak.delete_adapter(model, "two")
    ak.delete_adapter(model, "other")
    ak.set_active(model, "one")
    same = analyze(model, "one", compare=tmp_path / "two")["compare"]
    assert ak.list_adapters(model) == ["one"] and ak.active_adapters(model) == ["one"]
    assert [m["layer"] for m in same["modules"]] == [0, 1]
    for entry in same["modules"]:
        assert min(v for row in entry["phi"] for v in row) > 1 - 1e-5  # float32-stored factors of one subspace
    different = analyze(model, "one", compare=tmp_path / "other")["compare"]
    for entry in different["modules"]:
        # independent random 2-planes in 32 dimensions overlap little
        assert entry["phi"][0][0] < 0.5
