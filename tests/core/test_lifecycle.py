"""Adapter lifecycle on any nn.Module: names, activation, routing, heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import adapterkit as ak
from adapterkit.core.plan import Route
from tests.tiny_models import build_tiny, output_tensor
from tests.tolerances import assert_close_scaled, forward_ops


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_plain_module_lora_matches_hand_computation() -> None:
    model = _mlp()
    config = ak.LoraConfig(rank=2, alpha=4, dropout=0.0, targets=["0"])  # the module is in training mode
    ak.add_adapter(model, "a", config)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = torch.randn(5, 6)
    base = layer.base_layer
    got = layer(x)
    with torch.no_grad():
        w, b = base.weight.double(), base.bias.double()
        a, up = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
        x64 = x.double()  # the reference in float64: the float32 layer's rounding is all that differs
        expected_hidden = x64 @ w.T + b + 2.0 * (x64 @ a.T @ up.T)
        magnitude = (x64.abs() @ w.abs().T + b.abs() + 2.0 * (x64.abs() @ a.abs().T @ up.abs().T)).max()
    # reductions over in_features (6) then rank (2), and three additions
    assert_close_scaled(got, expected_hidden, ops=6 + 2 + 3, scale=float(magnitude))


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
    model.double()  # routed and one-at-a-time runs are the same algebra: compare in float64
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
        assert_close_scaled(routed[row][mask[row]], expected[row][0][mask[row]], ops=forward_ops(model))
    with pytest.raises(ValueError, match="one adapter name, plan or None per example"):
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
    model.double()
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
        assert_close_scaled(routed[row][mask[row]], expected[row][mask[row]], ops=forward_ops(model))
    with torch.enable_grad(), ak.route(model, names):  # with gradients on, the same numbers
        assert_close_scaled(model(**batch).logits.detach(), routed, ops=forward_ops(model))


def test_route_sees_weights_changed_in_place_between_calls() -> None:
    """Routed weight stacks are cached, but an in-place update must never serve stale weights."""
    model, inputs = build_tiny("gpt2")
    model.double()
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
    assert_close_scaled(after[1][mask[1]], single(1, "b")[mask[1]], ops=forward_ops(model))


@pytest.mark.parametrize("weights_fixed", [False, True])
def test_route_sees_an_adapter_replaced_or_moved_between_calls(weights_fixed: bool) -> None:
    """The stacks behind routing follow a delete and re-add under one name, and a move to another dtype,
    also when the caller promises no in-place writes (``weights_fixed``, what the server passes)."""
    model, inputs = build_tiny("gpt2")
    mask = inputs["attention_mask"].bool()

    def add(name: str, scale: float) -> None:
        ak.add_adapter(model, name, ak.LoraConfig(rank=2))
        with torch.no_grad():
            for p in ak.adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape) * scale)

    def single(row: int, name: str) -> torch.Tensor:
        ak.set_active(model, name)
        return output_tensor(model, {k: v[row:row + 1] for k, v in inputs.items()})[0]

    add("a", 0.3)
    add("b", 0.3)
    with torch.no_grad(), ak.route(model, ["a", "b"], weights_fixed=weights_fixed):
        first = output_tensor(model, inputs)
    ak.delete_adapter(model, "b")
    add("b", 0.6)  # same name, new weights
    with torch.no_grad(), ak.route(model, ["a", "b"], weights_fixed=weights_fixed):
        second = output_tensor(model, inputs)
    assert not torch.allclose(first[1][mask[1]], second[1][mask[1]])
    assert_close_scaled(second[1][mask[1]], single(1, "b")[mask[1]], ops=forward_ops(model))
    model.double()  # the adapter weights move to float64: the stacks must too
    with torch.no_grad(), ak.route(model, ["a", "b"], weights_fixed=weights_fixed):
        third = output_tensor(model, inputs)
    assert third.dtype == torch.float64
    assert_close_scaled(third[0][mask[0]], single(0, "a")[mask[0]], ops=forward_ops(model))


def test_weights_fixed_is_a_promise_not_part_of_the_plan() -> None:
    """A Route's ``weights_fixed`` changes no equality, hash or saved form."""
    plain, promised = Route(["a", None]), Route(["a", None], weights_fixed=True)
    assert promised == plain and hash(promised) == hash(plain)
    assert promised.to_dict() == plain.to_dict() == {"route": ["a", None]}
    assert promised.weights_fixed and not plain.weights_fixed
    model, _ = build_tiny("gpt2")
    for name in ("a", "b"):
        ak.add_adapter(model, name, ak.LoraConfig(rank=2))
    layers = [m for m in model.modules() if isinstance(m, ak.methods.lora.LoraLayer)]
    for fixed in (False, True):  # the promise reaches the layers through the plan's resolution
        with ak.route(model, ["a", "b"], weights_fixed=fixed):
            assert layers and all(layer.plan().weights_fixed is fixed for layer in layers)


def test_adapter_added_in_eval_mode_applies_no_dropout() -> None:
    model, inputs = build_tiny("bert")
    ak.add_adapter(model, "a", ak.LoraConfig(dropout=0.5))
    with torch.no_grad():
        for p in ak.adapter_parameters(model, "a").values():
            p.add_(0.3)
    assert not model.training
    torch.testing.assert_close(output_tensor(model, inputs), output_tensor(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("config", [ak.BottleneckConfig(), ak.IA3Config(), ak.LoraConfig(rank=2)],
                         ids=["bottleneck", "ia3", "lora"])
def test_model_with_adapters_moves_and_casts_with_to(config) -> None:
    """``model.to(...)`` reaches every adapter weight (no wrapper shadows ``nn.Module._apply``)."""
    model, inputs = build_tiny("bert")
    ak.add_adapter(model, "a", config)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in ak.adapter_parameters(model, "a").values())
    assert output_tensor(model, inputs).dtype == torch.float64
