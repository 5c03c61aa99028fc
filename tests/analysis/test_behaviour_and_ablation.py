"""Behaviour on data and layer ablation, against direct computations on a tiny classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adapterkit as ak
from adapterkit.analysis import analyze
from adapterkit.analysis.ablation import bootstrap_drop, dropped
from adapterkit.analysis.behaviour import base_model
from adapterkit.analysis.task_views import task_view

from tests.tiny_models import perturb
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tiny_bert_folder(tmp_path_factory.mktemp("an") / "model", dropout=0.0)
    model, tokenizer = tiny_lora_classifier(folder, ["neg", "pos"], rank=4, dropout=0.0)
    perturb(model, "toy", seed=1, scale=0.5)
    with torch.no_grad():  # a trained head, unlike the base's own
        head = next(s for _, s in ak.core.layers.adapter_layers(model) if s.method == "head")
        head.copies["toy"].weight.add_(torch.randn_like(head.copies["toy"].weight))
    model.eval()
    data = ak.load_data(toy_sentiment(48, seed=2))
    return model, tokenizer, data


def logits(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def lora_layers(model):
    return [layer for _, layer in ak.core.layers.adapter_layers(model) if layer.method == "lora"]


def test_prediction_changes_match_a_direct_comparison(classifier):
    model, tokenizer, data = classifier
    report = analyze(model, "toy", data=data, tokenizer=tokenizer, batch_size=7)
    changes = report["behaviour"]["predictions"]
    texts = [e["text"] for e in data.examples]
    with ak.use(model, "toy"):
        adapted = logits(model, tokenizer, texts).argmax(-1)
    with base_model(model, "toy"):
        base = logits(model, tokenizer, texts).argmax(-1)
    assert changes["changed"] == int((adapted != base).sum()) > 0
    matrix = np.zeros((2, 2), dtype=int)
    for b, a in zip(base.tolist(), adapted.tolist()):
        matrix[b, a] += 1
    assert changes["confusion"]["units"] == ["neg", "pos"]
    assert changes["confusion"]["matrix"] == matrix.tolist()
    references = torch.tensor([e["label"] for e in data.examples])
    assert changes["adapted_metric"] == pytest.approx(float((adapted == references).float().mean()), abs=1e-12)
    assert changes["base_metric"] == pytest.approx(float((base == references).float().mean()), abs=1e-12)
    by_class = changes["changed_by_class"]
    assert sum(v["changed"] for v in by_class.values()) == changes["changed"]
    moved = [m["index"] for m in changes["most_changed"]]
    assert all((adapted[i] != base[i]) or m["change"] > 0 for i, m in zip(moved, changes["most_changed"]))
    assert [m["change"] for m in changes["most_changed"]] == sorted((m["change"] for m in changes["most_changed"]),
                                                                     reverse=True)


def test_the_base_keeps_the_adapters_trained_head(classifier):
    model, tokenizer, data = classifier
    texts = [e["text"] for e in data.examples[:5]]
    with base_model(model, "toy"):
        swapped = logits(model, tokenizer, texts)
    with ak.adapters_disabled(model):
        plain = logits(model, tokenizer, texts)
    with ak.use(model, "toy"), dropped(model, "toy", {0, 1}):
        head_only = logits(model, tokenizer, texts)
    torch.testing.assert_close(swapped, head_only, rtol=0, atol=0)  # same operations: bit for bit
    assert not torch.equal(swapped, plain)
    with ak.adapters_disabled(model):
        assert torch.equal(logits(model, tokenizer, texts), plain)  # and the swap was undone


def test_hidden_states_move_only_from_the_first_adapted_layer(classifier):
    model, tokenizer, data = classifier
    first = lora_layers(model)[:2]  # query and value of layer 0
    saved = [layer.lora_B["toy"].weight.detach().clone() for layer in first]
    with torch.no_grad():
        for layer in first:
            layer.lora_B["toy"].weight.zero_()
    try:
        distances = analyze(model, "toy", data=data, tokenizer=tokenizer)["behaviour"]["activations"][
            "block_cosine_distance"]
    finally:
        with torch.no_grad():
            for layer, weight in zip(first, saved):
                layer.lora_B["toy"].weight.copy_(weight)
    # the same numbers: only cos(a, a) rounding, a few float32 eps
    assert abs(distances[0]) < 64 * torch.finfo(torch.float32).eps
    assert distances[1] > 1e-4


def test_ablating_a_zero_adapter_layer_changes_nothing(classifier):
    model, tokenizer, data = classifier
    first = lora_layers(model)[:2]
    saved = [layer.lora_B["toy"].weight.detach().clone() for layer in first]
    texts = [e["text"] for e in data.examples]
    with torch.no_grad():
        for layer in first:
            layer.lora_B["toy"].weight.zero_()
    try:
        with ak.use(model, "toy"):
            before = logits(model, tokenizer, texts)
            with dropped(model, "toy", {0}):
                without = logits(model, tokenizer, texts)
            after = logits(model, tokenizer, texts)
        report = analyze(model, "toy", data=data, tokenizer=tokenizer, ablate=True)["ablation"]
    finally:
        with torch.no_grad():
            for layer, weight in zip(first, saved):
                layer.lora_B["toy"].weight.copy_(weight)
    torch.testing.assert_close(without, before, rtol=0, atol=0)
    assert torch.equal(after, before)  # the adapter came back whole
    single = {e["cut"]: e for e in report["single"]}
    assert single[0]["drop"] == 0.0 and single[0]["low"] == 0.0 and single[0]["high"] == 0.0
    assert 0 in report["droppable"]
    assert report["layers"] == [0, 1]
    assert [e["layers"] for e in report["below"]] == [[0]] and [e["layers"] for e in report["above"]] == [[1]]
    assert report["top_k"] == 1 and "top:1" in report["verdict"]


def test_bootstrap_interval_of_a_certain_drop():
    view = task_view("classification")
    full, ablated = np.ones((30, 1)), np.zeros((30, 1))
    drop, low, high = bootstrap_drop(view, full, ablated, np.random.default_rng(0))
    assert (drop, low, high) == (100.0, 100.0, 100.0)
    mixed = np.array([[1.0]] * 15 + [[0.0]] * 15)
    drop, low, high = bootstrap_drop(view, full, mixed, np.random.default_rng(0))
    assert drop == 50.0 and low < drop < high


def test_ablate_without_data_is_refused(classifier):
    model, _, _ = classifier
    with pytest.raises(ak.errors.UsageError, match="needs --data"):
        analyze(model, "toy", ablate=True)
