"""The chunked causal-LM loss equals transformers' loss and gradients, and never holds whole logits."""

from __future__ import annotations

import pytest
import torch

from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit as ak
from adapterkit.tasks import lm_loss
from adapterkit.tasks.lm_loss import chunked_lm_loss, enable_chunked_lm_loss, uses_chunked_lm_loss
from tests.core.test_conformance import CASES
from tests.tiny_models import VOCAB, build_tiny, perturb


def _labels(inputs: dict) -> torch.Tensor:
    labels = inputs["input_ids"].clone()
    labels[:, :3] = -100  # a prompt without loss
    labels[inputs["attention_mask"] == 0] = -100
    return labels


def _loss_and_grads(kind: str, method: str, chunked: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "a", CASES[method][0]())
    perturb(model, "a")
    model.train()
    labels = _labels(inputs)
    loss = chunked_lm_loss(model, inputs, labels) if chunked else model(**inputs, labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "prefix", "ia3"])
def test_chunked_loss_and_gradients_equal_transformers(kind: str, method: str, monkeypatch) -> None:
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 3 * VOCAB)  # three tokens per chunk: several chunks
    plain_loss, plain = _loss_and_grads(kind, method, chunked=False)
    loss, grads = _loss_and_grads(kind, method, chunked=True)
    # the same float32 sums in another order: a few units in the last place of a loss of ~4
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6 * max(1.0, float(grad.abs().max())))


def test_no_tensor_of_the_whole_logits_is_kept_for_backward(monkeypatch) -> None:
    vocab = 500  # wider than any activation of the tiny model, as real vocabularies are
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model, (_, inputs) = LlamaForCausalLM(config), build_tiny("llama")
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 4 * vocab)
    ak.add_adapter(model, "a", CASES["lora"][0]())
    model.train()
    tokens = inputs["input_ids"].numel()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:  # activations only, not the weights themselves
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full = model(**inputs, labels=_labels(inputs)).loss
    assert max(sizes) >= tokens * vocab  # transformers' loss keeps the whole (tokens, vocabulary) block
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked = chunked_lm_loss(model, inputs, _labels(inputs))
    assert max(sizes) < tokens * vocab
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)


def test_the_causal_lm_task_uses_it_only_where_enabled_and_the_logits_are_the_heads() -> None:
    model, _ = build_tiny("llama")
    assert not uses_chunked_lm_loss(model)
    assert enable_chunked_lm_loss(model) and uses_chunked_lm_loss(model)
    capped, _ = build_tiny("llama")
    capped.config.final_logit_softcapping = 30.0  # logits are changed after the head: keep the full loss
    assert not enable_chunked_lm_loss(capped) and not uses_chunked_lm_loss(capped)


def test_gradient_checkpointing_turns_it_on() -> None:
    from adapterkit.train.memory import enable_gradient_checkpointing

    model, _ = build_tiny("llama")
    enable_gradient_checkpointing(model)
    assert uses_chunked_lm_loss(model)
