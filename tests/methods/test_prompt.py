"""Prompt tuning: PEFT as reference, initialisation, stripped outputs, generation, lifecycle."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.prompt import PromptEmbedding
from tests.tiny_models import build_tiny, output_tensor
from tests.tolerances import assert_close_scaled, forward_ops

P = 3
PEFT_TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM",
              "bart": "SEQ_2_SEQ_LM"}


def method() -> ak.Method:
    return ak.get_method("prompt_tuning")


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


class FakeTokenizer:
    """Splits on spaces; token id = word length + 10."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [len(word) + 10 for word in text.split()]}


@pytest.mark.parametrize("bad", [{"num_virtual_tokens": 0}, {"init_text": ""}, {"init_token_ids": []},
                                 {"init_token_ids": [1, -2]}, {"init_token_ids": "12"}])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ak.ConfigError):
        ak.PromptTuningConfig(**bad)


def test_init_from_text_uses_the_token_embeddings() -> None:
    model, _ = build_tiny("gpt2")
    config = ak.PromptTuningConfig.from_text("a bb ccc dddd", FakeTokenizer(), num_virtual_tokens=6)
    assert config.init_token_ids == [11, 12, 13, 14]
    ak.add_adapter(model, "p", config)
    expected = model.get_input_embeddings().weight[[11, 12, 13, 14, 11, 12]]  # repeated to fill P
    torch.testing.assert_close(model.adapterkit_store.adapters["p"].embedding, expected, rtol=0, atol=0)
    ak.add_adapter(model, "short", ak.PromptTuningConfig(num_virtual_tokens=2, init_token_ids=[5, 6, 7]))
    torch.testing.assert_close(model.adapterkit_store.adapters["short"].embedding,
                               model.get_input_embeddings().weight[[5, 6]], rtol=0, atol=0)
    with pytest.raises(ak.ConfigError, match="from_text"):  # a tiny model has no tokenizer to find
        ak.add_adapter(model, "text", ak.PromptTuningConfig(init_text="hello"))
    with pytest.raises(ak.ConfigError, match="vocabulary"):
        ak.add_adapter(model, "far", ak.PromptTuningConfig(init_token_ids=[10_000]))


def test_random_init_takes_vocabulary_rows() -> None:
    model, _ = build_tiny("llama")
    ak.add_adapter(model, "p", ak.PromptTuningConfig(num_virtual_tokens=P))
    rows = model.get_input_embeddings().weight
    for vector in model.adapterkit_store.adapters["p"].embedding:
        assert any(torch.equal(vector, row) for row in rows)


@pytest.mark.parametrize("kind", sorted(PEFT_TASKS))
def test_matches_peft_and_lines_up_with_inputs(kind: str) -> None:
    peft = pytest.importorskip("peft")
    model, inputs = build_tiny(kind)
    base = output_tensor(model, inputs)
    theirs = peft.get_peft_model(build_tiny(kind)[0], peft.PromptTuningConfig(
        task_type=PEFT_TASKS[kind], num_virtual_tokens=P)).eval()
    ak.add_adapter(model, "p", ak.PromptTuningConfig(num_virtual_tokens=P))
    saved = theirs.get_prompt_embedding_to_save("default")  # (2P, hidden) for encoder-decoders
    method().import_tensors(model, "p", {"prompt_embeddings": saved})
    reference = output_tensor(theirs, inputs)
    if kind in ("gpt2", "llama"):  # PEFT returns the virtual positions too; we strip them
        reference = reference[:, P:]
    out = output_tensor(model, inputs)
    assert out.shape == base.shape and not torch.allclose(out, base)
    ops = forward_ops(model, tokens=P + inputs["input_ids"].shape[1])
    tolerance = assert_close_scaled(out, reference, ops=ops)
    # the prompt moves the output beyond rounding, so one that either side dropped would fail above
    assert (out - base).abs().max() > 2 * tolerance
    # and the other way: our embeddings in PEFT's encoder (P rows, one submodule)
    data = method().peft_config(ak.get_adapter_config(model, "p"), model)
    assert data["peft_type"] == "PROMPT_TUNING" and data["num_transformer_submodules"] == 1
    assert data["token_dim"] == 32 and data["prompt_tuning_init"] == "RANDOM"
    reader = peft.get_peft_model(build_tiny(kind)[0], peft.PromptTuningConfig(
        task_type=PEFT_TASKS[kind], num_virtual_tokens=P, num_transformer_submodules=1)).eval()
    exported = method().export_tensors(model, "p")["prompt_embeddings"]
    reader.prompt_encoder["default"].embedding.weight.data.copy_(exported)
    theirs_again = output_tensor(reader, inputs)
    assert_close_scaled(out, theirs_again[:, P:] if kind in ("gpt2", "llama") else theirs_again, ops=ops)


def test_labels_token_types_and_hidden_states() -> None:
    peft = pytest.importorskip("peft")
    model, inputs = build_tiny("gpt2")
    theirs = peft.get_peft_model(build_tiny("gpt2")[0], peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    ak.add_adapter(model, "p", ak.PromptTuningConfig(num_virtual_tokens=P))
    method().import_tensors(model, "p", {"prompt_embeddings": theirs.get_prompt_embedding_to_save("default")})
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ours = model(**inputs, labels=labels, output_hidden_states=True)
        reference = theirs(**inputs, labels=labels)
    # labels gained P x -100; the loss adds a log-sum-exp over the vocabulary and a mean over tokens
    loss_ops = forward_ops(model, tokens=P + labels.shape[1]) + model.config.vocab_size + labels.numel()
    assert_close_scaled(ours.loss, reference.loss, ops=loss_ops)
    assert all(h.shape[1] == inputs["input_ids"].shape[1] for h in ours.hidden_states)
    # BERT: token_type_ids gain zeros, exactly as PEFT does
    bert, bert_inputs = build_tiny("bert")
    bert_theirs = peft.get_peft_model(build_tiny("bert")[0], peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=P)).eval()
    ak.add_adapter(bert, "p", ak.PromptTuningConfig(num_virtual_tokens=P))
    method().import_tensors(bert, "p", {"prompt_embeddings": bert_theirs.get_prompt_embedding_to_save("default")})
    typed = {**bert_inputs, "token_type_ids": torch.ones_like(bert_inputs["input_ids"])}
    assert_close_scaled(output_tensor(bert, typed), output_tensor(bert_theirs, typed),
                        ops=forward_ops(bert, tokens=P + typed["input_ids"].shape[1]))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_optimizer_step_changes_only_the_adapter(kind: str) -> None:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "p", ak.PromptTuningConfig(num_virtual_tokens=P))
    model.train()
    own = ak.adapter_parameters(model, "p")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(own)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = inputs["input_ids"] if kind == "gpt2" else torch.tensor([0, 2])
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == set(own)


def greedy(model: torch.nn.Module, batch: dict, use_cache: bool) -> object:
    return model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                          return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_generation_with_and_without_cache_agree(kind: str) -> None:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "p", ak.PromptTuningConfig(num_virtual_tokens=P))
    batch = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    if kind != "t5":  # decoder-only: pad on the left
        batch = {k: v.flip(1) for k, v in batch.items()}
    cached, plain = greedy(model, batch, True), greedy(model, batch, False)
    assert torch.equal(cached.sequences, plain.sequences)
    assert_close_scaled(torch.stack(cached.scores), torch.stack(plain.scores),
                        ops=forward_ops(model, tokens=P + plain.sequences.shape[1]))
    if kind != "t5":  # the prompt went in once
        assert cached.cache.get_seq_length() == P + cached.sequences.shape[1] - 1
    with ak.adapters_disabled(model):
        base = greedy(model, batch, True)
    assert not torch.allclose(torch.stack(base.scores), torch.stack(plain.scores))


def test_several_adapters_switch_disable_delete_unload() -> None:
    model, inputs = build_tiny("llama")
    base = output_tensor(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    ak.add_adapter(model, "a", ak.PromptTuningConfig(num_virtual_tokens=P))
    ak.add_adapter(model, "b", ak.PromptTuningConfig(num_virtual_tokens=5))
    out_b = output_tensor(model, inputs)
    ak.set_active(model, "a")
    out_a = output_tensor(model, inputs)
    assert out_a.shape == out_b.shape == base.shape and not torch.allclose(out_a, out_b)
    with ak.adapters_disabled(model):
        torch.testing.assert_close(output_tensor(model, inputs), base, rtol=0, atol=0)
    with pytest.raises(ak.CompositionError, match="only one adapter that adds virtual tokens"):
        ak.set_active(model, ["a", "b"])
    ak.add_adapter(model, "prefix", ak.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ak.CompositionError, match="only one adapter that adds virtual tokens"):
        ak.set_active(model, ["prefix", "a"])
    ak.set_active(model, "a")
    ak.delete_adapter(model, "b")
    assert set(model.adapterkit_store.adapters) == {"a", "prefix"}
    torch.testing.assert_close(output_tensor(model, inputs), out_a, rtol=0, atol=0)
    assert isinstance(model.adapterkit_store.adapters["a"], PromptEmbedding)
    with pytest.raises(ak.MergeError, match="cannot be merged"):
        ak.merge(model, "a")
    ak.unload(model)
    assert hook_count(model) == hooks and not hasattr(model, "adapterkit_store")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(output_tensor(model, inputs), base, rtol=0, atol=0)


def test_import_checks_shapes() -> None:
    model, _ = build_tiny("gpt2")
    ak.add_adapter(model, "p", ak.PromptTuningConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match="shape"):
        method().import_tensors(model, "p", {"prompt_embeddings": torch.zeros(P + 1, 32)})
    with pytest.raises(ValueError, match="prompt_embeddings"):
        method().import_tensors(model, "p", {"embedding": torch.zeros(P, 32)})
    config = method().config_from_peft({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 7})
    assert config == ak.PromptTuningConfig(num_virtual_tokens=7)
