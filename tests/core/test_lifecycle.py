"""Adapter lifecycle on any nn.Module: names, activation, routing, heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import adapterkit as ak
from tests.tiny_models import build_tiny, output_tensor


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_plain_module_lora_matches_hand_computation() -> None:
    model = _mlp()
    config = ak.LoraConfig(rank=2, alpha=4, targets=["0"])
    ak.add_adapter(model, "a", config)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = torch.randn(5, 6)
    base = layer.base_layer
    expected_hidden = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T)
    torch.testing.assert_close(layer(x), expected_hidden)


def test_rslora_scaling() -> None:
    assert ak.LoraConfig(rank=4, alpha=8).scaling == 2.0
    assert ak.LoraConfig(rank=4, alpha=8, use_rslora=True).scaling == 4.0


def test_names_are_checked() -> None:
    model = _mlp()
    ak.add_adapter(model, "a", ak.LoraConfig(targets=["0"]))
    with pytest.raises(ValueError, match="already has an adapter called 'a'"):
        ak.add_adapter(model, "a", ak.LoraConfig(targets=["0"]))
    with pytest.raises(KeyError, match="no adapter called 'zz'"):
        ak.set_active(model, "zz")
    with pytest.raises(ValueError, match="without dots"):
        ak.add_adapter(model, "a.b", ak.LoraConfig(targets=["0"]))


def test_set_active_none_freezes_everything() -> None:
    model, inputs = build_tiny("bert")
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "a", ak.LoraConfig())
    ak.set_active(model, None)
    assert ak.trainable_summary(model)["trainable"] == 0
    torch.testing.assert_close(output_tensor(model, inputs), reference, rtol=0, atol=0)


def test_each_adapter_has_its_own_head() -> None:
    model, inputs = build_tiny("bert")
    ak.add_adapter(model, "a", ak.LoraConfig())
    ak.add_adapter(model, "b", ak.LoraConfig())
    with torch.no_grad():
        model.classifier.copies["a"].weight.add_(1.0)
    ak.set_active(model, "b")
    out_b = output_tensor(model, inputs)
    ak.set_active(model, "a")
    assert not torch.allclose(output_tensor(model, inputs), out_b)
    assert "classifier.copies.a.weight" in ak.adapter_parameters(model, "a")


def test_route_gives_each_example_its_adapter() -> None:
    model, inputs = build_tiny("llama")
    for name, seed in (("a", 1), ("b", 2)):
        ak.add_adapter(model, name, ak.LoraConfig(rank=2))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ak.adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    expected = []
    for row, name in enumerate(["a", None]):
        single = {k: v[row:row + 1] for k, v in inputs.items()}
        if name is None:
            with ak.adapters_disabled(model):
                expected.append(output_tensor(model, single))
        else:
            ak.set_active(model, name)
            expected.append(output_tensor(model, single))
    with ak.route(model, ["a", None]):
        routed = output_tensor(model, inputs)
    mask = inputs["attention_mask"].bool()
    for row in range(2):
        torch.testing.assert_close(routed[row][mask[row]], expected[row][0][mask[row]], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one name"):
        with ak.route(model, ["a"]):
            output_tensor(model, inputs)


def test_merge_refused_while_routing_and_merged_twice() -> None:
    model, _ = build_tiny("gpt2")
    ak.add_adapter(model, "a", ak.LoraConfig())
    ak.merge(model, "a")
    with pytest.raises(ak.MergeError):
        with ak.route(model, ["a", "a"]):
            pass
    ak.unmerge(model)


def test_route_with_mixed_ranks_matches_single_adapter_runs() -> None:
    model, inputs = build_tiny("gpt2")
    names = ["r2", "r4", "r3"]
    for rank, name in zip((2, 4, 3), names):
        ak.add_adapter(model, name, ak.LoraConfig(rank=rank, alpha=rank * 2))
        with torch.no_grad():
            for p in ak.adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape) * 0.3)
    batch = {k: torch.cat([v, v[:1]]) for k, v in inputs.items()}  # 3 rows
    expected = []
    for row, name in enumerate(names):
        ak.set_active(model, name)
        expected.append(output_tensor(model, {k: v[row:row + 1] for k, v in batch.items()})[0])
    with ak.route(model, names):
        routed = output_tensor(model, batch)
    mask = batch["attention_mask"].bool()
    for row in range(3):
        torch.testing.assert_close(routed[row][mask[row]], expected[row][mask[row]], rtol=0, atol=1e-5)
    with torch.enable_grad(), ak.route(model, names):  # with gradients on, the same numbers
        torch.testing.assert_close(model(**batch).logits.detach(), routed, rtol=0, atol=1e-6)


def test_route_sees_weights_changed_in_place_between_calls() -> None:
    """Routed weight stacks are cached, but an in-place update must never serve stale weights."""
    model, inputs = build_tiny("gpt2")
    for name in ("a", "b"):
        ak.add_adapter(model, name, ak.LoraConfig(rank=2))
        with torch.no_grad():
            for p in ak.adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape) * 0.3)
    mask = inputs["attention_mask"].bool()

    def single(row: int, name: str) -> torch.Tensor:
        ak.set_active(model, name)
        return output_tensor(model, {k: v[row:row + 1] for k, v in inputs.items()})[0]

    with torch.no_grad(), ak.route(model, ["a", "b"]):
        before = output_tensor(model, inputs)
        for key, p in ak.adapter_parameters(model, "b").items():
            if "lora_B" in key:
                p.mul_(-2.0)  # an optimiser-style in-place step inside the same route block
        after = output_tensor(model, inputs)
    assert not torch.allclose(before[1][mask[1]], after[1][mask[1]])
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)  # row "a" untouched
    torch.testing.assert_close(after[1][mask[1]], single(1, "b")[mask[1]], rtol=0, atol=1e-5)


def test_adapter_added_in_eval_mode_applies_no_dropout() -> None:
    model, inputs = build_tiny("bert")
    ak.add_adapter(model, "a", ak.LoraConfig(dropout=0.5))
    with torch.no_grad():
        for p in ak.adapter_parameters(model, "a").values():
            p.add_(0.3)
    assert not model.training
    torch.testing.assert_close(output_tensor(model, inputs), output_tensor(model, inputs), rtol=0, atol=0)
