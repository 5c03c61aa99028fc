"""The frozen base's float32 linear layers through oneDNN (runtime/cpu_matmul.py).

The products against a float64 reference (forward and the input's gradient)
within float32's rounding bound, every case that must keep PyTorch's own path,
the context's patching and restoring, the choice's resolution (the vendor rule,
the environment variable, bad values), and the training loop: a run through
oneDNN ends where a run through PyTorch's kernels does, up to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adapterkit.runtime.cpu_matmul as cm
from adapterkit.data import load_data
from adapterkit.runtime.cpu_matmul import (CpuMatmulError, frozen_linear, resolve_cpu_matmul,
                                           use_onednn_linear)
from adapterkit.train import TrainConfig, TrainConfigError, train
from adapterkit.train.fingerprint import RESUMABLE_CHANGES
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment
from tests.tolerances import assert_close_scaled

pytestmark = pytest.mark.skipif(not cm.onednn_available(), reason="this PyTorch build has no oneDNN")


@pytest.fixture
def products(monkeypatch):
    """The shapes of the inputs that went through oneDNN, in call order."""
    calls = []
    real = cm._product
    monkeypatch.setattr(cm, "_product", lambda x, w, b: calls.append(tuple(x.shape)) or real(x, w, b))
    return calls


def _frozen(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    layer.requires_grad_(False)
    return layer


@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (2, 3, 4, 48)])
def test_forward_and_input_gradient_match_float64_within_float32_rounding(shape, products):
    layer = _frozen(96, 48)
    torch.manual_seed(1)
    x = torch.randn(*shape, requires_grad=True)
    y = frozen_linear(x, layer.weight, layer.bias)
    assert y.shape == (*shape[:-1], 96) and y.dtype == torch.float32
    x64, w64, b64 = x.detach().double(), layer.weight.double(), layer.bias.double()
    # Higham's bound for a dot product of in_features terms, scaled by the sum of |terms|
    assert_close_scaled(y, F.linear(x64, w64, b64), ops=48 + 1, scale=float((x64.abs() @ w64.abs().T).max()) + 1)
    grad = torch.randn(y.shape, dtype=torch.float64)
    y.backward(grad.float())
    assert_close_scaled(x.grad, grad @ w64, ops=96, scale=float((grad.abs() @ w64.abs()).max()))
    assert layer.weight.grad is None and layer.bias.grad is None
    assert len(products) == 2  # the forward and the input's gradient, both oneDNN's


def test_the_output_may_be_added_to_in_place_as_adapters_do():
    layer = _frozen(16, 8)
    x = torch.randn(2, 3, 8, requires_grad=True)
    delta = torch.randn(2, 3, 16, requires_grad=True)
    out = frozen_linear(x, layer.weight, layer.bias)
    assert out._base is None  # not a view: the add is recorded as an add, not as a write into a slice
    out.add_(delta)
    assert type(out.grad_fn).__name__ == "AddBackward0"
    out.sum().backward()
    assert torch.equal(delta.grad, torch.ones_like(delta))
    with torch.no_grad():
        assert frozen_linear(x, layer.weight, layer.bias)._base is None
    assert_close_scaled(x.grad, torch.ones(2, 3, 16) @ layer.weight, ops=16,
                        scale=float(layer.weight.abs().sum(0).max()))


def test_everything_else_keeps_pytorchs_own_path(products):
    layer = _frozen(16, 8)
    x = torch.randn(4, 8)
    trained = nn.Linear(8, 16)
    assert torch.equal(frozen_linear(x, trained.weight, trained.bias), F.linear(x, trained.weight, trained.bias))
    with_trained_bias = _frozen(16, 8)
    with_trained_bias.bias.requires_grad_(True)
    frozen_linear(x, with_trained_bias.weight, with_trained_bias.bias).sum().backward()
    assert with_trained_bias.bias.grad is not None
    double = layer.double()
    assert torch.equal(frozen_linear(x.double(), double.weight, double.bias),
                       F.linear(x.double(), double.weight, double.bias))
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen_linear(x, layer.weight, layer.bias).dtype == torch.bfloat16  # autocast's own bf16 product
    assert frozen_linear(torch.zeros(0, 8), layer.weight, layer.bias).shape == (0, 16)
    assert products == []
    frozen_linear(x, layer.weight, layer.bias)
    assert products == [(4, 8)]


def test_the_context_patches_frozen_linears_and_restores_them(products):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 2).double())
    net[0].requires_grad_(False)
    net[2].requires_grad_(False)
    x = torch.randn(3, 8)
    with use_onednn_linear(net) as count:
        assert count == 2  # the float64 layer stays; a trainable one would be patched but fall back
        with use_onednn_linear(net) as inner:
            assert inner == 0  # an enclosing call owns them
        net[2](net[1](net[0](x)))
    assert len(products) == 2
    assert all("forward" not in m.__dict__ for m in net.modules())
    with use_onednn_linear(net, enabled=False) as none:
        assert none == 0
    with pytest.raises(RuntimeError, match="boom"):
        with use_onednn_linear(net):
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in net.modules())


def test_the_context_bounds_onednns_primitive_cache_unless_the_user_did(monkeypatch):
    net = nn.Linear(4, 4).requires_grad_(False)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    with use_onednn_linear(net, enabled=False):
        assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in cm.os.environ
    with use_onednn_linear(net):
        assert cm.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(cm.PRIMITIVE_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "100")
    with use_onednn_linear(net):
        assert cm.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "100"


def test_the_choice_resolves_by_vendor_and_environment(monkeypatch):
    monkeypatch.delenv(cm.ENV_VAR, raising=False)
    monkeypatch.setattr(cm, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolve_cpu_matmul("auto") is True and resolve_cpu_matmul(None) is True
    monkeypatch.setattr(cm, "cpu_vendor", lambda: "GenuineIntel")
    assert resolve_cpu_matmul("auto") is False
    assert resolve_cpu_matmul("onednn") is True and resolve_cpu_matmul("default") is False
    monkeypatch.setenv(cm.ENV_VAR, "onednn")
    assert resolve_cpu_matmul("auto") is True and resolve_cpu_matmul("default") is False
    monkeypatch.setenv(cm.ENV_VAR, "mkl")
    with pytest.raises(CpuMatmulError, match=r"ADAPTERKIT_CPU_MATMUL must be one of .*got 'mkl'"):
        resolve_cpu_matmul("auto")
    with pytest.raises(CpuMatmulError, match=r"cpu_matmul must be one of \['auto', 'onednn', 'default'\], got 'x'"):
        resolve_cpu_matmul("x")
    monkeypatch.setattr(cm, "onednn_available", lambda: False)
    with pytest.raises(CpuMatmulError, match="built with oneDNN"):
        resolve_cpu_matmul("onednn")
    with pytest.raises(TrainConfigError, match="cpu_matmul"):
        TrainConfig(cpu_matmul="mkl")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny_matmul"), dropout=0.1)


def _run(folder, **settings):
    data = load_data(toy_sentiment(64))
    model, tokenizer = tiny_lora_classifier(folder, data.labels, dropout=0.1)
    model.cpu()
    train(model, tokenizer, data, None, TrainConfig(max_steps=4, batch_size=16, lr=1e-2, num_threads=1,
                                                    progress=False, device="cpu", **settings))
    assert all("forward" not in m.__dict__ for m in model.modules())  # the run took its patches off
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_through_onednn_ends_where_pytorchs_kernels_do(folder, products):
    reference = _run(folder, cpu_matmul="default")
    assert products == []
    through = _run(folder, cpu_matmul="onednn")
    assert len(products) > 0
    for name, value in reference.items():
        # rounding-level differences in four steps' gradients (the tiny model's forward and backward reduce
        # over ~250 terms along their longest path); a wrong gradient would move weights by lr = 1e-2 a step
        assert_close_scaled(through[name], value, ops=256, scale=float(value.abs().max()), msg=name)
    assert "cpu_matmul" in RESUMABLE_CHANGES  # a resume may change it: only the rounding differs
