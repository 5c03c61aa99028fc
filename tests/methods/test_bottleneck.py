"""Bottleneck adapters: placements, hand-computed outputs, lifecycle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.core.architectures import modules_in_role
from adapterkit.methods.bottleneck import PARALLEL_SCALING, BottleneckLayer, same_layer
from tests.tiny_models import perturb, TINY_BUILDERS, build_tiny, output_tensor
from tests.tolerances import assert_close_scaled, forward_ops

KINDS = sorted(TINY_BUILDERS)
PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]



def wrapped(model: torch.nn.Module) -> dict[str, BottleneckLayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def pre_hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("bad", [
    {"placement": "sequential"}, {"reduction_factor": 0}, {"reduction_factor": 2.5},
    {"reduction_factor": True}, {"non_linearity": "softmax"},
])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ak.ConfigError):
        ak.BottleneckConfig(**bad)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_and_only_adapter_trains(kind: str) -> None:
    model, inputs = build_tiny(kind)
    reference = output_tensor(model, inputs)
    for placement in PLACEMENTS:  # each new adapter becomes the active one
        ak.add_adapter(model, placement, ak.BottleneckConfig(placement=placement, reduction_factor=8))
        torch.testing.assert_close(output_tensor(model, inputs), reference, rtol=0, atol=0)
    own = ak.adapter_parameters(model, "parallel")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(own)
    assert ak.trainable_summary(model)["trainable"] == sum(p.numel() for p in own.values())
    # hidden 32 / 8 = 4 wide; parallel's down-projection reads the FFN block input (32 wide too)
    for layer in wrapped(model).values():
        for name in layer.adapter_names():
            assert layer.adapter_down[name].weight.shape == (4, 32)
            assert layer.adapter_up[name].weight.shape == (32, 4)


def test_placements_wrap_the_table_roles() -> None:
    layers = [f"bert.encoder.layer.{i}" for i in range(2)]
    expected = {
        "houlsby": {f"{p}.{m}" for p in layers for m in ("attention.output.dense", "output.dense")},
        "pfeiffer": {f"{p}.output.dense" for p in layers},
        "parallel": {f"{p}.output.dense" for p in layers},
    }
    for placement, paths in expected.items():
        model, _ = build_tiny("bert")
        ak.add_adapter(model, "a", ak.BottleneckConfig(placement=placement))
        assert set(wrapped(model)) == paths
        assert pre_hook_count(model) == (2 if placement == "parallel" else 0)
    # BART: houlsby also follows the decoder's cross-attention output.
    model, _ = build_tiny("bart")
    ak.add_adapter(model, "a", ak.BottleneckConfig())
    assert len(wrapped(model)) == 2 * 2 + 2 * 3


def test_reduction_factor_never_gives_zero_width() -> None:
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "a", ak.BottleneckConfig(placement="pfeiffer", reduction_factor=1000))
    assert all(layer.adapter_down["a"].out_features == 1 for layer in wrapped(model).values())


def _record(module: torch.nn.Module, store: dict, key: str) -> torch.utils.hooks.RemovableHandle:
    def hook(mod, args, out):
        store[key] = (args[0].detach(), out.detach())
    return module.register_forward_hook(hook)


def test_houlsby_output_is_h_plus_bottleneck_of_h() -> None:
    model, inputs = build_tiny("gpt2")  # Conv1D projections
    ak.add_adapter(model, "a", ak.BottleneckConfig(non_linearity="tanh", reduction_factor=4))
    perturb(model, "a")
    layer = model.transformer.h[0].attn.c_proj
    seen: dict = {}
    handle = _record(layer, seen, "out")
    output_tensor(model, inputs)
    handle.remove()
    x, out = seen["out"]
    conv = layer.base_layer  # Conv1D: y = x @ W + b, W is (in, out)
    down, up = layer.adapter_down["a"], layer.adapter_up["a"]
    with torch.no_grad():  # the reference in float64, from the float32 input the layer saw
        h = x.double() @ conv.weight.double() + conv.bias.double()
        expected = h + torch.tanh(h @ down.weight.double().T + down.bias.double()) @ up.weight.double().T \
            + up.bias.double()
    # three reductions in a row: the projection's input, the hidden size, the bottleneck width
    ops = conv.weight.shape[0] + down.in_features + up.in_features + 4
    assert_close_scaled(out, expected, ops=ops)


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_adds_scaled_bottleneck_of_ffn_input(kind: str) -> None:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "a", ak.BottleneckConfig(placement="parallel", non_linearity="gelu"))
    perturb(model, "a")
    path, layer = next(iter(wrapped(model).items()))
    ffn_in = model.get_submodule(same_layer(path, modules_in_role(model, "ffn_in")))
    seen: dict = {}
    handles = [_record(layer, seen, "out"), _record(ffn_in, seen, "in")]
    output_tensor(model, inputs)
    for handle in handles:
        handle.remove()
    block_input, _ = seen["in"]
    x, out = seen["out"]
    down, up = layer.adapter_down["a"], layer.adapter_up["a"]
    with torch.no_grad():  # the base layer's own output, plus the bottleneck in float64
        bottleneck = F.gelu(block_input.double() @ down.weight.double().T + down.bias.double()) \
            @ up.weight.double().T + up.bias.double()
        expected = layer.base_layer(x).double() + PARALLEL_SCALING * bottleneck
    assert_close_scaled(out, expected, ops=down.in_features + up.in_features + 4)


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_optimiser_step_changes_adapter_only(kind: str) -> None:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "a", ak.BottleneckConfig(placement="parallel"))
    perturb(model, "a")
    own = set(ak.adapter_parameters(model, "a"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs).logits.pow(2).mean().backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed <= own
    assert any("adapter_down" in k for k in changed) and any("adapter_up" in k for k in changed)


def test_mixed_placements_switch_route_delete_and_unload() -> None:
    model, inputs = build_tiny("llama")
    model.double()  # routed rows against whole-batch runs: algebra, compared in float64
    original = {k: v.clone() for k, v in model.state_dict().items()}
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "seq", ak.BottleneckConfig(placement="houlsby"))
    ak.add_adapter(model, "par", ak.BottleneckConfig(placement="parallel", non_linearity="silu"))
    perturb(model, "seq", seed=1)
    perturb(model, "par", seed=2)
    out_par = output_tensor(model, inputs)
    ak.set_active(model, "seq")
    out_seq = output_tensor(model, inputs)
    assert not torch.allclose(out_par, out_seq) and not torch.allclose(out_seq, reference)
    with ak.adapters_disabled(model):
        torch.testing.assert_close(output_tensor(model, inputs), reference, rtol=0, atol=0)
    with ak.route(model, ["par", None]):
        routed = output_tensor(model, inputs)
    assert_close_scaled(routed[0], out_par[0], ops=forward_ops(model))
    assert_close_scaled(routed[1], reference[1], ops=forward_ops(model))
    with pytest.raises(ak.MergeError, match="cannot be merged"):
        ak.merge(model, "par")
    with pytest.raises(ak.MergeError, match="cannot be merged"):
        next(iter(wrapped(model).values())).merge("seq")
    assert pre_hook_count(model) == 2
    ak.delete_adapter(model, "par")
    assert pre_hook_count(model) == 0
    torch.testing.assert_close(output_tensor(model, inputs), out_seq, rtol=0, atol=0)
    ak.add_adapter(model, "par2", ak.BottleneckConfig(placement="parallel"))
    base = ak.unload(model)
    assert pre_hook_count(base) == 0 and not wrapped(base)
    restored = base.state_dict()
    assert set(restored) == set(original) and all(torch.equal(original[k], restored[k]) for k in original)
    torch.testing.assert_close(output_tensor(base, inputs), reference, rtol=0, atol=0)


def test_unknown_architecture_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ak.TargetError, match="not in the table"):
        ak.add_adapter(model, "a", ak.BottleneckConfig())
