"""Frozen-prefix caching: cached states give the logits a full forward gives, training with the cache ends
where training without it does, and the cases it cannot serve are refused."""

from __future__ import annotations

import json

import pytest
import torch

import adapterkit as ak
from adapterkit.train.prefix_cache import PrefixCache

from tests.tiny_models import perturb
from tests.tiny_text import tiny_bert_folder, toy_sentiment

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    return {"dropout": tiny_bert_folder(root / "d", dropout=0.1), "plain": tiny_bert_folder(root / "p", dropout=0.0)}


def top_lora(folder):
    model, tokenizer = ak.load_model(folder, labels=["neg", "pos"])
    ak.add_adapter(model, "x", ak.LoraConfig(rank=2, targets=["query", "value"]))
    ak.place_in_layers(model, "x", "top:1")
    perturb(model, "x", seed=2)
    return model, tokenizer


def test_cached_states_give_the_same_logits(folders):
    model, tokenizer = top_lora(folders["dropout"])
    cache = PrefixCache(model, max_bytes=2**24)
    assert cache.first == 1
    model.train()
    texts = ["good film", "a very dull plot and story", "great"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    outputs = []
    for _ in range(2):  # first pass computes and keeps, second starts at block 1
        torch.manual_seed(0)  # the adapted block's dropout draws the same masks both times
        with cache.batch([0, 1, 2], batch["attention_mask"]):
            outputs.append(model(**batch).logits)
    assert cache.hits == 3 and len(cache.store) == 3
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    # the same examples in another batch, padded to another length, still match a full forward
    other = tokenizer([texts[2], texts[0]], return_tensors="pt", padding=True)
    torch.manual_seed(1)
    with cache.batch([2, 0], other["attention_mask"]):
        cached = model(**other).logits
    cache.close()
    for module in [model.bert.embeddings, model.bert.encoder.layer[0]]:
        module.eval()  # what the cache does to the part below the adapters
    torch.manual_seed(1)
    fresh = model(**other).logits
    torch.testing.assert_close(cached, fresh, rtol=0, atol=64 * EPS32 * float(fresh.abs().max()))


def test_training_with_the_cache_ends_where_training_without_it_does(folders, tmp_path):
    data = ak.load_data(toy_sentiment(48, seed=3))
    finals, records = [], []
    for cached in (False, True):
        model, tokenizer = ak.load_model(folders["plain"], labels=["neg", "pos"])
        torch.manual_seed(0)
        ak.add_adapter(model, "x", ak.LoraConfig(rank=2, targets=["query", "value"]))
        out = tmp_path / f"run{int(cached)}"
        ak.train(model, tokenizer, data, None, ak.TrainConfig(
            epochs=3, batch_size=8, lr=1e-2, progress=False, num_threads=1, adapter_layers="top:1",
            cache_frozen_prefix=cached, output_dir=str(out)))
        finals.append({k: v.detach().clone() for k, v in ak.adapter_parameters(model, "x").items()})
        records.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-4, atol=1e-5)
    epochs = [r for r in records[1] if r["split"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1.0, 2.0, 3.0]
    assert epochs[0]["prefix_cache_hits"] == 0 and epochs[2]["prefix_cache_hits"] == 2 * 48
    assert epochs[0]["prefix_cache_mib"] > 0


def test_what_the_cache_cannot_serve_is_refused(folders):
    model, _ = ak.load_model(folders["plain"], labels=["neg", "pos"])
    ak.add_adapter(model, "x", ak.LoraConfig(rank=2, targets=["query"]))
    with pytest.raises(ak.errors.UsageError, match="above block 0"):
        PrefixCache(model, 2**20)
    prompt, _ = ak.load_model(folders["plain"], labels=["neg", "pos"])
    ak.add_adapter(prompt, "p", ak.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ak.errors.UsageError, match="changes the model's inputs"):
        PrefixCache(prompt, 2**20)


def test_the_memory_cap_is_kept(folders):
    model, tokenizer = top_lora(folders["plain"])
    batch = tokenizer(["good film", "a very dull plot and story"], return_tensors="pt", padding=True)
    one_row = int(batch["attention_mask"][0].sum()) * 32 * 4  # tokens x hidden x float32
    cache = PrefixCache(model, max_bytes=one_row)
    with cache.batch([0, 1], batch["attention_mask"]):
        model(**batch)
    assert list(cache.store) == [0] and cache.bytes == one_row
    cache.close()


def test_compiled_training_ends_where_eager_training_does(folders):
    """TrainConfig.compile runs the training forward through torch.compile; the weights it ends on are eager's."""
    data = ak.load_data(toy_sentiment(24, seed=5))
    finals = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, tokenizer = ak.load_model(folders["plain"], labels=["neg", "pos"])
        ak.add_adapter(model, "x", ak.LoraConfig(rank=2, targets=["query", "value"]))
        ak.train(model, tokenizer, data, None, ak.TrainConfig(max_steps=3, batch_size=8, lr=1e-2, progress=False,
                                                              num_threads=1, compile=compiled))
        finals.append({k: v.detach().clone() for k, v in ak.adapter_parameters(model, "x").items()})
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-4, atol=1e-5)
    with pytest.raises(ak.errors.UserError, match="do not combine"):
        ak.train(model, tokenizer, data, None, ak.TrainConfig(max_steps=1, compile=True, cache_frozen_prefix=True,
                                                              adapter_layers="top:1", progress=False))
