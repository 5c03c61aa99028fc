"""Gradient checkpointing gives every adapter method the gradients it gets without it.

The trap it must avoid (PEFT issues #137 and #1142): with the reentrant
flavour of ``torch.utils.checkpoint`` and a frozen embedding, no input of a
block requires a gradient, so adapters inside the blocks get none.
"""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.train.memory import enable_gradient_checkpointing
from tests.core.test_conformance import PARAMS, CASES
from tests.tiny_models import build_tiny, perturb


def _gradients(case: str, kind: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "a", CASES[case][0]())
    perturb(model, "a")
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()  # transformers checkpoints only in training mode; the RNG is replayed for dropout
    torch.manual_seed(1)
    model(**inputs).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize(("case", "kind"), PARAMS)
def test_checkpointed_gradients_equal_plain_ones(case: str, kind: str) -> None:
    plain = _gradients(case, kind, checkpointing=False)
    checkpointed = _gradients(case, kind, checkpointing=True)
    assert plain and checkpointed.keys() == plain.keys()  # no adapter parameter lost its gradient
    assert any(bool(g.abs().sum() > 0) for g in checkpointed.values())
    for name, grad in plain.items():
        # the same operations recomputed: equal up to float32 rounding of the same magnitudes
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6 * max(1.0, float(grad.abs().max())))


def test_prefix_tuning_under_transformers_own_checkpointing_says_why_it_cannot() -> None:
    """transformers' checkpointed layers drop the KV cache that carries the prefixes: refused, with the fix."""
    model, inputs = build_tiny("gpt2")
    ak.add_adapter(model, "a", CASES["prefix"][0]())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(RuntimeError, match="--gradient-checkpointing"):
        model(**inputs)


def test_checkpointing_twice_changes_nothing() -> None:
    twice = _gradients("lora", "llama", checkpointing=True)
    model, inputs = build_tiny("llama")
    ak.add_adapter(model, "a", CASES["lora"][0]())
    perturb(model, "a")
    enable_gradient_checkpointing(model)
    enable_gradient_checkpointing(model)
    model.train()
    torch.manual_seed(1)
    model(**inputs).logits.float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        if name in twice:
            torch.testing.assert_close(param.grad, twice[name], rtol=0, atol=0)


def test_checkpointing_is_refused_where_the_architecture_has_none() -> None:
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ak.errors.UsageError, match="no transformer blocks"):
        enable_gradient_checkpointing(plain)


@pytest.mark.parametrize(("case", "kind"), [("lora", "bert"), ("prefix", "gpt2"), ("prefix", "t5"),
                                            ("prompt", "llama"), ("bottleneck", "bart")])
def test_blocks_are_really_recomputed_in_the_backward(case: str, kind: str) -> None:
    """Each checkpointed block runs twice per training step (forward, then again in the backward)."""
    from adapterkit.runtime.blocks import transformer_blocks

    counts = []
    for checkpointing in (False, True):
        model, inputs = build_tiny(kind)
        ak.add_adapter(model, "a", CASES[case][0]())
        blocks = transformer_blocks(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls = [0]
        # a module with weights of its own inside the last block (the first may hold nothing to train)
        inner = next(m for m in blocks[-1].modules()
                     if m is not blocks[-1] and next(m.parameters(recurse=False), None) is not None)
        inner.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        model.train()
        model(**inputs).logits.float().pow(2).mean().backward()
        counts.append(calls[0])
    assert counts[1] == 2 * counts[0] > 0
