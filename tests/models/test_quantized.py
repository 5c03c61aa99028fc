"""Adapters on a quantised frozen base (int8 via torchao, nf4/fp4 via bitsandbytes), on the CPU.

The conformance column: an adapter on the quantised base computes what the
same adapter computes on a float base holding the dequantised weights (the
quantised layers compute with exactly those), and the quantised base stays
within a measured distance of the original float base.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import adapterkit as ak
from adapterkit.core.base_weight import read_base_tensor
from adapterkit.models.quantize import (
    QuantizationError,
    is_quantized_module,
    model_quantization,
    quantize_model,
    requantization_report,
)
from tests.tiny_models import build_tiny, output_tensor, perturb

pytestmark = pytest.mark.filterwarnings("ignore:.*stay in float")  # the tiny layers bitsandbytes' CPU kernels miss

SCHEMES = ("int8", "nf4", "fp4")
CONFIGS = {
    "lora": lambda: ak.LoraConfig(rank=4, alpha=8),
    "dora": lambda: ak.LoraConfig(rank=4, alpha=8, use_dora=True),
    "rslora": lambda: ak.LoraConfig(rank=4, alpha=8, use_rslora=True),
    "ia3": lambda: ak.IA3Config(),
    "bottleneck": lambda: ak.BottleneckConfig(),
    "prompt": lambda: ak.PromptTuningConfig(num_virtual_tokens=3),
}
KINDS = ("bert", "llama")
# Relative Frobenius error of a quantised layer's weight, measured on these tiny models: int8 per
# channel 0.6%; 4-bit 9% on well-sized layers and up to 19% on the tiny ones (models/quantize.py keeps
# a layer in float past 20%). Bounds with margin:
WEIGHT_BOUND = {"int8": 0.01, "nf4": 0.2, "fp4": 0.2}


def _dequantized_twin(quantized: nn.Module) -> nn.Module:
    """A float copy of ``quantized`` whose linear layers hold the dequantised weights."""
    model, _ = build_tiny(quantized.config.model_type if quantized.config.model_type != "bert" else "bert")
    for path, module in quantized.named_modules():
        if is_quantized_module(module):
            target = model.get_submodule(path)
            with torch.no_grad():
                target.weight.copy_(read_base_tensor(module))
    return model


def _kind_of(model: nn.Module) -> str:
    return "bert" if model.config.model_type == "bert" else "llama"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", KINDS)
def test_only_the_base_linears_are_quantised_within_a_measured_error(scheme: str, kind: str) -> None:
    model, inputs = build_tiny(kind)
    original = copy.deepcopy(model)
    info = quantize_model(model, scheme)
    assert model_quantization(model) == info and info.scheme == scheme and info.layers > 0
    quantized = [p for p, m in model.named_modules() if is_quantized_module(m)]
    assert len(quantized) == info.layers
    heads = ("classifier", "lm_head")
    assert not any(p.startswith(heads) for p in quantized)  # the head stays in float
    for path in quantized:
        weight = original.get_submodule(path).weight
        error = (read_base_tensor(model.get_submodule(path)) - weight).norm() / weight.norm()
        assert float(error) <= WEIGHT_BOUND[scheme], (path, float(error))
    assert torch.isfinite(output_tensor(model, inputs)).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_adapter_on_quantised_base_equals_adapter_on_dequantised_base(method: str, kind: str, scheme: str) -> None:
    model, inputs = build_tiny(kind)
    quantize_model(model, scheme)
    twin = _dequantized_twin(model)
    for target in (model, twin):
        ak.add_adapter(target, "a", CONFIGS[method]())
    perturb(model, "a")
    with torch.no_grad():
        for name, param in ak.adapter_parameters(twin, "a").items():
            param.copy_(ak.adapter_parameters(model, "a")[name])
    got, want = output_tensor(model, inputs), output_tensor(twin, inputs)
    # the same weights, computed by another kernel: float32 rounding of the magnitudes involved
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bottleneck"])
def test_training_reaches_the_adapter_and_leaves_the_quantised_base_alone(method: str, scheme: str) -> None:
    model, inputs = build_tiny("llama")
    quantize_model(model, scheme)
    ak.add_adapter(model, "a", CONFIGS[method]())
    stored = {p: read_base_tensor(m).clone() for p, m in model.named_modules() if is_quantized_module(m)}
    params = list(ak.adapter_parameters(model, "a").values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    changed = [p for p in params if p.requires_grad]
    assert changed and all(torch.isfinite(p).all() for p in changed)
    for path, before in stored.items():
        assert torch.equal(read_base_tensor(model.get_submodule(path)), before)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merging_into_a_quantised_base_requantises_and_reports_the_error(scheme: str) -> None:
    model, inputs = build_tiny("llama")
    quantize_model(model, scheme)
    ak.add_adapter(model, "a", CONFIGS["lora"]())
    perturb(model, "a", scale=0.05)
    before = output_tensor(model, inputs)
    merged = ak.merge_and_unload(model)
    report = requantization_report(merged)
    assert report is not None and report["layers"] > 0
    # measured on these tiny 32-wide layers: int8 0.6% / 0.4%, 4-bit up to 21% / 56% (rows shorter
    # than bitsandbytes' 64-value blocks); bounds with margin
    mean_bound, max_bound = {"int8": (0.01, 0.01), "nf4": (0.25, 0.65), "fp4": (0.25, 0.65)}[scheme]
    assert 0 <= report["mean_relative_error"] <= mean_bound  # Frobenius, per layer
    assert 0 < report["max_relative_error"] <= max_bound  # elementwise, over the layer's largest weight
    assert any(is_quantized_module(m) for m in merged.modules())  # still stored quantised
    after = output_tensor(merged, inputs)
    # the merged model differs from the unmerged one by the requantisation error only
    relative = float((after - before).abs().max() / before.abs().max())
    assert relative < 2 * max_bound
    assert requantization_report(merged) is None  # reported once


def test_the_adapter_file_records_the_quantisation_and_loads_on_a_float_base(tmp_path) -> None:
    import json

    model, inputs = build_tiny("bert")
    quantize_model(model, "nf4")
    ak.add_adapter(model, "a", CONFIGS["lora"]())
    perturb(model, "a")
    ak.save_adapter(model, "a", tmp_path / "a")
    kit = json.loads((tmp_path / "a" / "adapterkit.json").read_text())
    assert kit["quantization"]["scheme"] == "nf4" and kit["quantization"]["backend"].startswith("bitsandbytes")
    float_base, _ = build_tiny("bert")
    with pytest.warns(UserWarning, match="trained on a base stored in nf4 and is loaded onto one stored in float"):
        ak.load_adapter(float_base, tmp_path / "a")
    assert torch.isfinite(output_tensor(float_base, inputs)).all()


def test_bad_requests_say_what_is_expected() -> None:
    model, _ = build_tiny("bert")
    with pytest.raises(QuantizationError, match="int8"):
        quantize_model(model, "int4")
    ak.add_adapter(model, "a", CONFIGS["lora"]())
    with pytest.raises(QuantizationError, match="before adding adapters"):
        quantize_model(model, "int8")
    gpt2, _ = build_tiny("gpt2")
    with pytest.raises(QuantizationError, match="Conv1D"):
        quantize_model(gpt2, "nf4")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_trainable_summary_counts_values_and_the_bytes_the_base_is_stored_in(scheme: str) -> None:
    float_model, _ = build_tiny("bert")
    model, _ = build_tiny("bert")
    quantize_model(model, scheme)
    for target in (float_model, model):
        ak.add_adapter(target, "a", CONFIGS["lora"]())
    plain, quantized = ak.trainable_summary(float_model), ak.trainable_summary(model)
    assert quantized["total"] == plain["total"] and quantized["trainable"] == plain["trainable"]
    assert quantized["trainable_bytes"] == plain["trainable_bytes"]
    layers = [m for m in model.modules() if is_quantized_module(m)]
    saved = sum(m.in_features * m.out_features for m in layers) * 4  # float32 bytes of those weights
    # int8 keeps 1 byte per value (+ a scale per row); 4-bit half a byte (+ a scale per 64 values)
    per_value = {"int8": 1.0, "nf4": 0.5, "fp4": 0.5}[scheme]
    scales = sum(m.out_features for m in layers) * 4 if scheme == "int8" else 0  # float32 scale per row
    expected = plain["base_bytes"] - saved + saved / 4 * per_value + scales
    assert quantized["base_bytes"] == pytest.approx(expected, rel=0.05)
    assert quantized["base_bytes"] < plain["base_bytes"]
