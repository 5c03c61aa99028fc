"""Gated SiLU MLPs keeping two activations for the backward, not three (runtime/gated_mlp.py).

The fused product's gradients against float64 finite differences; a tiny
Llama's loss and every gradient bit for bit those of transformers' own MLP,
with and without gradient checkpointing; two inner-width tensors kept per MLP
instead of three; the modules it must leave alone; restoring on exit and on
error; and the training loop holding it, backward included.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit as ak
import adapterkit.runtime.gated_mlp as gm
from adapterkit.data import load_data
from adapterkit.runtime.gated_mlp import SiluTimesUp, is_gated_silu_mlp, silu_times_up, use_fused_gated_mlp
from adapterkit.train import TrainConfig, train
from adapterkit.train.memory import enable_gradient_checkpointing
from tests.tiny_models import perturb
from tests.tiny_lm import tiny_llama, tiny_tokenizer, toy_instructions

INNER = 48


def _llama(act: str = "silu", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=INNER, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, hidden_act=act, pad_token_id=0)
    return LlamaForCausalLM(config)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _loss_and_grads(fused: bool, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = _llama()
    ak.add_adapter(model, "a", ak.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj",
                                                                        "up_proj", "down_proj"]))
    perturb(model, "a")  # LoRA's B starts at zero: give the adapters' branch something to carry
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    with use_fused_gated_mlp(model) if fused else contextlib.nullcontext():
        loss = model(**_batch()).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_fused_product_has_the_gradients_of_silu_times_up() -> None:
    gate = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluTimesUp.apply, (gate, up))
    only_gate = torch.randn(4, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(SiluTimesUp.apply, (gate, only_gate))
    assert torch.autograd.gradcheck(lambda u: SiluTimesUp.apply(only_gate, u), (up,))
    assert torch.equal(SiluTimesUp.apply(gate, up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_llama_trains_bit_for_bit_as_with_its_own_mlp(checkpointing: bool) -> None:
    loss, grads = _loss_and_grads(fused=False, checkpointing=checkpointing)
    fused_loss, fused_grads = _loss_and_grads(fused=True, checkpointing=checkpointing)
    assert torch.equal(fused_loss, loss)
    assert fused_grads.keys() == grads.keys() and any("gate_proj" in n for n in grads)
    for name, grad in grads.items():
        assert torch.equal(fused_grads[name], grad), name


def test_two_inner_width_activations_are_kept_per_mlp_not_three() -> None:
    model = _llama()
    ak.add_adapter(model, "a", ak.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    model.train()
    inputs = _batch()
    tokens = inputs["input_ids"].numel()

    def kept(fused: bool) -> int:
        storages: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.numel() == tokens * INNER:
                storages.add(t.untyped_storage().data_ptr())
            return t

        with use_fused_gated_mlp(model) if fused else contextlib.nullcontext(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
        return len(storages)

    layers = model.config.num_hidden_layers
    assert kept(fused=False) == 3 * layers
    assert kept(fused=True) == 2 * layers


class _OtherMLP(nn.Module):
    """Same parts as a Llama MLP, another computation: must not be taken for one."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_only_gated_silu_mlps_are_taken() -> None:
    assert sum(is_gated_silu_mlp(m) for m in _llama().modules()) == 2
    assert not any(is_gated_silu_mlp(m) for m in _llama(act="gelu").modules())
    assert not is_gated_silu_mlp(_OtherMLP())
    mlp = _llama().model.layers[0].mlp
    mlp.act_fn = nn.SiLU(inplace=True)
    assert not is_gated_silu_mlp(mlp)
    mlp.act_fn = nn.SiLU()
    assert is_gated_silu_mlp(mlp)
    mlp.act_fn.register_forward_hook(lambda module, args, out: out * 2)
    assert not is_gated_silu_mlp(mlp)


def test_the_context_patches_nests_and_restores_on_error() -> None:
    model = _llama()
    with use_fused_gated_mlp(model) as outer:
        assert outer == 2
        assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
        with use_fused_gated_mlp(model) as inner:
            assert inner == 0  # the outer context owns them
        assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with use_fused_gated_mlp(model):
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_without_a_gradient_it_is_the_plain_expression(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(SiluTimesUp, "apply", lambda *a: calls.append(1) or torch.ones(1))
    gate, up = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(silu_times_up(gate, up), torch.nn.functional.silu(gate) * up)
    with torch.no_grad():
        assert torch.equal(silu_times_up(gate.requires_grad_(), up), torch.nn.functional.silu(gate) * up)
    assert calls == []


def test_the_training_loop_holds_it_through_the_backward(monkeypatch) -> None:
    backward_calls = []
    original = SiluTimesUp.backward

    def counted(ctx, grad):
        backward_calls.append(1)
        return original(ctx, grad)

    monkeypatch.setattr(gm.SiluTimesUp, "backward", staticmethod(counted))
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    ak.add_adapter(model, "it", ak.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    data = load_data(toy_instructions(16, seed=1), task="causal-lm")
    layers = model.config.num_hidden_layers
    train(model, tokenizer, data, None, TrainConfig(max_steps=2, batch_size=8, max_length=64, progress=False,
                                                    num_threads=1, gradient_checkpointing=True))
    assert len(backward_calls) == 2 * layers
    # the run took its patches off: an MLP with a forward of its own instance would not be taken again
    assert all(is_gated_silu_mlp(layer.mlp) for layer in model.model.layers)
