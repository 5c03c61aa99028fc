"""The last block cut to the position a sequence classifier reads (tasks/head_reads.py).

Against the uncut model in float64: the same logits and the same gradients
for every method placed inside the cut part of the block, on each BERT-family
architecture; models whose heads read other positions are left whole.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import adapterkit as ak
from adapterkit.data import load_data
from adapterkit.runtime.inference import infer_outputs
from adapterkit.tasks import get_task
from adapterkit.tasks.head_reads import first_position_only, last_block_cut
from adapterkit.train import TrainConfig, train
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment
from tests.tolerances import assert_close_scaled, forward_ops

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)


def _bert():
    return BertForSequenceClassification(BertConfig(vocab_size=64, max_position_embeddings=64, **SIZES))


def _roberta():
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=64, max_position_embeddings=70, pad_token_id=1,
                                                          **SIZES))


def _electra():
    return ElectraForSequenceClassification(ElectraConfig(vocab_size=64, embedding_size=16, max_position_embeddings=64,
                                                          **SIZES))


CLASSIFIERS = {"bert": _bert, "roberta": _roberta, "electra": _electra}
METHODS = {
    "lora-all-linear": lambda: ak.LoraConfig(rank=4, alpha=8, targets="all-linear"),
    "houlsby": lambda: ak.BottleneckConfig(placement="houlsby", reduction_factor=4),
    "parallel": lambda: ak.BottleneckConfig(placement="parallel", reduction_factor=4),
    "ia3": lambda: ak.IA3Config(),
    "prompt": lambda: ak.PromptTuningConfig(num_virtual_tokens=3),
}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded row: its padding is a key attention must mask, cut or not
    return {"input_ids": ids, "attention_mask": mask}


def _randomise(model: torch.nn.Module) -> None:
    """Move every adapter weight off its identity start, so each contributes to the output."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _positions_seen(model: torch.nn.Module) -> list[int]:
    """Hook the last block's feed-forward input: the sequence lengths it is called with."""
    seen: list[int] = []
    layers = [m for n, m in model.named_modules() if n.endswith("intermediate.dense") and "layer." in n]
    layers[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


def _logits_and_grads(model: torch.nn.Module, cut: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with first_position_only(model) if cut else contextlib.nullcontext():
        logits = model(**_batch()).logits
    (logits * torch.arange(1.0, 4.0, dtype=logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", sorted(CLASSIFIERS))
def test_same_logits_and_gradients_with_the_cut(arch, method):
    torch.manual_seed(0)
    model = CLASSIFIERS[arch]().double()
    ak.add_adapter(model, "a", METHODS[method]())
    model.double()
    _randomise(model)
    model.train()  # dropout is 0: training mode's code path, deterministic numbers
    seen = _positions_seen(model)
    whole, whole_grads = _logits_and_grads(model, cut=False)
    cut, cut_grads = _logits_and_grads(model, cut=True)
    prompt = 3 if method == "prompt" else 0
    assert seen == [9 + prompt, 1]  # the cut ran the last feed-forward at one position
    ops = forward_ops(model, tokens=9 + prompt)
    assert_close_scaled(cut, whole, ops=ops, msg="logits")
    assert whole_grads.keys() == cut_grads.keys() and whole_grads
    for name, grad in whole_grads.items():
        assert grad.abs().max() > 0, f"{name} got no gradient: the test would not see a difference"
        assert_close_scaled(cut_grads[name], grad, ops=2 * ops, msg=name)


def _distilbert():
    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0,
                              attention_dropout=0.0, max_position_embeddings=64)
    return DistilBertForSequenceClassification(config)


def _llama():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForSequenceClassification(config)


@pytest.mark.parametrize("build", [
    lambda: BertForTokenClassification(BertConfig(vocab_size=64, max_position_embeddings=64, **SIZES)),
    lambda: BertForQuestionAnswering(BertConfig(vocab_size=64, max_position_embeddings=64,
                                                **{**SIZES, "num_labels": 2})),
    _distilbert,  # its residual is added outside the attention module
    _llama,  # reads each row's last real token
], ids=["bert-tokens", "bert-qa", "distilbert", "llama"])
def test_models_whose_heads_read_other_positions_stay_whole(build):
    torch.manual_seed(0)
    model = build().eval()
    assert last_block_cut(model) is None
    with torch.no_grad():
        expected = model(**_batch())[0]  # logits; start logits for QA
        with first_position_only(model) as on:
            got = model(**_batch())[0]
    assert on is False
    assert torch.equal(got, expected)


def test_the_hook_comes_off_on_exit_on_error_and_nests():
    model = _bert().eval()
    module = last_block_cut(model)
    assert module is model.bert.encoder.layer[-1].attention.output
    with first_position_only(model) as outer:
        with first_position_only(model) as inner:
            assert len(module._forward_pre_hooks) == 1
        assert (outer, inner) == (True, False)
        assert len(module._forward_pre_hooks) == 1  # the inner exit left the outer cut on
        with torch.no_grad():
            assert model(**_batch(), output_hidden_states=True).hidden_states[-1].shape[1] == 1
    assert not module._forward_pre_hooks
    with pytest.raises(RuntimeError, match="inside"):
        with first_position_only(model):
            raise RuntimeError("inside")
    assert not module._forward_pre_hooks
    with torch.no_grad():
        assert model(**_batch(), output_hidden_states=True).hidden_states[-1].shape[1] == 9


@pytest.fixture(scope="module")
def quiet_folder(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny0"), dropout=0.0)


def test_training_cuts_and_ends_on_the_weights_of_an_uncut_run(quiet_folder):
    data = load_data(toy_sentiment(96))
    weights, seen_by_run = [], []
    for trim in (True, False):
        model, tokenizer = tiny_lora_classifier(quiet_folder, data.labels, dropout=0.0)
        seen = _positions_seen(model)
        train(model, tokenizer, data, None, TrainConfig(max_steps=6, batch_size=16, lr=1e-2, trim_last_block=trim,
                                                        num_threads=1, progress=False))
        seen_by_run.append(seen)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        assert last_block_cut(model)._forward_pre_hooks == {}  # the run took its hook off
    assert set(seen_by_run[0]) == {1} and min(seen_by_run[1]) > 1
    for name in weights[0]:
        # six Adam steps from gradients that differ by rounding only (the tolerance of the loop's
        # accumulation test, tests/train/test_loop.py)
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_inference_cuts_and_gives_the_model_own_logits(quiet_folder):
    data = load_data(toy_sentiment(20, seed=3))
    model, tokenizer = tiny_lora_classifier(quiet_folder, data.labels, dropout=0.0)
    _randomise(model)
    task = get_task("classification")
    features = task.encode(data, tokenizer, 32)
    seen = _positions_seen(model)
    outputs = infer_outputs(model, tokenizer, task, features, batch_size=8)
    assert set(seen) == {1}
    model.eval()
    for feature, out in zip(features, outputs):
        with torch.no_grad():
            batch = task.collate([feature], tokenizer)
            expected = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        assert_close_scaled(torch.as_tensor(out), expected, ops=forward_ops(model, tokens=len(feature["input_ids"])))
