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


def _loss_and_grads(kind: str, method: str, chunked: bool, hooked_head: bool = False
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "a", CASES[method][0]())
    perturb(model, "a")
    model.train()
    if hooked_head:  # a head with a hook is not a plain linear: the checkpointed chunks compute its loss
        model.get_output_embeddings().register_forward_hook(lambda module, args, out: out)
    labels = _labels(inputs)
    loss = chunked_lm_loss(model, inputs, labels) if chunked else model(**inputs, labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "prefix", "ia3"])
@pytest.mark.parametrize("path", ["fused", "checkpointed"])
def test_chunked_loss_and_gradients_equal_transformers(kind: str, method: str, path: str, monkeypatch) -> None:
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 3 * VOCAB)  # three tokens per chunk: several chunks
    fused_calls: list[int] = []
    real_forward = lm_loss._HeadCrossEntropy.forward
    monkeypatch.setattr(lm_loss._HeadCrossEntropy, "forward",
                        staticmethod(lambda *args: fused_calls.append(1) or real_forward(*args)))
    plain_loss, plain = _loss_and_grads(kind, method, chunked=False)
    loss, grads = _loss_and_grads(kind, method, chunked=True, hooked_head=path == "checkpointed")
    assert len(fused_calls) == (path == "fused")
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


def test_one_chunk_of_logits_is_alive_at_a_time() -> None:
    """The next chunk's logits are made after the last chunk's are freed, not beside them."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    vocab, step = 500, 4
    torch.manual_seed(0)
    hidden, weight = torch.randn(22, 32, requires_grad=True), torch.randn(vocab, 32)
    targets = torch.randint(0, vocab, (22,))
    chunk_bytes = step * vocab * 4
    made: list[weakref.ref] = []
    most = [0]

    class CountChunks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= chunk_bytes
                        and t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()):
                    made.append(weakref.ref(t))
            alive = {t.untyped_storage().data_ptr() for t in (r() for r in made) if t is not None}
            most[0] = max(most[0], len(alive))
            return out

    with CountChunks():
        total = lm_loss._HeadCrossEntropy.apply(hidden, weight, None, targets, step)
    assert most[0] == 1  # six chunks, never two at once
    total.backward()
    reference = torch.nn.functional.cross_entropy(hidden.detach() @ weight.t(), targets, reduction="sum")
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)


def test_it_is_the_default_for_a_plain_head_and_is_enabled_for_others_where_the_logits_are_the_heads() -> None:
    model, _ = build_tiny("llama")
    assert uses_chunked_lm_loss(model)  # a plain nn.Linear head: the fused path, by default
    hooked, _ = build_tiny("llama")
    hooked.get_output_embeddings().register_forward_hook(lambda module, args, out: out)
    assert not uses_chunked_lm_loss(hooked)  # checkpointed chunks cost a third product: only when asked
    assert enable_chunked_lm_loss(hooked) and uses_chunked_lm_loss(hooked)
    capped, _ = build_tiny("llama")
    capped.config.final_logit_softcapping = 30.0  # logits are changed after the head: keep the full loss
    assert not uses_chunked_lm_loss(capped)
    assert not enable_chunked_lm_loss(capped) and not uses_chunked_lm_loss(capped)


def test_gradient_checkpointing_turns_it_on() -> None:
    from adapterkit.train.memory import enable_gradient_checkpointing

    model, _ = build_tiny("llama")
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out)
    enable_gradient_checkpointing(model)
    assert uses_chunked_lm_loss(model)


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_fused_head_loss_gives_every_gradient_a_trainable_head_needs(with_bias: bool) -> None:
    """Against autograd through ``cross_entropy(linear(...))`` in float64: hidden, weight and bias gradients."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 13, (10,), generator=gen)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets,
                                                  reduction="sum")
    expected = torch.autograd.grad(reference * 0.5, inputs)
    fused = lm_loss._HeadCrossEntropy.apply(hidden, weight, bias, targets, 4)  # chunks of 4, 4 and 2 rows
    got = torch.autograd.grad(fused * 0.5, inputs)  # the incoming gradient (0.5) scales what was kept
    # float64 sums of ~10 terms of size ~10 in another order: far below 1e-12 relative
    assert fused.item() == pytest.approx(reference.item(), rel=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_a_trainable_untied_head_trains_as_with_transformers_loss(monkeypatch) -> None:
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 3 * VOCAB)
    results = []
    for chunked in (False, True):
        model, inputs = build_tiny("llama")
        model.train()  # full fine-tuning: every weight, the head too, takes a gradient
        loss = chunked_lm_loss(model, inputs, _labels(inputs)) if chunked else model(
            **inputs, labels=_labels(inputs)).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain), (loss, grads) = results
    assert "lm_head.weight" in grads and grads.keys() == plain.keys()
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6 * max(1.0, float(grad.abs().max())))


def test_under_bf16_autocast_it_matches_the_full_loss_within_bf16_rounding(monkeypatch) -> None:
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 3 * VOCAB)
    results = []
    for chunked in (False, True):
        model, inputs = build_tiny("llama")
        ak.add_adapter(model, "a", CASES["lora"][0]())
        perturb(model, "a")
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_lm_loss(model, inputs, _labels(inputs)) if chunked else model(
                **inputs, labels=_labels(inputs)).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain), (loss, grads) = results
    # both take the head's product in bf16 (8 significant bits, 2**-8 relative per rounding); the loss of
    # ~4 sums a few dozen such terms, the gradients are short bf16 products in another order
    assert loss == pytest.approx(plain_loss, rel=2**-6)
    for name, grad in plain.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads[name], grad, rtol=2**-4, atol=2**-5 * max(scale, 1e-6))


def test_the_head_product_runs_twice_per_token_not_three_times(monkeypatch) -> None:
    """Matrix products that touch the vocabulary: the full loss and the fused one take two, checkpointing three."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab = 500  # no other dimension of the tiny model has this size
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)

    class CountHeadProducts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm) and any(
                    isinstance(a, torch.Tensor) and vocab in a.shape for a in args):
                self.count += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 10**6)  # one chunk, so the count is per token
    counts = {}
    for path in ("full", "fused", "checkpointed"):
        torch.manual_seed(0)
        model, (_, inputs) = LlamaForCausalLM(config), build_tiny("llama")
        ak.add_adapter(model, "a", CASES["lora"][0]())
        model.train()
        if path == "checkpointed":
            model.get_output_embeddings().register_forward_hook(lambda module, args, out: out)
        with CountHeadProducts() as mode:
            loss = model(**inputs, labels=_labels(inputs)).loss if path == "full" else chunked_lm_loss(
                model, inputs, _labels(inputs))
            loss.backward()
        counts[path] = mode.count
    assert counts == {"full": 2, "fused": 2, "checkpointed": 3}
