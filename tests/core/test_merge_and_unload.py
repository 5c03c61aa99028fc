"""``merge_and_unload``: the plan folded into the weights, the user's class, no adapterkit module left."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from tests.tiny_models import TINY_BUILDERS, build_tiny, output_tensor, perturb
from tests.tolerances import assert_close_scaled, forward_ops

CASES = [
    ("lora average", (ak.LoraConfig(rank=2), ak.LoraConfig(rank=4, use_rslora=True)),
     ak.Average({"a": 0.7, "b": 0.3}), tuple(TINY_BUILDERS)),
    ("ia3 sum", (ak.IA3Config(), ak.IA3Config()), ak.Sum("a", "b"), tuple(TINY_BUILDERS)),
    ("ia3 average", (ak.IA3Config(), ak.IA3Config()), ak.Average({"a": 0.4, "b": 0.6}), tuple(TINY_BUILDERS)),
    ("dora", (ak.LoraConfig(rank=2, use_dora=True), ak.LoraConfig(rank=2)), "a", tuple(TINY_BUILDERS)),
    ("lora then ia3", (ak.LoraConfig(rank=2), ak.IA3Config()), ak.Stack("a", "b"), tuple(TINY_BUILDERS)),
    ("bitfit average", (ak.BitFitConfig(), ak.BitFitConfig()), ak.Average({"a": 0.5, "b": 0.5}),
     ("bert", "gpt2", "bart")),
]
PARAMS = [(label, kind) for label, _, _, kinds in CASES for kind in kinds]
BY_LABEL = {label: (configs, plan) for label, configs, plan, _ in CASES}


def _plain_classes(model: torch.nn.Module) -> set[str]:
    return {type(m).__module__.split(".")[0] for m in model.modules()}


@pytest.mark.parametrize("label,kind", PARAMS)
def test_merged_model_computes_what_the_plan_did(label: str, kind: str) -> None:
    configs, plan = BY_LABEL[label]
    model, inputs = build_tiny(kind)
    model.double()
    model_class = type(model)
    for seed, (name, config) in enumerate(zip("ab", configs), start=1):
        ak.add_adapter(model, name, config)
        perturb(model, name, seed=seed)
    with ak.use(model, plan):
        adapted = output_tensor(model, inputs)
    plain = ak.merge_and_unload(model, plan)
    assert plain is model and type(plain) is model_class
    assert _plain_classes(plain) <= {"torch", "transformers"}, _plain_classes(plain)
    assert not hasattr(plain, "adapterkit") and not hasattr(plain, "adapterkit_store")
    assert_close_scaled(output_tensor(plain, inputs), adapted, ops=forward_ops(plain))


def test_linear_heads_of_an_average_become_one_head() -> None:
    model, inputs = build_tiny("bert")
    model.double()
    for seed, name in enumerate("ab", start=1):
        ak.add_adapter(model, name, ak.LoraConfig(rank=2))
        perturb(model, name, seed=seed)
        with torch.no_grad():  # give each adapter its own trained-looking head
            model.classifier.copies[name].weight.add_(seed * 0.5)
    plan = ak.Average({"a": 0.25, "b": 0.75})
    with ak.use(model, plan):
        adapted = output_tensor(model, inputs)
    plain = ak.merge_and_unload(model, plan)
    assert type(plain.classifier) is torch.nn.Linear
    assert_close_scaled(output_tensor(plain, inputs), adapted, ops=forward_ops(plain))


def test_default_plan_is_the_active_one() -> None:
    model, inputs = build_tiny("llama")
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2))
    perturb(model, "a")
    adapted = output_tensor(model, inputs)
    assert_close_scaled(output_tensor(ak.merge_and_unload(model), inputs), adapted, ops=forward_ops(model))


@pytest.mark.parametrize("config,plan,message", [
    (ak.BottleneckConfig(), "a", "bottleneck adapter"),
    (ak.PrefixTuningConfig(num_virtual_tokens=2), "a", "prefix_tuning adapter"),
    (ak.LoraConfig(rank=2), ak.Route(["a", None]), "its own plan"),
    (ak.LoraConfig(rank=2, use_dora=True), ak.Average({"a": 0.5, "b": 0.5}), "DoRA adapter 'a'"),
])
def test_what_cannot_be_folded_is_refused_and_the_model_kept(config, plan, message: str) -> None:
    model, inputs = build_tiny("llama")
    ak.add_adapter(model, "a", config)
    ak.add_adapter(model, "b", ak.LoraConfig(rank=2))
    perturb(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ak.MergeError, match=message):
        ak.merge_and_unload(model, plan)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert ak.list_adapters(model) == ["a", "b"]


def test_tied_embeddings_are_not_folded_into() -> None:
    model, _ = build_tiny("gpt2")  # GPT-2 ties its input and output embeddings
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2, targets=["wte"]))
    perturb(model, "a")
    with pytest.raises(ak.MergeError, match="tied embeddings"):
        ak.merge_and_unload(model)
