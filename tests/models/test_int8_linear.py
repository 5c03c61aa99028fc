"""The int8 base's linear layer (models/int8_linear.py) against a float64 reference and torchao's own product.

It must compute ``x @ (q * s)^T + b`` and its gradients (input and bias) as
the dequantised float layer does, keep no float copy of the weight for the
backward, and let adapters add to its output in place.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import adapterkit as ak
import adapterkit.runtime.cpu_matmul as cpu_matmul
from adapterkit.core.base_weight import read_base_tensor
from adapterkit.core.targeting import has_fresh_output
from adapterkit.models.int8_linear import Int8WeightOnlyLinear
from adapterkit.models.quantize import is_quantized_module, quantize_model
from tests.tiny_models import build_tiny

IN, OUT = 96, 40


def _torchao_linear(bias: bool) -> nn.Linear:
    """A float layer quantised in place by torchao (its own product, not ours)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(IN, OUT, bias=bias))
    quantize_(holder, Int8WeightOnlyConfig())
    return holder[0]


def _float64_reference(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output and gradients of the dequantised layer, in float64."""
    weight = layer.weight.dequantize().to(torch.float64)
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    bias = None if layer.bias is None else layer.bias.detach().to(torch.float64).requires_grad_(True)
    out = torch.nn.functional.linear(x64, weight, bias)
    out.backward(grad_out.to(torch.float64))
    return out, x64.grad, None if bias is None else bias.grad


def _tolerance(x: torch.Tensor, weight: torch.Tensor, fan_in: int) -> float:
    """float32 rounding of a sum of ``fan_in`` products of these magnitudes (a generous bound)."""
    return 4 * fan_in * torch.finfo(torch.float32).eps * float(x.abs().max()) * float(weight.abs().max())


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_output_and_gradients_match_the_dequantised_layer(bias: bool, onednn: bool, monkeypatch) -> None:
    """Also with the products through oneDNN, as the training loop does on AMD CPUs (runtime/cpu_matmul.py)."""
    if onednn and not cpu_matmul.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    calls = []
    real = cpu_matmul._product
    monkeypatch.setattr(cpu_matmul, "_product", lambda *a: calls.append(1) or real(*a))
    torchao_layer = _torchao_linear(bias)
    ours = Int8WeightOnlyLinear.from_linear(_torchao_linear(bias))
    if bias:
        ours.bias.requires_grad_(True)  # BitFit trains the bias of a quantised layer
    x = torch.randn(3, 7, IN, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(3, 7, OUT, generator=torch.Generator().manual_seed(2))
    want_out, want_dx, want_db = _float64_reference(ours, x, grad_out)
    dequantized = ours.weight.dequantize()
    for layer in (ours, torchao_layer):
        xi = x.clone().requires_grad_(True)
        with cpu_matmul.use_onednn_linear(layer, onednn and layer is ours):
            out = layer(xi)
            assert out._base is None or layer is torchao_layer  # ours is no view of the rows' product
            out.add_(0.0)  # adapters add to this output in place
        out.backward(grad_out)
        assert len(calls) == (2 if onednn else 0)  # forward and input gradient, ours only
        assert out.dtype == torch.float32 and out.shape == (3, 7, OUT)
        torch.testing.assert_close(out.double(), want_out, rtol=0, atol=_tolerance(x, dequantized, IN))
        torch.testing.assert_close(xi.grad.double(), want_dx, rtol=0, atol=_tolerance(grad_out, dequantized, OUT))
    if bias:
        torch.testing.assert_close(ours.bias.grad.double(), want_db, rtol=0,
                                   atol=4 * 21 * torch.finfo(torch.float32).eps * float(grad_out.abs().max()))
    assert ours.weight.grad is None


def test_the_backward_keeps_the_int8_weight_and_no_float_copy() -> None:
    """What autograd saves between forward and backward: torchao's product keeps a float32 weight."""
    def saved_bytes(layer: nn.Module) -> int:
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        x = torch.randn(4, IN, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        return total

    weights = IN * OUT
    torchao_bytes = saved_bytes(_torchao_linear(False))
    ours_bytes = saved_bytes(Int8WeightOnlyLinear.from_linear(_torchao_linear(False)))
    assert torchao_bytes >= 4 * weights  # the float32 copy torchao's product leaves to autograd
    assert ours_bytes == weights + 4 * OUT  # the int8 weight and its float32 scales, already stored


def test_quantize_model_builds_int8_layers_that_adapters_update_in_place() -> None:
    model, inputs = build_tiny("llama")
    quantize_model(model, "int8")
    layers = [m for m in model.modules() if is_quantized_module(m)]
    assert layers and all(type(m) is Int8WeightOnlyLinear for m in layers)
    assert all(has_fresh_output(m) for m in layers)
    ak.add_adapter(model, "a", ak.LoraConfig(rank=4, alpha=8))
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()  # LoRA adds to the product in place
    grads = [p.grad for p in ak.adapter_parameters(model, "a").values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_lora_gradients_on_int8_equal_those_on_the_dequantised_float_base() -> None:
    from tests.models.test_quantized import _dequantized_twin
    from tests.tiny_models import perturb

    model, inputs = build_tiny("llama")
    quantize_model(model, "int8")
    twin = _dequantized_twin(model)
    for target in (model, twin):
        ak.add_adapter(target, "a", ak.LoraConfig(rank=4, alpha=8, dropout=0.0))
    perturb(model, "a")
    with torch.no_grad():
        for name, param in ak.adapter_parameters(twin, "a").items():
            param.copy_(ak.adapter_parameters(model, "a")[name])
    for target in (model, twin):
        target(**inputs, labels=inputs["input_ids"]).loss.backward()
    ours, theirs = ak.adapter_parameters(model, "a"), ak.adapter_parameters(twin, "a")
    for name, param in ours.items():
        want = theirs[name].grad
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-5 * max(float(want.abs().max()), 1e-3))


def test_bf16_autocast_computes_in_bf16_and_reaches_the_input() -> None:
    layer = Int8WeightOnlyLinear.from_linear(_torchao_linear(True))
    x = torch.randn(5, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    want = read_base_tensor(layer).sum(0)  # d(sum of outputs)/dx = the column sums of the weight
    torch.testing.assert_close(x.grad[0], want, rtol=0, atol=0.02 * float(want.abs().max()) + 1e-3)


def test_a_layer_that_is_not_per_row_int8_is_refused_with_what_was_found() -> None:
    with pytest.raises(ValueError, match="per row; found a weight of type Parameter"):
        Int8WeightOnlyLinear.from_linear(nn.Linear(IN, OUT))


def test_the_compiled_layer_computes_what_the_eager_one_does() -> None:
    """torch.compile (train --compile) traces the autograd function and the int8 tensor's fields."""
    layer = Int8WeightOnlyLinear.from_linear(_torchao_linear(True))
    compiled = torch.compile(layer, dynamic=False)
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(3), requires_grad=True)
    got = compiled(x)
    got.sum().backward()
    got_grad, x.grad = x.grad, None
    want = layer(x)
    want.sum().backward()
    scale = _tolerance(x, layer.weight.dequantize(), IN)
    torch.testing.assert_close(got, want, rtol=0, atol=scale)
    torch.testing.assert_close(got_grad, x.grad, rtol=0, atol=_tolerance(torch.ones(1), layer.weight.dequantize(), OUT))


@pytest.mark.parametrize("bias", [False, True])
def test_one_row_without_gradients_takes_the_int8_kernel_and_computes_the_same(bias: bool, monkeypatch) -> None:
    """Decoding one token: ATen's int8 weight kernel, within float32 rounding of the dequantised layer."""
    layer = Int8WeightOnlyLinear.from_linear(_torchao_linear(bias))
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *args: calls.append(1) or kernel(*args))
    x = torch.randn(1, 1, IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = layer(x)
    assert calls == [1] and got.shape == (1, 1, OUT)
    want, _, _ = _float64_reference(layer, x, torch.zeros(1, 1, OUT))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=_tolerance(x, layer.weight.dequantize(), IN))
    with torch.no_grad():
        layer(torch.randn(2, IN))  # two rows: the general product
    layer(x.clone().requires_grad_(True)).sum().backward()  # a gradient to take: the general product
    assert calls == [1]
