"""What the non-weight-update methods' parameters mean, on planted values."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.analysis import analyze
from adapterkit.core.layers import adapter_layers, get_store

from tests.tiny_models import perturb
from tests.tiny_text import tiny_bert_folder, toy_sentiment


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("params") / "model", dropout=0.0)


def fresh(folder, config):
    model, tokenizer = ak.load_model(folder, labels=["neg", "pos"])
    ak.add_adapter(model, "x", config)
    return model.eval(), tokenizer


def test_ia3_scales_as_deviations_from_one(folder):
    model, _ = fresh(folder, ak.IA3Config())
    layers = [(p, m) for p, m in adapter_layers(model) if m.method == "ia3"]
    with torch.no_grad():
        for i, (_, layer) in enumerate(layers):
            vector = layer.ia3_l["x"]
            vector.fill_(1.0)
            vector.view(-1)[0] = 1.0 + 0.25 * (i + 1)  # one planted scale per layer
    report = analyze(model, "x")["parameters"]
    assert report["method"] == "ia3" and report["modules"]
    for i, entry in enumerate(report["modules"]):
        size = entry["size"]
        assert entry["max_abs_deviation"] == pytest.approx(0.25 * (i + 1))
        assert entry["mean_abs_deviation"] == pytest.approx(0.25 * (i + 1) / size)
        assert entry["max_scale"] == pytest.approx(1.0 + 0.25 * (i + 1)) and entry["min_scale"] == 1.0
    assert {e["scales"] for e in report["modules"]} == {"input", "output"}  # FFN input, key/value outputs


def test_prompt_tokens_copied_from_the_vocabulary_find_their_word(folder):
    model, tokenizer = fresh(folder, ak.PromptTuningConfig(num_virtual_tokens=3))
    vocabulary = model.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(["great", "dull", "film"])
    with torch.no_grad():
        get_store(model).adapters["x"].embedding.copy_(2.0 * vocabulary[ids])
    report = analyze(model, "x", tokenizer=tokenizer)["parameters"]
    for token, word_id, word in zip(report["tokens"], ids, ["great", "dull", "film"]):
        assert token["nearest"][0]["id"] == word_id and token["nearest"][0]["token"] == word
        assert token["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert token["norm"] == pytest.approx(2.0 * float(vocabulary[word_id].norm()), rel=1e-5)


def test_prefix_values_are_matched_in_the_first_layers_value_space(folder):
    model, tokenizer = fresh(folder, ak.PrefixTuningConfig(num_virtual_tokens=2))
    word = tokenizer.convert_tokens_to_ids("movie")
    bert = model.bert
    with torch.no_grad(), ak.adapters_disabled(model):
        hidden = bert.embeddings(input_ids=torch.tensor([[word]]))  # the first layer's input for a one-token text
        value = bert.encoder.layer[0].attention.self.value(hidden)[0, 0]
    encoder = get_store(model).adapters["x"]
    from adapterkit.methods.prefix import kv_layout

    layout = kv_layout(model)
    with torch.no_grad():
        table = encoder.folded().clone()
        start = layout.blocks[0][1] * layout.kv_hidden
        table[0, start:start + layout.kv_hidden] = 3.0 * value
        encoder.load_table(table)
    report = analyze(model, "x", tokenizer=tokenizer)["parameters"]
    assert len(report["layers"]) == 2
    nearest = report["first_layer_value_nearest"][0][0]
    assert nearest["token"] == "movie" and nearest["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_bitfit_offsets_against_the_biases_they_move(folder):
    model, _ = fresh(folder, ak.BitFitConfig())
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if layer.method == "bitfit":
                layer.bitfit["x"].bias.fill_(0.1)
    report = analyze(model, "x")["parameters"]
    for entry in report["modules"]:
        assert entry["offset_norm"] == pytest.approx(0.1 * entry["size"] ** 0.5, rel=1e-5)
        assert entry["max_abs_change"] == pytest.approx(0.1)
        if entry["bias_norm"]:
            assert entry["norm_ratio"] == pytest.approx(entry["offset_norm"] / entry["bias_norm"])
    assert {e["layer"] for e in report["modules"]} >= {0, 1}


def test_bottleneck_output_ratio_is_zero_at_init_and_grows_with_the_adapter(folder):
    model, tokenizer = fresh(folder, ak.BottleneckConfig(reduction_factor=4))
    data = ak.load_data(toy_sentiment(12, seed=4))
    at_init = analyze(model, "x", data=data, tokenizer=tokenizer)
    ratios = at_init["behaviour"]["activations"]["bottleneck_output_ratio"]
    assert ratios and all(r["ratio"] == 0.0 for r in ratios)  # zero up-projection: exact zeros added
    assert [r["up_norm"] for r in at_init["parameters"]["modules"]] == [0.0] * len(ratios)
    perturb(model, "x", seed=5, scale=0.3)
    moved = analyze(model, "x", data=data, tokenizer=tokenizer)["behaviour"]["activations"]
    assert all(r["ratio"] > 0.0 for r in moved["bottleneck_output_ratio"])
    assert len(moved["block_cosine_distance"]) == 2
