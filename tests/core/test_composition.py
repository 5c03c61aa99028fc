"""Stack, Sum, Average, Fuse and Route against hand-computed references, on every tiny architecture.

Model-level checks fold LoRA deltas into the base weights by hand; layer-level
checks recompute a bottleneck, IA3 or fusion layer's output from its captured
input with the adapter weights. Algebra runs in float64 with tolerances from
``tests/tolerances.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.core.layers import AdapterLayer
from tests.tiny_models import TINY_BUILDERS, build_tiny, output_tensor, perturb
from tests.tolerances import assert_close_scaled, forward_ops

KINDS = sorted(TINY_BUILDERS)


def _model(kind: str, *configs: ak.AdapterConfig) -> tuple[torch.nn.Module, dict]:
    model, inputs = build_tiny(kind)
    model.double()
    for seed, (name, config) in enumerate(zip("abc", configs), start=1):
        ak.add_adapter(model, name, config)
        perturb(model, name, seed=seed)
    return model, inputs


def _layers(model: torch.nn.Module, method: str) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer) and m.method == method]


# --- LoRA: every plan is a weighted sum of deltas ------------------------------------
LORA_PLANS = [
    (ak.Stack("a", "b"), {"a": 1.0, "b": 1.0}),
    (ak.Average({"a": 0.7, "b": 0.3}), {"a": 0.7, "b": 0.3}),
    (ak.Average({"a": 2.0, "b": -1.0}, normalize=False), {"a": 2.0, "b": -1.0}),
    (ak.Sum("a", ak.Average({"b": 1.0, "c": 3.0})), {"a": 1.0, "b": 0.25, "c": 0.75}),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("plan,weights", LORA_PLANS, ids=[repr(p) for p, _ in LORA_PLANS])
def test_lora_plans_equal_their_deltas_folded_by_hand(kind: str, plan: ak.Plan, weights: dict) -> None:
    model, inputs = _model(kind, ak.LoraConfig(rank=2), ak.LoraConfig(rank=3), ak.LoraConfig(rank=4, alpha=4))
    with ak.use(model, plan):
        composed = output_tensor(model, inputs)
    with torch.no_grad():
        for layer in _layers(model, "lora"):
            layer.base_layer.weight += sum(layer.delta_weight(n) * w for n, w in weights.items())
    with ak.adapters_disabled(model):
        folded = output_tensor(model, inputs)
    assert_close_scaled(composed, folded, ops=forward_ops(model))


# --- bottleneck adapters: functions of the layer output ------------------------------
def _bottleneck_out(layer: AdapterLayer, name: str, h: torch.Tensor) -> torch.Tensor:
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return F.linear(torch.relu(F.linear(h, down.weight, down.bias)), up.weight, up.bias)


def _fused(layer: AdapterLayer, fusion: str, h: torch.Tensor, names: list[str]) -> torch.Tensor:
    attn = layer.adapter_fusion[fusion]
    outs = [_bottleneck_out(layer, n, h) for n in names]
    q = F.linear(h, attn.query.weight, attn.query.bias)
    scores = torch.stack([(q * F.linear(o, attn.key.weight, attn.key.bias)).sum(-1) for o in outs], -1)
    probs = torch.softmax(scores / math.sqrt(h.shape[-1]), -1)
    mixed = sum(probs[..., i:i + 1] * o for i, o in enumerate(outs))
    return h + F.linear(mixed, attn.value.weight, attn.value.bias)


def _expected_bottleneck(layer: AdapterLayer, plan: object, h: torch.Tensor) -> torch.Tensor:
    f = lambda n, x: _bottleneck_out(layer, n, x)  # noqa: E731
    if plan == ak.Stack("a", "b"):
        first = h + f("a", h)
        return first + f("b", first)
    if plan == ak.Sum("a", "b"):
        return h + f("a", h) + f("b", h)
    if plan == ak.Average({"a": 0.25, "b": 0.75}):
        return h + 0.25 * f("a", h) + 0.75 * f("b", h)
    if plan == ak.Sum(ak.Stack("a", "b"), "c"):
        first = h + f("a", h)
        return first + f("b", first) + f("c", h)
    assert isinstance(plan, ak.Fuse)
    return _fused(layer, plan.fusion, h, list(plan.items))


def _capture(layers: list[AdapterLayer]) -> tuple[dict, list]:
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.__setitem__(id(m), (args[0], out)))
             for layer in layers]
    return seen, hooks


BOTTLENECK_PLANS = [ak.Stack("a", "b"), ak.Sum("a", "b"), ak.Average({"a": 0.25, "b": 0.75}),
                    ak.Sum(ak.Stack("a", "b"), "c"), ak.Fuse("a", "b", "c", fusion="abc")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("plan", BOTTLENECK_PLANS, ids=repr)
def test_bottleneck_plans_against_each_layer_recomputed_by_hand(kind: str, plan: ak.Plan) -> None:
    config = ak.BottleneckConfig(placement="pfeiffer", reduction_factor=4)
    model, inputs = _model(kind, config, config, config)
    ak.add_fusion(model, ["a", "b", "c"], "abc")
    perturb(model, "abc", seed=7, scale=0.5)  # move the fusion away from its near-average start
    layers = _layers(model, "bottleneck")
    seen, hooks = _capture(layers)
    with ak.use(model, plan):
        output_tensor(model, inputs)
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(layers)
    for layer in layers:
        x, out = seen[id(layer)]
        with torch.no_grad():
            expected = _expected_bottleneck(layer, plan, layer.base_layer(x))
        assert_close_scaled(out, expected, ops=4 * x.shape[-1], msg=repr(plan))


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_adapters_sum_and_stack_alike_and_average_of_one_is_the_adapter(kind: str) -> None:
    config = ak.BottleneckConfig(placement="parallel", reduction_factor=4)
    model, inputs = _model(kind, config, config)
    with ak.use(model, ak.Sum("a", "b")):
        summed = output_tensor(model, inputs)
    with ak.use(model, ak.Stack("a", "b")):  # both read the FFN block input: order does not matter
        torch.testing.assert_close(output_tensor(model, inputs), summed, rtol=0, atol=0)
    with ak.use(model, "a"):
        alone = output_tensor(model, inputs)
    with ak.use(model, ak.Average({"a": 1.0})):
        torch.testing.assert_close(output_tensor(model, inputs), alone, rtol=0, atol=0)


# --- IA3: scalings multiply in Sum/Stack; Average weights the scaled outputs ----------
@pytest.mark.parametrize("kind", KINDS)
def test_ia3_plans_against_each_layer_recomputed_by_hand(kind: str) -> None:
    model, inputs = _model(kind, ak.IA3Config(), ak.IA3Config())
    layers = _layers(model, "ia3")
    for plan in (ak.Stack("a", "b"), ak.Average({"a": 0.3, "b": 0.7})):
        seen, hooks = _capture(layers)
        with ak.use(model, plan):
            output_tensor(model, inputs)
        for hook in hooks:
            hook.remove()
        for layer in layers:
            x, out = seen[id(layer)]
            la, lb = layer.ia3_l["a"].flatten(), layer.ia3_l["b"].flatten()
            with torch.no_grad():
                if layer.is_feedforward["a"]:
                    run = lambda v: layer.base_layer(x * v)  # noqa: E731
                else:
                    run = lambda v: layer.base_layer(x) * v  # noqa: E731
                expected = run(la * lb) if isinstance(plan, ak.Stack) else 0.3 * run(la) + 0.7 * run(lb)
            assert_close_scaled(out, expected, ops=2 * x.shape[-1], msg=repr(plan))


# --- Route: any plan per example ----------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_route_with_a_plan_per_example_matches_each_example_alone(kind: str) -> None:
    model, inputs = _model(kind, ak.LoraConfig(rank=2), ak.IA3Config(), ak.BottleneckConfig(reduction_factor=4))
    entries = [ak.Average({"a": 0.5, "b": 0.5}), ak.Stack("a", "c")]
    with ak.route(model, entries):
        routed = output_tensor(model, inputs)
    mask = inputs["attention_mask"].bool()
    for row, entry in enumerate(entries):
        single = {k: v[row:row + 1] for k, v in inputs.items()}
        with ak.use(model, entry):
            alone = output_tensor(model, single)[0]
        if routed.dim() == 3 and "decoder_input_ids" not in inputs:
            assert_close_scaled(routed[row][mask[row]], alone[mask[row]], ops=forward_ops(model))
        else:
            assert_close_scaled(routed[row], alone, ops=forward_ops(model))


@pytest.mark.parametrize("kind", KINDS)
def test_a_stack_across_methods_applies_each(kind: str) -> None:
    # LoRA under a bottleneck adapter: the same as the LoRA delta merged into the base, then the adapter
    model, inputs = _model(kind, ak.LoraConfig(rank=2), ak.BottleneckConfig(reduction_factor=4))
    with ak.use(model, ak.Stack("a", "b")):
        stacked = output_tensor(model, inputs)
    ak.merge(model, "a")
    with ak.use(model, "b"):
        merged = output_tensor(model, inputs)
    assert_close_scaled(stacked, merged, ops=forward_ops(model))


# --- what is refused, and why -----------------------------------------------------------
def test_refused_combinations_say_which_and_why() -> None:
    model, _ = build_tiny("llama")
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=2))
    ak.add_adapter(model, "q", ak.PromptTuningConfig(num_virtual_tokens=2))
    ak.add_adapter(model, "l", ak.LoraConfig(rank=2))
    with pytest.raises(ak.CompositionError, match=r"'p' \(prefix_tuning\) adds virtual tokens"):
        ak.set_active(model, ak.Average({"p": 0.5, "l": 0.5}))
    with pytest.raises(ak.CompositionError, match="only one adapter that adds virtual tokens"):
        ak.set_active(model, ak.Stack("p", "q"))
    with pytest.raises(ak.CompositionError, match="'l' is a lora adapter; AdapterFusion attends"):
        ak.set_active(model, ak.Fuse("l", "p"))
    ak.set_active(model, ak.Stack("p", "l"))  # one virtual-token adapter with a LoRA: fine
    assert ak.active_adapters(model) == ["p", "l"]


# --- AdapterFusion --------------------------------------------------------------------
def test_fusion_trains_only_itself_and_its_head_and_saves_and_loads(tmp_path) -> None:
    model, inputs = build_tiny("bert")
    for seed, name in enumerate("ab", start=1):
        ak.add_adapter(model, name, ak.BottleneckConfig(reduction_factor=4))
        perturb(model, name, seed=seed)
    ak.add_fusion(model, ["a", "b"], "ab")
    assert ak.active_plan(model) == ak.Fuse("a", "b", fusion="ab")
    own = ak.adapter_parameters(model, "ab")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(own)
    assert all(".adapter_fusion.ab." in n or ".copies.ab." in n for n in own)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).logits.pow(2).mean().backward()
    optimizer.step()
    model.eval()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= set(own)
    fused = output_tensor(model, inputs)
    for name in ("a", "b", "ab"):
        ak.save_adapter(model, name, tmp_path / name)
    fresh, _ = build_tiny("bert")
    with pytest.raises(Exception, match="add or load the member adapters first"):
        ak.load_adapter(fresh, tmp_path / "ab")
    assert ak.list_adapters(fresh) == []  # the failed load left nothing behind
    for name in ("a", "b", "ab"):
        ak.load_adapter(fresh, tmp_path / name)
    assert ak.active_plan(fresh) == ak.Fuse("a", "b", fusion="ab")
    torch.testing.assert_close(output_tensor(fresh, inputs), fused, rtol=0, atol=0)
    with pytest.raises(Exception, match="attend over 'a'"):
        ak.delete_adapter(fresh, "a")


def test_deleting_the_active_fusion_leaves_the_base_plan() -> None:
    model, inputs = build_tiny("bert")
    for seed, name in enumerate("ab", start=1):
        ak.add_adapter(model, name, ak.BottleneckConfig(reduction_factor=4))
        perturb(model, name, seed=seed)
    ak.add_fusion(model, ["a", "b"], "ab")
    ak.delete_adapter(model, "ab")
    assert ak.active_plan(model) == ak.Sum()
    with ak.adapters_disabled(model):
        base = output_tensor(model, inputs)
    torch.testing.assert_close(output_tensor(model, inputs), base, rtol=0, atol=0)


def test_a_route_entry_may_not_hold_two_virtual_token_adapters() -> None:
    model, _ = build_tiny("llama")
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=2))
    ak.add_adapter(model, "q", ak.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ak.CompositionError, match="only one adapter that adds virtual tokens"):
        with ak.route(model, [ak.Sum("p", "q"), ak.Sum("p", "q")]):
            pass
