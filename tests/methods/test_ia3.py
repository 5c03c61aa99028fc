"""(IA)^3: shapes and targets as PEFT has them, hand-computed outputs, merging, PEFT parity."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.core.registry import get_method
from adapterkit.methods.ia3 import IA3Layer
from tests.tiny_models import perturb, TINY_BUILDERS, build_tiny, output_tensor
from tests.tolerances import assert_close_scaled, forward_ops

KINDS = sorted(TINY_BUILDERS)



def ia3_layers(model: torch.nn.Module) -> dict[str, IA3Layer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, IA3Layer)}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def assert_restored(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Weights back after merge + unmerge: unmerging divides by the vectors, so within a rounding or two."""
    after = model.state_dict()
    assert set(after) == set(before)
    for key in before:
        assert_close_scaled(after[key], before[key], ops=4, scale=before[key].abs().max().item(), msg=key)


@pytest.mark.parametrize("bad", [
    {"targets": []}, {"targets": 3}, {"feedforward": 3},
    {"targets": ["key", "value"], "feedforward": ["output.dense"]},  # feedforward must be a subset
])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ak.ConfigError):
        ak.IA3Config(**bad)


def test_default_targets_and_peft_shapes() -> None:
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "a", ak.IA3Config())
    shapes = {p.split("bert.encoder.layer.0.")[1]: tuple(m.ia3_l["a"].shape)
              for p, m in ia3_layers(model).items() if ".layer.0." in p}
    # keys/values scale their output (out, 1); the FFN output projection its input (1, in)
    assert shapes == {"attention.self.key": (32, 1), "attention.self.value": (32, 1), "output.dense": (1, 64)}
    model, _ = build_tiny("gpt2")  # Conv1D, weight (in, out); c_attn fuses q, k, v
    ak.add_adapter(model, "a", ak.IA3Config())
    layers = ia3_layers(model)
    assert set(layers) == {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")}
    assert layers["transformer.h.0.attn.c_attn"].ia3_l["a"].shape == (96, 1)
    assert layers["transformer.h.0.mlp.c_proj"].ia3_l["a"].shape == (1, 128)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_and_only_vectors_train(kind: str) -> None:
    model, inputs = build_tiny(kind)
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "a", ak.IA3Config())
    torch.testing.assert_close(output_tensor(model, inputs), reference, rtol=0, atol=0)
    own = ak.adapter_parameters(model, "a")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(own)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in own.items() if "ia3_l" in n)


def test_scaling_matches_hand_computation_on_conv1d() -> None:
    model, inputs = build_tiny("gpt2")
    ak.add_adapter(model, "a", ak.IA3Config())
    perturb(model, "a")
    block = model.transformer.h[0]
    seen: dict = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, key=k: seen.__setitem__(key, (args[0], out)))
             for k, m in (("attn", block.attn.c_attn), ("mlp", block.mlp.c_proj))]
    output_tensor(model, inputs)
    for hook in hooks:
        hook.remove()
    attn, mlp = block.attn.c_attn, block.mlp.c_proj
    # References in float64 from the float32 tensors the layers saw; the tolerance is
    # float32's, over the layer's reduction length and the magnitude of its summed terms.
    x, out = seen["attn"]  # out = (x W + b) * l, W is (in, out)
    w, b, scale = (t.detach().double() for t in (attn.base_layer.weight, attn.base_layer.bias, attn.ia3_l["a"]))
    expected = (x.double() @ w + b) * scale.T
    magnitude = ((x.double().abs() @ w.abs() + b.abs()) * scale.abs().T).max()
    assert_close_scaled(out, expected, ops=w.shape[0] + 2, scale=float(magnitude))
    x, out = seen["mlp"]  # out = (x * l) W + b
    w, b, scale = (t.detach().double() for t in (mlp.base_layer.weight, mlp.base_layer.bias, mlp.ia3_l["a"]))
    expected = (x.double() * scale) @ w + b
    magnitude = ((x.double() * scale).abs() @ w.abs() + b.abs()).max()
    assert_close_scaled(out, expected, ops=w.shape[0] + 2, scale=float(magnitude))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_unload(kind: str) -> None:
    model, inputs = build_tiny(kind)
    model.double()  # merged against unmerged is algebra: compare in float64
    original = snapshot(model)
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "a", ak.IA3Config())
    ak.add_adapter(model, "b", ak.IA3Config())
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    ak.set_active(model, ["a", "b"])  # several active: the vectors multiply
    both = output_tensor(model, inputs)
    unmerged = snapshot(model)
    ak.merge(model)
    assert_close_scaled(output_tensor(model, inputs), both, ops=forward_ops(model))
    with ak.adapters_disabled(model):  # merged adapters come out while disabled
        assert_close_scaled(output_tensor(model, inputs), reference, ops=forward_ops(model))
    ak.unmerge(model, "a")
    ak.set_active(model, "b")
    only_b = output_tensor(model, inputs)
    ak.unmerge(model, "b")
    assert_restored(unmerged, model)
    assert_close_scaled(output_tensor(model, inputs), only_b, ops=forward_ops(model))
    ak.merge(model, "b")
    base = ak.unload(model)
    assert_restored(original, base)
    assert_close_scaled(output_tensor(base, inputs), reference, ops=forward_ops(model))


def test_switch_route_delete_and_optimiser_step() -> None:
    model, inputs = build_tiny("bart")
    model.double()  # routed rows against whole-batch runs: algebra, compared in float64
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "a", ak.IA3Config())
    ak.add_adapter(model, "b", ak.IA3Config(targets=["fc1", "fc2"]))  # explicit: fc2 plays ffn_out
    assert [layer.is_feedforward["b"] for p, layer in ia3_layers(model).items() if "layers.0.fc" in p
            and p.startswith("model.encoder")] == [False, True]
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    out_b = output_tensor(model, inputs)
    ak.set_active(model, "a")
    out_a = output_tensor(model, inputs)
    assert not torch.allclose(out_a, out_b)
    with ak.route(model, ["b", "a"]):
        routed = output_tensor(model, inputs)
    assert_close_scaled(routed, torch.stack([out_b[0], out_a[1]]), ops=forward_ops(model))
    with ak.route(model, [None, "b"]):
        routed = output_tensor(model, inputs)
    assert_close_scaled(routed, torch.stack([reference[0], out_b[1]]), ops=forward_ops(model))
    own = set(ak.adapter_parameters(model, "a"))
    before = snapshot(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs).logits.pow(2).mean().backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= own
    ak.delete_adapter(model, "a")
    ak.set_active(model, "b")
    torch.testing.assert_close(output_tensor(model, inputs), out_b, rtol=0, atol=0)


def test_merge_refused_when_another_wrapper_is_inside() -> None:
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "lora", ak.LoraConfig(targets=["key"]))
    ak.add_adapter(model, "ia3", ak.IA3Config())
    with pytest.raises(ak.MergeError, match="lora wrapper sits inside"):
        ak.merge(model, "ia3")


def _copy_between(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> None:
    """Copy IA3 vectors between PEFT-named and adapterkit-named parameters (same module paths)."""
    def key(name: str) -> str:
        parts = [p for p in name.split(".") if p not in ("base_model", "model", "base_layer", "default")]
        return ".".join(parts[: parts.index("ia3_l") + 1])

    by_key = {key(n): p for n, p in src.items() if "ia3_l" in n}
    targets = {key(n): p for n, p in dst.items() if "ia3_l" in n}
    assert set(by_key) == set(targets)
    with torch.no_grad():
        for k, param in targets.items():
            assert param.shape == by_key[k].shape
            param.copy_(by_key[k])


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_same_outputs_as_peft_both_ways(kind: str) -> None:
    peft = pytest.importorskip("peft")
    method = get_method("ia3")
    # ours -> PEFT: peft_config() makes PEFT pick the same modules and the same scaling side.
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "a", ak.IA3Config(), train_head=False)
    perturb(model, "a")
    data = method.peft_config(ak.get_adapter_config(model, "a"), model)
    assert data["peft_type"] == "IA3" and data["fan_in_fan_out"] == (kind == "gpt2")
    fields = {k: v for k, v in data.items() if k != "peft_type"}
    theirs = peft.get_peft_model(build_tiny(kind)[0], peft.IA3Config(**fields)).eval()
    _copy_between(dict(model.named_parameters()), dict(theirs.named_parameters()))
    with torch.no_grad():
        assert_close_scaled(theirs(**inputs).logits, output_tensor(model, inputs), ops=forward_ops(model))
    # PEFT -> ours: PEFT's own defaults (for BERT they also input-scale attention.output.dense).
    theirs = peft.get_peft_model(build_tiny(kind)[0], peft.IA3Config()).eval()
    perturb_named = {n: p for n, p in theirs.named_parameters() if "ia3_l" in n}
    with torch.no_grad():
        for i, param in enumerate(perturb_named.values()):
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    config = method.config_from_peft(theirs.peft_config["default"].to_dict())
    ours, _ = build_tiny(kind)
    ak.add_adapter(ours, "p", config, train_head=False)
    _copy_between(perturb_named, dict(ours.named_parameters()))
    with torch.no_grad():
        assert_close_scaled(output_tensor(ours, inputs), theirs(**inputs).logits, ops=forward_ops(ours))


def test_config_from_peft_refuses_what_it_cannot_honour() -> None:
    method = get_method("ia3")
    with pytest.raises(ak.ConfigError, match="exclude_modules"):
        method.config_from_peft({"peft_type": "IA3", "target_modules": ["k"], "exclude_modules": ["x"]})
    with pytest.raises(ak.ConfigError, match="IA3"):
        method.config_from_peft({"peft_type": "LORA"})
