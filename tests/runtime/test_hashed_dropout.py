"""Dropout with hashed masks (runtime/hashed_dropout.py).

The masks' statistics against the binomial law they must follow (keep
fraction, independence of neighbours, of the two halves of one hash and of
calls with nearby seeds), the forward and backward against the mask, the
seeds' origin in PyTorch's generator (reproducible runs, gradient
checkpointing recomputing the same masks), and the training loop's use of it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import adapterkit.runtime.hashed_dropout as hd
from adapterkit.data import load_data
from adapterkit.runtime.hashed_dropout import dropout_mask, hashed_dropout, use_hashed_dropout
from adapterkit.train import TrainConfig, train
from adapterkit.train.fingerprint import differences
from adapterkit.train.memory import enable_gradient_checkpointing
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment
from tests.tolerances import assert_close_scaled

N = 2_000_001  # odd: the last element comes from half a hash
SIGMAS = 5.0  # a fair mask fails one of these bounds with probability below 1e-6 each


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std(correction=0) * b.std(correction=0)))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_each_element_is_kept_with_probability_one_minus_p(p):
    mask = dropout_mask((N,), p, (12345, -678))
    assert mask.dtype == torch.bool and mask.shape == (N,)
    target = 1 - round(p * 65536) / 65536  # p is honoured to 1/65536
    assert abs(target - (1 - p)) <= 0.5 / 65536
    bound = SIGMAS * math.sqrt(p * (1 - p) / N)
    assert abs(mask.double().mean().item() - target) <= bound


def test_neighbours_halves_and_nearby_seeds_are_independent():
    p = 0.5
    bound = SIGMAS / math.sqrt(N // 2)  # the correlation of independent fair bits has standard deviation 1/sqrt(n)
    base = dropout_mask((N,), p, (1, 2))
    # the two elements one hash decides, and neighbours at other lags
    assert abs(_correlation(base[0:-1:2], base[1::2])) <= bound
    for lag in (1, 2, 3, 16, 64):
        assert abs(_correlation(base[:-lag], base[lag:])) <= bound, lag
    # seeds one apart in either word, and the masks of two calls' shifted copies
    for seeds in ((2, 2), (1, 3), (0, 2), (1, 2 + 65536), (-1, 2)):
        other = dropout_mask((N,), p, seeds)
        assert abs(_correlation(base, other)) <= bound, seeds
        assert abs(_correlation(base[:-1], other[1:])) <= bound, seeds
    # pairs of kept elements: P(both) = P(one)^2 within the binomial bound
    both = (base[0:-1:2] & base[1::2]).double().mean().item()
    assert abs(both - 0.25) <= SIGMAS * math.sqrt(0.25 * 0.75 / (N // 2))


def test_the_same_seeds_give_the_same_mask_whatever_the_shape():
    flat = dropout_mask((42,), 0.3, (7, 9))
    assert torch.equal(dropout_mask((6, 7), 0.3, (7, 9)), flat.view(6, 7))
    assert torch.equal(dropout_mask((6, 7), 0.3, (7, 9)), dropout_mask((6, 7), 0.3, (7, 9)))
    assert not torch.equal(dropout_mask((1000,), 0.3, (7, 9)), dropout_mask((1000,), 0.3, (7, 10)))


def test_a_probability_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        dropout_mask((4,), 1.5, (0, 0))


def test_forward_and_backward_follow_one_mask():
    x = torch.randn(8, 5, 33, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    torch.manual_seed(3)
    y = hashed_dropout(x, 0.3)
    y.backward(grad)
    kept = y != 0  # x has no zeros (a standard normal sample)
    assert 0.6 < kept.double().mean() < 0.8
    torch.testing.assert_close(y, torch.where(kept, x * (1 / 0.7), 0), rtol=0, atol=0)  # as F.dropout scales
    assert_close_scaled(x.grad, torch.where(kept, grad / 0.7, 0), ops=2, scale=float(grad.abs().max() / 0.7))
    torch.manual_seed(3)
    assert torch.equal(hashed_dropout(x.detach(), 0.3), y.detach())  # the seeds come from torch's generator
    assert not torch.equal(hashed_dropout(x.detach(), 0.3), y.detach())  # and move it on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_scaled_mask_keeps_the_dtype_nans_and_the_bits_of_mask_times_scale(dtype):
    from adapterkit.runtime.hashed_dropout import _draw_seeds, dropout_mask

    x = torch.randn(4, 9, 17).to(dtype)
    x[0, 0, :] = float("nan")  # some of them dropped, some kept
    grad = torch.randn_like(x)
    torch.manual_seed(5)
    mask = dropout_mask(x.shape, 0.25, _draw_seeds())
    torch.manual_seed(5)
    y = hashed_dropout(x.requires_grad_(), 0.25)
    y.backward(grad)
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert (~mask[0, 0]).any() and mask[0, 0].any() and bool(y[0, 0].isnan().all())  # as F.dropout
    # one multiplication by scale-or-zero: the bits of converting the mask, multiplying, then scaling
    assert torch.equal(y.detach().nan_to_num(7.0), x.detach().mul(mask).mul_(1 / 0.75).nan_to_num(7.0))
    assert torch.equal(x.grad, grad.mul(mask).mul_(1 / 0.75))


def test_gradcheck_with_a_fixed_mask():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def dropped(t):
        torch.manual_seed(11)
        return hashed_dropout(t, 0.4)

    assert torch.autograd.gradcheck(dropped, (x,))


def test_identity_in_eval_and_at_zero_and_zeros_at_one():
    x = torch.randn(4, 6)
    assert hashed_dropout(x, 0.5, training=False) is x
    assert hashed_dropout(x, 0.0) is x
    assert torch.equal(hashed_dropout(x, 1.0), torch.zeros_like(x))
    half = torch.randn(64, 64, dtype=torch.bfloat16)
    assert hashed_dropout(half, 0.2).dtype == torch.bfloat16


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Dropout(0.0))
        self.other = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.inner(x))


def test_the_context_patches_every_dropout_and_restores_them(monkeypatch):
    net = _Net().train()
    calls = []
    real = hd._kept
    monkeypatch.setattr(hd, "_kept", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.randn(16, 8)
    with use_hashed_dropout(net) as count:
        assert count == 3
        with use_hashed_dropout(net) as inner:
            assert inner == 0  # the enclosing call owns them
        net(x)
        assert sorted(calls) == [0.25, 0.5]  # p = 0 draws nothing
        net.eval()
        torch.testing.assert_close(net(x), net.inner[0](x), rtol=0, atol=0)
        net.train()
    assert all("forward" not in m.__dict__ for m in net.modules())
    calls.clear()
    net(x)
    assert calls == []
    with pytest.raises(RuntimeError, match="boom"):
        with use_hashed_dropout(net):
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in net.modules())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny_dropout"), dropout=0.1)


def _grads(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_recomputes_the_same_masks(folder):
    data = load_data(toy_sentiment(8))
    model, tokenizer = tiny_lora_classifier(folder, data.labels, dropout=0.1)
    model.double().train()
    device = next(model.parameters()).device
    inputs = tokenizer([r["text"] for r in toy_sentiment(8)], padding=True, return_tensors="pt").to(device)
    labels = torch.tensor([i % 2 for i in range(8)], device=device)
    with use_hashed_dropout(model) as count:
        assert count >= 5  # embeddings, two per block, the classifier's
        loss, plain = _grads(model, inputs, labels)
        enable_gradient_checkpointing(model)
        again, checkpointed = _grads(model, inputs, labels)
    assert torch.equal(loss, again)
    for name, grad in plain.items():
        # other masks in the recomputation would change these gradients by their own size
        assert_close_scaled(checkpointed[name], grad, ops=64, scale=float(grad.abs().max()), msg=name)
    # and the masks do act: another seed gives another loss
    with use_hashed_dropout(model):
        torch.manual_seed(6)
        assert not torch.equal(model(**inputs, labels=labels).loss.detach(), loss)


def _run(folder, monkeypatch, **settings):
    calls = []
    real = hd._kept
    monkeypatch.setattr(hd, "_kept", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = load_data(toy_sentiment(64))
    model, tokenizer = tiny_lora_classifier(folder, data.labels, dropout=0.1)
    train(model, tokenizer, data, None, TrainConfig(max_steps=3, batch_size=16, lr=1e-2, num_threads=1,
                                                    progress=False, **settings))
    assert all("forward" not in m.__dict__ for m in model.modules())  # the run took its patches off
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return len(calls), weights


def test_training_draws_hashed_masks_by_default_and_reproducibly(folder, monkeypatch):
    calls, first = _run(folder, monkeypatch)
    assert calls > 0
    again, second = _run(folder, monkeypatch)
    assert again == calls
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0, msg=name)
    none, torch_masks = _run(folder, monkeypatch, hashed_dropout=False)
    assert none == 0
    assert any(not torch.equal(torch_masks[n], first[n]) for n in first)  # other masks, other steps


def test_a_run_saved_before_the_setting_existed_resumes_only_with_torch_masks():
    old = {"train": {"lr": 1e-3}}
    assert differences(old, {"train": {"lr": 1e-3, "hashed_dropout": False, "trim_last_block": False}}) == []
    lines = differences(old, {"train": {"lr": 1e-3, "hashed_dropout": True, "trim_last_block": False}})
    assert lines == ["train.hashed_dropout: False -> True"]


def _reference_attention(q, k, v, mask, keep, p, scale):
    """Softmax of the scaled scores plus ``mask`` (additive), times ``keep / (1 - p)``, times the values."""
    scores = q @ k.transpose(-2, -1) * scale + mask
    return (torch.softmax(scores, dim=-1) * keep / (1 - p)) @ v


def test_attention_dropout_draws_a_hashed_mask_and_follows_the_reference_formula(monkeypatch):
    F = torch.nn.functional
    masks = []
    real = hd._kept
    monkeypatch.setattr(hd, "_kept", lambda *a, **k: masks.append(real(*a, **k).bool()) or real(*a, **k))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    additive = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    additive[0, :, :, 3:] = float("-inf")  # the first example's last two keys are padding
    with use_hashed_dropout(nn.Identity()):
        assert F.scaled_dot_product_attention is hd.attention_with_hashed_dropout
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=0.3)
        # without dropout PyTorch's own kernel answers, unchanged
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    assert F.scaled_dot_product_attention is hd._PYTORCH_SDPA
    assert len(masks) == 1 and masks[0].shape == (2, 3, 5, 5)
    assert torch.equal(plain, hd._PYTORCH_SDPA(q, k, v, attn_mask=additive))
    expected = _reference_attention(q, k, v, additive, masks[0], 0.3, 0.5)
    assert_close_scaled(out, expected, ops=16, scale=float(v.detach().abs().max()))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        assert_close_scaled(got, want, ops=32, scale=float(want.abs().max()))
    # a boolean mask, causal attention and grouped keys follow PyTorch's meaning of each
    allowed = torch.rand(2, 1, 5, 5) > 0.3
    allowed[..., 0] = True
    for kwargs in ({"attn_mask": allowed}, {"is_causal": True}):
        torch.manual_seed(1)
        with use_hashed_dropout(nn.Identity()):
            dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, **kwargs)
        keep = masks[-1]
        additive = torch.zeros(5, 5, dtype=torch.float64)
        bool_mask = allowed if "attn_mask" in kwargs else torch.ones(5, 5, dtype=torch.bool).tril()
        additive = additive.masked_fill(~bool_mask, float("-inf"))
        assert_close_scaled(dropped, _reference_attention(q, k, v, additive, keep, 0.2, 0.5), ops=16,
                            scale=float(v.detach().abs().max()), msg=str(kwargs))
    grouped_k, grouped_v = k[:, :1], v[:, :1]
    with use_hashed_dropout(nn.Identity()):
        grouped = F.scaled_dot_product_attention(q, grouped_k, grouped_v, dropout_p=0.2, enable_gqa=True)
    expected = _reference_attention(q, grouped_k.expand_as(q), grouped_v.expand_as(q), 0.0, masks[-1], 0.2, 0.5)
    assert_close_scaled(grouped, expected, ops=16, scale=float(v.detach().abs().max()))
    # a query that may attend to nothing gets zeros, as from PyTorch's formula
    nothing = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    with use_hashed_dropout(nn.Identity()):
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=nothing, dropout_p=0.2),
                           torch.zeros_like(q))


def test_nested_contexts_and_errors_give_pytorchs_attention_back():
    F = torch.nn.functional
    with use_hashed_dropout(nn.Identity()):
        with use_hashed_dropout(nn.Identity()):
            pass
        assert F.scaled_dot_product_attention is hd.attention_with_hashed_dropout  # the outer one still holds it
    assert F.scaled_dot_product_attention is hd._PYTORCH_SDPA
    with pytest.raises(RuntimeError, match="boom"):
        with use_hashed_dropout(nn.Identity()):
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is hd._PYTORCH_SDPA


def test_a_bert_in_training_drops_its_attention_with_hashed_masks(folder, monkeypatch):
    shapes = []
    real = hd._kept
    monkeypatch.setattr(hd, "_kept", lambda *a, **k: shapes.append(tuple(a[0])) or real(*a, **k))
    data = load_data(toy_sentiment(4))
    model, tokenizer = tiny_lora_classifier(folder, data.labels, dropout=0.1)
    model.cpu().train()
    inputs = tokenizer([r["text"] for r in toy_sentiment(4)], padding=True, return_tensors="pt")
    with use_hashed_dropout(model):
        model(**inputs)
    batch, length = inputs["input_ids"].shape
    heads = model.config.num_attention_heads
    assert shapes.count((batch, heads, length, length)) == model.config.num_hidden_layers


@pytest.mark.parametrize("length", [14, hd.SHORT_ROWS, hd.SHORT_ROWS + 1])
def test_the_attention_softmax_is_pytorchs_to_rounding_with_zeros_for_rows_of_minus_infinity(length):
    torch.manual_seed(2)
    scores = (torch.randn(3, 2, 6, length) * 4).requires_grad_()
    masked = scores.detach().clone()
    masked[0, 1, 2] = float("-inf")  # a query that may attend to nothing
    masked[1, 0, :, : length // 2] = float("-inf")  # padding keys
    masked.requires_grad_()
    grad = torch.randn(3, 2, 6, length)
    probs = hd.safe_softmax(masked)
    probs.backward(grad)
    wide = masked.detach().double().requires_grad_()
    reference = torch.ops.aten._safe_softmax(wide, -1)
    reference.backward(grad.double())
    assert torch.equal(probs[0, 1, 2], torch.zeros(length))
    assert_close_scaled(probs, reference, ops=2 * length, scale=1.0)
    assert_close_scaled(masked.grad, wide.grad, ops=4 * length, scale=float(grad.abs().max()))
    if length > hd.SHORT_ROWS:  # long rows: PyTorch's own kernel, to the bit
        assert torch.equal(probs, torch.ops.aten._safe_softmax(masked.detach(), -1))
    x = torch.randn(2, 5, min(length, 9), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hd._ShortRowSoftmax.apply, (x,))
