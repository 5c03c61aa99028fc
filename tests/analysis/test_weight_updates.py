"""Weight-update figures on LoRAs with planted structure: known rank, singular values and directions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

import adapterkit as ak
from adapterkit.analysis.updates import update_sites, weight_and_update, weight_update_report
from adapterkit.analysis.weight_updates import energy_rank, recommended_rank, update_statistics

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def tiny_bert(layers: int = 3, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=32)
    return BertModel(config).eval()


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """``cols`` orthonormal columns of length ``rows``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def plant(layer, name: str, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
    """Set the LoRA factors so that scaling * B @ A = U diag(s) Vᵀ exactly up to float32 storage."""
    scale = layer.scaling[name]
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(v.T.float())
        layer.lora_B[name].weight.copy_((u * s / scale).float())


@pytest.fixture
def planted():
    model = tiny_bert()
    ak.add_adapter(model, "p", ak.LoraConfig(rank=8, alpha=16, targets=["query"]))
    values = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # rank 4 of a rank-8 adapter
    layers = [m for _, m in ak.core.layers.adapter_layers(model) if m.method == "lora"]
    for i, layer in enumerate(layers):
        u, v = orthonormal(32, 8, seed=10 + i), orthonormal(32, 8, seed=20 + i)
        plant(layer, "p", u, torch.cat([values, torch.zeros(4, dtype=torch.float64)]), v)
    return model, values, layers


def test_planted_rank_and_spectrum_are_reported_exactly(planted):
    model, values, layers = planted
    report = weight_update_report(model, "p")
    assert [m["layer"] for m in report["modules"]] == [0, 1, 2]
    assert {m["module"] for m in report["modules"]} == {"attention.self.query"}
    for entry, layer in zip(report["modules"], layers):
        found = torch.tensor(entry["singular_values"][:4], dtype=torch.float64)
        # the factors are stored in float32: each entry of ΔW carries a relative error of a few eps32
        torch.testing.assert_close(found, values, rtol=0, atol=16 * EPS32 * float(values.sum()))
        assert entry["numerical_rank"] == 4
        assert entry["trained_rank"] == 8
        energy = (values ** 2).cumsum(0) / (values ** 2).sum()  # 0.76, 0.95, ...: two directions hold 90%
        assert entry["energy_rank"] == int((energy < 0.9).sum()) + 1 == 2
        assert entry["recommended_rank"] == 2
        assert math.isclose(entry["stable_rank"], float((values ** 2).sum() / values[0] ** 2), rel_tol=64 * EPS32)
        weight = layer.base_layer.weight.detach().double()
        delta = layer.delta_weight("p").detach().double()
        assert math.isclose(entry["norm_ratio"], float(delta.norm() / weight.norm()), rel_tol=64 * EPS32)


def test_amplification_follows_the_lora_paper_definition(planted):
    model, _, _ = planted
    entry = weight_update_report(model, "p")["modules"][1]
    site = update_sites(model, "p")[1]
    weight, delta = (t.double().numpy() for t in weight_and_update(site, "p"))
    u, s, vt = np.linalg.svd(delta)
    r = int((s > s[0] * 1e-6).sum())
    expected = np.linalg.norm(delta) / np.linalg.norm(u[:, :r].T @ weight @ vt[:r].T)
    assert math.isclose(entry["amplification"], expected, rel_tol=1e3 * EPS64 * weight.size)


def test_intruder_dimensions_appear_only_for_a_new_dominant_direction():
    gen = torch.Generator().manual_seed(3)
    u, v = orthonormal(16, 16, 1), orthonormal(16, 16, 2)
    sigma = torch.linspace(1.0, 0.1, 16, dtype=torch.float64)
    weight = u @ torch.diag(sigma) @ v.T
    # a small update along W's own top directions intrudes nothing
    small = 0.01 * u[:, :2] @ v[:, :2].T
    assert update_statistics(weight, small, trained_rank=2)["intruders"] == 0
    # a large update along a direction that mixes W's weakest left singular vectors evenly intrudes once
    mixed = (u[:, 8:] @ torch.ones(8, dtype=torch.float64)) / math.sqrt(8)  # cosine 1/sqrt(8) with each
    big = 5.0 * mixed.unsqueeze(1) @ torch.randn(1, 16, generator=gen, dtype=torch.float64) / 4
    stats = update_statistics(weight, big, trained_rank=1)
    assert stats["intruders"] == 1
    assert min(stats["intruder_similarity"]) < 0.5


def test_rank_rule_and_energy_rank_edges():
    assert energy_rank(torch.zeros(4, dtype=torch.float64)) == 0
    assert energy_rank(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)) == 1
    assert [recommended_rank(e, 8) for e in (0, 1, 2, 3, 5, 9)] == [0, 1, 2, 4, 8, 8]
    assert recommended_rank(5, None) == 8


def test_dora_update_is_merged_minus_base_and_other_methods_have_none():
    model = tiny_bert(layers=2)
    ak.add_adapter(model, "d", ak.LoraConfig(rank=4, alpha=8, targets=["value"], use_dora=True))
    layer = next(m for _, m in ak.core.layers.adapter_layers(model) if m.method == "lora")
    with torch.no_grad():
        layer.lora_B["d"].weight.normal_(0, 0.1)
        layer.lora_magnitude_vector["d"].mul_(1.5)
    entry = weight_update_report(model, "d")["modules"][0]
    weight = layer.base_layer.weight.detach().float()
    delta = layer.merged_weight("d").float() - weight
    assert math.isclose(entry["norm"], float(delta.double().norm()), rel_tol=64 * EPS32)
    other = tiny_bert(layers=2)
    ak.add_adapter(other, "i", ak.IA3Config())
    assert weight_update_report(other, "i") is None


def test_a_merged_adapter_is_refused_with_the_fix():
    model = tiny_bert(layers=1)
    ak.add_adapter(model, "m", ak.LoraConfig(rank=2, alpha=4, targets=["query"]))
    ak.merge(model, "m")
    with pytest.raises(ak.errors.UsageError, match="unmerge"):
        ak.analyze(model, "m")
    ak.unmerge(model, "m")
    assert ak.analyze(model, "m")["updates"]["modules"][0]["layer"] == 0
