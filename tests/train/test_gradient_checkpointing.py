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


# Prefix tuning hands its prefixes to the model as a KV cache, which transformers' checkpointed
# blocks drop (and a cache would grow again when a block is recomputed): refused, with a message.
CHECKPOINTABLE = [(case, kind) for case, kind in PARAMS if not case.startswith("prefix")]


@pytest.mark.parametrize(("case", "kind"), CHECKPOINTABLE)
def test_checkpointed_gradients_equal_plain_ones(case: str, kind: str) -> None:
    plain = _gradients(case, kind, checkpointing=False)
    checkpointed = _gradients(case, kind, checkpointing=True)
    assert plain and checkpointed.keys() == plain.keys()  # no adapter parameter lost its gradient
    assert any(bool(g.abs().sum() > 0) for g in checkpointed.values())
    for name, grad in plain.items():
        # the same operations recomputed: equal up to float32 rounding of the same magnitudes
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6 * max(1.0, float(grad.abs().max())))


def test_prefix_tuning_under_checkpointing_says_why_it_cannot() -> None:
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        _gradients("prefix", "gpt2", checkpointing=True)


def test_checkpointing_is_refused_where_the_architecture_has_none() -> None:
    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ak.errors.UsageError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(Plain())
