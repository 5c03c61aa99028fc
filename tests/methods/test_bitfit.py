"""BitFit: every bias gets a learned offset; outputs equal the base with the biases moved."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.bitfit import BitFitLayer
from tests.tiny_models import perturb, build_tiny, output_tensor
from tests.tolerances import assert_close_scaled, forward_ops

KINDS = ["bart", "bert", "gpt2"]  # Llama and T5 have no biases



def bitfit_layers(model: torch.nn.Module) -> dict[str, BitFitLayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, BitFitLayer)}


@pytest.mark.parametrize("kind", KINDS)
def test_every_bias_outside_the_head_gets_a_zero_offset(kind: str) -> None:
    model, inputs = build_tiny(kind)
    reference = output_tensor(model, inputs)
    biased = {n.removesuffix(".bias") for n, _ in model.named_parameters() if n.endswith(".bias")}
    biased -= {"classifier"}  # BERT's task head trains (and is saved) with every adapter anyway
    ak.add_adapter(model, "a", ak.BitFitConfig())
    assert set(bitfit_layers(model)) == biased
    torch.testing.assert_close(output_tensor(model, inputs), reference, rtol=0, atol=0)
    own = ak.adapter_parameters(model, "a", include_head=False)
    assert own and all(n.endswith(".bitfit.a.bias") for n in own)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ak.adapter_parameters(model, "a"))
    for path, layer in bitfit_layers(model).items():
        assert layer.bitfit["a"].bias.shape == layer.base_layer.bias.shape
        assert not layer.bitfit["a"].bias.any()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_output_equals_base_with_biases_moved_by_the_offsets(kind: str) -> None:
    model, inputs = build_tiny(kind)
    model.double()  # algebra (b + o) x = b x + o x: compare in float64
    ak.add_adapter(model, "a", ak.BitFitConfig())
    perturb(model, "a")
    ours = output_tensor(model, inputs)
    reference, _ = build_tiny(kind)  # fold the offsets into a plain copy by hand
    reference.double()
    with torch.no_grad():
        for path, layer in bitfit_layers(model).items():
            reference.get_submodule(path).bias += layer.bitfit["a"].bias
    assert_close_scaled(ours, output_tensor(reference, inputs), ops=forward_ops(model))


def test_optimiser_step_changes_offsets_and_head_only() -> None:
    model, inputs = build_tiny("bert")
    ak.add_adapter(model, "a", ak.BitFitConfig())
    perturb(model, "a")
    own = set(ak.adapter_parameters(model, "a"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs).logits.pow(2).mean().backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed <= own
    assert any(".bitfit.a.bias" in k for k in changed) and any(k.startswith("classifier.") for k in changed)


def test_two_adapters_switch_route_refuse_merge_and_unload() -> None:
    model, inputs = build_tiny("gpt2")
    model.double()  # routed rows against whole-batch runs: algebra, compared in float64
    original = {k: v.clone() for k, v in model.state_dict().items()}
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "a", ak.BitFitConfig())
    ak.add_adapter(model, "b", ak.BitFitConfig())
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    out_b = output_tensor(model, inputs)
    ak.set_active(model, "a")
    out_a = output_tensor(model, inputs)
    assert not torch.allclose(out_a, out_b)
    with ak.adapters_disabled(model):
        torch.testing.assert_close(output_tensor(model, inputs), reference, rtol=0, atol=0)
    with ak.route(model, [None, "b"]):
        routed = output_tensor(model, inputs)
    assert_close_scaled(routed, torch.stack([reference[0], out_b[1]]), ops=forward_ops(model))
    with pytest.raises(ak.MergeError, match="cannot be merged"):
        ak.merge(model, "a")
    with pytest.raises(ak.MergeError, match="unload restores the original bias"):
        next(iter(bitfit_layers(model).values())).merge("a")
    ak.delete_adapter(model, "b")
    torch.testing.assert_close(output_tensor(model, inputs), out_a, rtol=0, atol=0)
    base = ak.unload(model)
    assert not bitfit_layers(base)
    restored = base.state_dict()
    assert set(restored) == set(original) and all(torch.equal(original[k], restored[k]) for k in original)
    torch.testing.assert_close(output_tensor(base, inputs), reference, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_model_without_biases_is_refused_and_left_untouched(kind: str) -> None:
    model, _ = build_tiny(kind)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ak.TargetError, match="has no bias"):
        ak.add_adapter(model, "a", ak.BitFitConfig())
    assert ak.list_adapters(model) == [] and [n for n, _ in model.named_parameters()] == names
