"""Prefix tuning: references (real-token caches, PEFT), folding, generation, lifecycle."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import adapterkit as ak
from adapterkit.methods.prefix import PrefixEncoder, kv_layout
from tests.tiny_models import build_tiny, output_tensor
from tests.tolerances import assert_close_scaled, forward_ops

P = 3
PEFT_TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}


def method() -> ak.Method:
    return ak.get_method("prefix_tuning")


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("bad", [{"num_virtual_tokens": 0}, {"num_virtual_tokens": 2.0},
                                 {"projection": "yes"}])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ak.ConfigError):
        ak.PrefixTuningConfig(**bad)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "t5", "bart"])
def test_shapes_disable_and_unload(kind: str) -> None:
    model, inputs = build_tiny(kind)
    base = output_tensor(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=True))
    out = output_tensor(model, inputs)
    assert out.shape == base.shape and not torch.allclose(out, base)
    with ak.adapters_disabled(model):
        torch.testing.assert_close(output_tensor(model, inputs), base, rtol=0, atol=0)
    ak.unload(model)
    assert hook_count(model) == hooks and not hasattr(model, "adapterkit_store")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(output_tensor(model, inputs), base, rtol=0, atol=0)


def table_from_cache(cache: DynamicCache, layers: int) -> torch.Tensor:
    """Our (P, layers*2*kv_hidden) table holding the keys/values of a real run (batch of one)."""
    blocks = []
    for layer in range(layers):
        for states in (cache.layers[layer].keys, cache.layers[layer].values):  # (1, heads, P, head_dim)
            blocks.append(states[0].permute(1, 0, 2).reshape(states.shape[2], -1))
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prefix_equals_real_tokens_in_front(kind: str) -> None:
    """A prefix holding the keys/values of real tokens X acts exactly like X typed before the input."""
    model, inputs = build_tiny(kind)
    x, y = inputs["input_ids"][:1, :P], inputs["input_ids"][:1, P:]
    with torch.no_grad():
        cache = model(x, use_cache=True).cache
        reference = model(torch.cat([x, y], dim=1)).logits[:, P:]
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=False))
    table = table_from_cache(cache, kv_layout(model).table_layers)
    method().import_tensors(model, "p", {"prompt_embeddings": table})
    mask = torch.ones_like(y)
    positions = torch.arange(y.shape[1]).unsqueeze(0)
    for extra in ({}, {"attention_mask": mask}, {"attention_mask": mask, "position_ids": positions}):
        assert_close_scaled(output_tensor(model, {"input_ids": y, **extra}), reference,
                            ops=forward_ops(model, tokens=P + y.shape[1]))


@pytest.mark.parametrize("kind", sorted(PEFT_TASKS))
def test_matches_peft_both_ways(kind: str) -> None:
    peft = pytest.importorskip("peft")
    model, inputs = build_tiny(kind)
    theirs = peft.get_peft_model(build_tiny(kind)[0], peft.PrefixTuningConfig(
        task_type=PEFT_TASKS[kind], num_virtual_tokens=P, prefix_projection=True)).eval()
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=True))
    # PEFT -> us: its saved (folded) table
    method().import_tensors(model, "p", {"prompt_embeddings": theirs.get_prompt_embedding_to_save("default")})
    ops = forward_ops(model, tokens=P + inputs["input_ids"].shape[1])
    assert_close_scaled(output_tensor(model, inputs), output_tensor(theirs, inputs), ops=ops)
    # us -> PEFT: a fresh table of ours, read by PEFT as an unprojected prefix
    ours = "q"
    ak.add_adapter(model, ours, ak.PrefixTuningConfig(num_virtual_tokens=P, projection=False))
    data = method().peft_config(ak.get_adapter_config(model, ours), model)
    reader = peft.get_peft_model(build_tiny(kind)[0], peft.PrefixTuningConfig(
        task_type=PEFT_TASKS[kind], num_virtual_tokens=P, prefix_projection=data["prefix_projection"],
        token_dim=data["token_dim"], num_layers=data["num_layers"],
        num_attention_heads=data["num_attention_heads"],
        num_transformer_submodules=data["num_transformer_submodules"])).eval()
    exported = method().export_tensors(model, ours)["prompt_embeddings"]
    reader.prompt_encoder["default"].embedding.weight.data.copy_(exported)
    assert_close_scaled(output_tensor(model, inputs), output_tensor(reader, inputs), ops=ops)


def test_peft_config_round_trip() -> None:
    model, _ = build_tiny("llama")  # GQA: 2 key/value heads of 8
    data = method().peft_config(ak.PrefixTuningConfig(num_virtual_tokens=5), model)
    assert data["peft_type"] == "PREFIX_TUNING"
    assert (data["token_dim"], data["num_attention_heads"], data["num_layers"]) == (16, 2, 2)
    assert data["num_transformer_submodules"] == 1 and data["prefix_projection"] is False
    config = method().config_from_peft(data)
    assert config == ak.PrefixTuningConfig(num_virtual_tokens=5, projection=False)
    with pytest.raises(ak.ConfigError):
        method().config_from_peft({**data, "peft_type": "LORA"})


def test_projection_mlp_and_folding() -> None:
    model, inputs = build_tiny("gpt2")
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=True))
    encoder = model.adapterkit_store.adapters["p"]
    assert isinstance(encoder, PrefixEncoder)
    first, act, last = encoder.transform
    assert isinstance(act, torch.nn.Tanh)
    assert (first.in_features, first.out_features, last.out_features) == (32, 32, 2 * 2 * 32)
    expected = last(torch.tanh(first(encoder.embedding)))  # (P, layers*2*kv_hidden), with grad
    torch.testing.assert_close(encoder(), expected, rtol=0, atol=0)  # the same two layers
    with torch.no_grad():
        folded = encoder()
        assert encoder() is folded  # computed once, reused
        out = model(**inputs).logits
    torch.testing.assert_close(folded, expected.detach(), rtol=0, atol=0)  # the same ops without autograd
    # folded == MLP path: the same table, but the model runs with autograd on, which may pick other kernels
    assert_close_scaled(out, model(**inputs).logits.detach(),
                        ops=forward_ops(model, tokens=P + inputs["input_ids"].shape[1]))
    with torch.no_grad():
        encoder.embedding.add_(1.0)  # weights changed: fold again
        assert not torch.equal(encoder(), folded)
    # folding for good, or importing, turns the adapter into its table, still trainable
    exported = method().export_tensors(model, "p")["prompt_embeddings"]
    before = output_tensor(model, inputs)
    encoder.fold()
    assert not encoder.projected and encoder.table.requires_grad
    torch.testing.assert_close(output_tensor(model, inputs), before, rtol=0, atol=0)
    method().import_tensors(model, "p", {"prompt_embeddings": exported})
    assert not encoder.projected and encoder.table.requires_grad
    torch.testing.assert_close(output_tensor(model, inputs), before, rtol=0, atol=0)  # the same table back
    with pytest.raises(ValueError, match="shape"):
        method().import_tensors(model, "p", {"prompt_embeddings": exported[:, :-1]})


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_optimizer_step_changes_only_the_adapter(kind: str) -> None:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=True))
    model.train()
    own = ak.adapter_parameters(model, "p")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(own)
    assert any("transform" in n for n in own)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = inputs["input_ids"] if kind == "gpt2" else torch.tensor([0, 2])
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(own)


def greedy(model: torch.nn.Module, batch: dict, use_cache: bool) -> object:
    return model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                          return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_with_and_without_cache_agree(kind: str) -> None:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=True))
    left = {"input_ids": inputs["input_ids"].flip(1), "attention_mask": inputs["attention_mask"].flip(1)}
    for batch in (inputs, left):
        cached, plain = greedy(model, batch, True), greedy(model, batch, False)
        assert torch.equal(cached.sequences, plain.sequences)
        # scores too: tiny models often repeat a token whatever the prefix, so tokens alone prove little
        # one forward per step against the whole sequence again: the same logits up to rounding
        assert_close_scaled(torch.stack(cached.scores), torch.stack(plain.scores),
                            ops=forward_ops(model, tokens=P + plain.sequences.shape[1]))
        # the prefix went in once: cache = prefix + prompt + all generated tokens but the last
        assert cached.cache.get_seq_length() == P + cached.sequences.shape[1] - 1
    with ak.adapters_disabled(model):
        base = greedy(model, left, True)
    assert not torch.allclose(torch.stack(base.scores), torch.stack(plain.scores))


def test_no_cache_leaks_when_not_asked_for() -> None:
    model, inputs = build_tiny("llama")
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=True))
    with torch.no_grad():
        assert model(**inputs, use_cache=False).cache is None
        assert model(**inputs, use_cache=True).cache.get_seq_length() == P + inputs["input_ids"].shape[1]


def test_several_adapters_switch_delete_and_exclusivity() -> None:
    model, inputs = build_tiny("gpt2")
    hooks = hook_count(model)
    ak.add_adapter(model, "a", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=True))
    ak.add_adapter(model, "b", ak.PrefixTuningConfig(num_virtual_tokens=5, projection=False))
    out_b = output_tensor(model, inputs)
    ak.set_active(model, "a")
    out_a = output_tensor(model, inputs)
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ak.CompositionError, match="only one adapter that adds virtual tokens"):
        ak.set_active(model, ["a", "b"])
    ak.set_active(model, "b")
    ak.delete_adapter(model, "a")
    assert "a" not in model.adapterkit_store.adapters
    torch.testing.assert_close(output_tensor(model, inputs), out_b, rtol=0, atol=0)
    with pytest.raises(ak.MergeError, match="cannot be merged"):
        ak.merge(model, "b")
    ak.unload(model)
    assert hook_count(model) == hooks


def test_routing_a_whole_batch_to_the_prefix() -> None:
    model, inputs = build_tiny("gpt2")
    ak.add_adapter(model, "p", ak.PrefixTuningConfig(num_virtual_tokens=P, projection=True))
    active = output_tensor(model, inputs)
    ak.set_active(model, None)
    with ak.route(model, ["p", "p"]):
        torch.testing.assert_close(output_tensor(model, inputs), active, rtol=0, atol=0)
    with pytest.raises(ak.CompositionError, match="whole batch on one plan"):
        with ak.route(model, ["p", None]):
            output_tensor(model, inputs)
