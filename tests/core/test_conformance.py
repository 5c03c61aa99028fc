"""One suite, every registered method, every tiny architecture.

Each check compares against a reference computation: the base model's own
output, a state_dict snapshot, or a hand-summed LoRA delta. Checks of the same
operations on the same numbers are bit-exact; checks of algebra (merged against
unmerged, summed deltas) run in float64 with a tolerance derived from its epsilon
(see ``tests/tolerances.py``).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import adapterkit as ak
from adapterkit.core.config import AdapterConfig
from tests.tiny_models import TINY_BUILDERS, build_tiny, output_tensor
from tests.tolerances import assert_close_scaled, forward_ops

# method name -> (config factory, architectures it applies to, identity at init?)
CASES: dict[str, tuple[Callable[[], AdapterConfig], tuple[str, ...], bool]] = {
    "lora": (lambda: ak.LoraConfig(rank=4, alpha=8), tuple(TINY_BUILDERS), True),
}
for _name, _factory, _kinds, _identity in [
    ("dora", lambda: ak.LoraConfig(rank=4, alpha=8, use_dora=True), tuple(TINY_BUILDERS), True),
]:
    CASES[_name] = (_factory, _kinds, _identity)


def _optional(name: str, factory_name: str, kinds: tuple[str, ...], identity: bool, **kwargs) -> None:
    config_class = getattr(ak, factory_name, None)
    if config_class is not None:
        CASES[name] = (lambda: config_class(**kwargs), kinds, identity)


_ALL = tuple(TINY_BUILDERS)
_optional("bottleneck", "BottleneckConfig", _ALL, True)
_optional("bottleneck-pfeiffer", "BottleneckConfig", _ALL, True, placement="pfeiffer")
_optional("bottleneck-parallel", "BottleneckConfig", _ALL, True, placement="parallel")
_optional("ia3", "IA3Config", _ALL, True)
_optional("bitfit", "BitFitConfig", ("bert", "gpt2", "bart"), True)
_optional("prefix", "PrefixTuningConfig", _ALL, False, num_virtual_tokens=3)
_optional("prompt", "PromptTuningConfig", _ALL, False, num_virtual_tokens=3)

PARAMS = [(case, kind) for case, (_, kinds, _) in CASES.items() for kind in kinds]


def _perturb(model: torch.nn.Module, name: str, seed: int = 0) -> None:
    """Move the adapter's weights away from their (often identity) initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name, include_head=False).values():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)


def test_every_registered_method_is_covered() -> None:
    methods = {c().method for c, _, _ in CASES.values()}
    # A fusion is built over other adapters, not added alone: tests/core/test_composition.py covers it.
    assert set(ak.registered_methods()) - {"fusion"} <= methods


@pytest.mark.parametrize("case,kind", PARAMS)
def test_output_at_init(case: str, kind: str) -> None:
    factory, _, identity = CASES[case]
    model, inputs = build_tiny(kind)
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "a", factory())
    out = output_tensor(model, inputs)
    assert out.shape == reference.shape
    if identity:
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
    else:  # prefix / prompt tokens change the output from the first step
        assert not torch.allclose(out, reference)


@pytest.mark.parametrize("case,kind", PARAMS)
def test_only_adapter_and_head_train(case: str, kind: str) -> None:
    factory, _, _ = CASES[case]
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "a", factory())
    own = ak.adapter_parameters(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(own)
    assert ak.trainable_summary(model)["trainable"] == sum(p.numel() for p in own.values())
    _perturb(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).logits.float().pow(2).mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "an optimiser step changed nothing"
    assert changed <= set(own), f"frozen weights changed: {sorted(changed - set(own))[:3]}"


@pytest.mark.parametrize("case,kind", PARAMS)
def test_unload_restores_base_bit_identically(case: str, kind: str) -> None:
    factory, _, _ = CASES[case]
    model, inputs = build_tiny(kind)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "a", factory())
    ak.add_adapter(model, "b", factory())
    _perturb(model, "a")
    base = ak.unload(model)
    restored = base.state_dict()
    assert set(restored) == set(original)
    assert all(torch.equal(original[k], restored[k]) for k in original)
    torch.testing.assert_close(output_tensor(base, inputs), reference, rtol=0, atol=0)
    assert ak.list_adapters(base) == []


@pytest.mark.parametrize("case,kind", [p for p in PARAMS if ak.get_method(CASES[p[0]][0]()).mergeable])
def test_unload_after_merge_restores_base_within_one_rounding(case: str, kind: str) -> None:
    # No copy of the base weight is kept while merged (it would double a merged
    # model's memory): unmerging subtracts (LoRA) or divides (IA3) what merging
    # added, so each weight comes back within a rounding or two of its own size.
    factory, _, _ = CASES[case]
    model, _ = build_tiny(kind)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())  # the base's own parameters, which merging changes in place
    ak.add_adapter(model, "a", factory())
    _perturb(model, "a")
    ak.merge(model, "a")
    merged = [p.detach().clone() for p in params]
    restored = ak.unload(model).state_dict()
    assert any(not torch.equal(p, m) for p, m in zip(original.values(), merged)), "merging changed no weight"
    scale = max(m.abs().max().item() for m in merged)
    for key in original:
        assert_close_scaled(restored[key], original[key], ops=4, scale=scale, msg=key)


@pytest.mark.parametrize("case,kind", PARAMS)
def test_switching_and_disabling(case: str, kind: str) -> None:
    factory, _, _ = CASES[case]
    model, inputs = build_tiny(kind)
    reference = output_tensor(model, inputs)
    ak.add_adapter(model, "a", factory())
    ak.add_adapter(model, "b", factory())
    _perturb(model, "a", seed=1)
    _perturb(model, "b", seed=2)
    assert ak.active_adapters(model) == ["b"]
    out_b = output_tensor(model, inputs)
    ak.set_active(model, "a")
    out_a = output_tensor(model, inputs)
    assert not torch.allclose(out_a, out_b)
    with ak.adapters_disabled(model):
        torch.testing.assert_close(output_tensor(model, inputs), reference, rtol=0, atol=0)
    torch.testing.assert_close(output_tensor(model, inputs), out_a, rtol=0, atol=0)
    ak.delete_adapter(model, "a")
    assert ak.list_adapters(model) == ["b"]
    ak.set_active(model, "b")
    torch.testing.assert_close(output_tensor(model, inputs), out_b, rtol=0, atol=0)


@pytest.mark.parametrize("case,kind", PARAMS)
def test_merge_or_refuse(case: str, kind: str) -> None:
    factory, _, _ = CASES[case]
    model, inputs = build_tiny(kind)
    model.double()  # merging is algebra: check it where rounding is far below any defect
    ak.add_adapter(model, "a", factory())
    _perturb(model, "a")
    unmerged = output_tensor(model, inputs)
    if not ak.get_method(factory()).mergeable:
        with pytest.raises(ak.MergeError, match="cannot be merged"):
            ak.merge(model, "a")
        return
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ak.merge(model, "a")
    assert_close_scaled(output_tensor(model, inputs), unmerged, ops=forward_ops(model))
    ak.unmerge(model, "a")
    after = model.state_dict()
    for key in weights:  # back to within rounding (see the unload test above)
        assert_close_scaled(after[key], weights[key], ops=4, scale=weights[key].abs().max().item() + 1, msg=key)
    assert_close_scaled(output_tensor(model, inputs), unmerged, ops=forward_ops(model))


@pytest.mark.parametrize("kind", sorted(TINY_BUILDERS))
def test_two_lora_adapters_sum_their_deltas(kind: str) -> None:
    model, inputs = build_tiny(kind)
    model.double()  # an algebraic identity: float64, so that a tolerance from its epsilon is meaningful
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2))
    ak.add_adapter(model, "b", ak.LoraConfig(rank=3))
    _perturb(model, "a", seed=1)
    _perturb(model, "b", seed=2)
    # Reference: fold each delta into a plain copy of the base by hand, W + dA + dB.
    layers = [m for m in model.modules() if isinstance(m, ak.AdapterLayer) and m.method == "lora"]
    ak.set_active(model, ["a", "b"])
    both = output_tensor(model, inputs)
    with torch.no_grad():
        for layer in layers:
            weight = layer.base_layer.weight
            weight += layer.delta_weight("a") + layer.delta_weight("b")
    with ak.adapters_disabled(model):
        folded = output_tensor(model, inputs)
    assert both.dtype == torch.float64
    assert_close_scaled(both, folded, ops=forward_ops(model))


# The quantised column: every method on a base whose linear layers are stored in int8 (torchao)
# or nf4 (bitsandbytes) computes what it computes on a float base holding the dequantised weights.
# GPT-2's projections are Conv1D, which is not quantised.
QUANTISED = [(case, kind, scheme) for case, kind in PARAMS if kind != "gpt2" for scheme in ("int8", "nf4")]


@pytest.mark.filterwarnings("ignore:.*stay in float")
@pytest.mark.parametrize(("case", "kind", "scheme"), QUANTISED)
def test_on_a_quantised_base_equals_on_the_dequantised_float_base(case: str, kind: str, scheme: str) -> None:
    from adapterkit.models.quantize import quantize_model
    from tests.models.test_quantized import _dequantized_twin
    from tests.tiny_models import perturb

    model, inputs = build_tiny(kind)
    quantize_model(model, scheme)
    twin = _dequantized_twin(model)
    factory = CASES[case][0]
    for target in (model, twin):
        ak.add_adapter(target, "a", factory())
    perturb(model, "a")
    with torch.no_grad():
        for name, param in ak.adapter_parameters(twin, "a").items():
            param.copy_(ak.adapter_parameters(model, "a")[name])
    got, want = output_tensor(model, inputs), output_tensor(twin, inputs)
    # the same weights through another kernel: float32 rounding of the magnitudes involved
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(float(want.abs().max()), 1.0))
