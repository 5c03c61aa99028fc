"""IA3's output scaling in place: autograd's numbers, one activation fewer kept for backward."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
import adapterkit.methods.ia3 as ia3_module
from adapterkit.methods._inplace_scale import scale_output
from tests.tiny_models import build_tiny
from tests.tolerances import assert_close_scaled, forward_ops


def saved_bytes(fn: Callable[[], object], at_least: int = 0) -> int:
    """Bytes of the distinct storages (of ``at_least`` bytes or more) autograd keeps while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().nbytes() >= at_least:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("zero", [False, True])
def test_gradients_equal_plain_autograd(zero: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, generator=gen, requires_grad=True)
    weight = torch.randn(4, 6, generator=gen)
    scale = 1 + 0.5 * torch.randn(4, generator=gen)
    if zero:  # an exact zero cannot be divided out: the ordinary path must be taken
        scale[1] = 0.0
    scale.requires_grad_()
    grad = torch.randn(3, 5, 4, generator=gen)
    ours = scale_output(F.linear(x, weight), scale, in_place=True)
    got = torch.autograd.grad(ours, (x, scale), grad)
    ref = F.linear(x, weight) * scale
    want = torch.autograd.grad(ref, (x, scale), grad)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # the same one multiplication
    # The scale's gradient is recovered as sum(grad * y) / scale over the 3 * 5 positions, with
    # y = (x W^T) * scale rounded: a sum of 15 terms of x W^T (6 terms each), two roundings more.
    # Tolerances from float32's epsilon and the magnitude of the summed terms.
    with torch.no_grad():
        x_terms = ((grad * scale).abs() @ weight.abs()).max()  # dL/dx = (grad * scale) W
        scale_terms = (grad.abs() * (x.abs() @ weight.abs().T)).sum(dim=(0, 1)).max()
    ops = 3 * 5 + 6 + 2
    for g, w, terms in zip(got, want, (x_terms, scale_terms)):
        assert_close_scaled(g, w, ops=ops, scale=float(terms))
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_ia3_gradients_unchanged_and_less_kept_for_backward(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "a", ak.IA3Config())
    with torch.no_grad():
        for p in ak.adapter_parameters(model, "a").values():
            p.add_(0.1 * torch.randn(p.shape))
    for module in model.modules():  # dropout off so both passes see the same numbers
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    params = ak.adapter_parameters(model, "a")
    batch, tokens = inputs["input_ids"].shape  # activation-sized storages only: adapter vectors are saved in one path and not the other

    def run() -> tuple[dict[str, torch.Tensor], int]:
        model.zero_grad()
        output_of = lambda: model(**inputs).logits  # noqa: E731
        output_of().square().mean().backward()
        return {k: p.grad.clone() for k, p in params.items()}, saved_bytes(output_of, batch * tokens * model.config.hidden_size * 4)

    fast, fast_bytes = run()
    monkeypatch.setattr(ia3_module, "scale_output",
                        lambda out, scale, in_place: (out.to(scale.dtype) * scale).to(out.dtype))
    plain, plain_bytes = run()
    # The backward pass is as deep as the forward one; the vectors' gradients then sum over
    # every (batch, token) position.
    ops = 2 * forward_ops(model) + batch * tokens
    for key in fast:
        assert_close_scaled(fast[key], plain[key], ops=ops, msg=f"{key}: ")
    # key and value outputs of every layer: one (batch, tokens, kv width) tensor fewer each
    layers = [m for m in model.modules() if type(m).__name__ == "IA3Layer" and not any(m.is_feedforward.values())]
    expected = sum(batch * tokens * m.out_features * 4 for m in layers)
    assert plain_bytes - fast_bytes == expected
