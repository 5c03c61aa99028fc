"""Adapters in chosen blocks only: ``layers`` on the method configs (PEFT's ``layers_to_transform``),
``place_in_layers`` / ``TrainConfig.adapter_layers``, and the backward stopping below the lowest adapter."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import adapterkit as ak
from adapterkit.core.layers import adapter_layers
from adapterkit.core.targeting import TargetError

from tests.tiny_models import perturb
from tests.tiny_text import tiny_bert_folder, toy_sentiment


def adapted_paths(model, method: str = "lora") -> list[str]:
    return [p for p, layer in adapter_layers(model) if layer.method == method]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("layers") / "model", dropout=0.0)


def fresh(folder):
    model, tokenizer = ak.load_model(folder, labels=["neg", "pos"])
    return model.eval(), tokenizer


@pytest.mark.parametrize("config", [
    ak.LoraConfig(rank=2, targets=["query", "value"], layers=[1]),
    ak.IA3Config(layers=[1]),
    ak.BottleneckConfig(layers=[1]),
    ak.BitFitConfig(layers=[1]),
])
def test_layers_limit_every_layer_method_to_those_blocks(folder, config):
    model, _ = fresh(folder)
    ak.add_adapter(model, "x", config)
    paths = [p for p, layer in adapter_layers(model) if layer.method == config.method]
    assert paths and all(".layer.1." in p for p in paths)


def test_layers_are_checked():
    with pytest.raises(ak.ConfigError, match="distinct block numbers"):
        ak.LoraConfig(layers=[1, 1])
    with pytest.raises(ak.ConfigError, match="distinct block numbers"):
        ak.LoraConfig(layers=[])


def test_a_missing_layer_is_refused_with_the_range(folder):
    model, _ = fresh(folder)
    with pytest.raises(TargetError, match="numbered 0-1"):
        ak.add_adapter(model, "x", ak.LoraConfig(targets=["query"], layers=[5]))


def test_peft_reads_and_writes_the_same_placement(folder, tmp_path):
    model, tokenizer = fresh(folder)
    base = copy.deepcopy(model)
    ak.add_adapter(model, "x", ak.LoraConfig(rank=2, alpha=4, targets=["query", "value"], layers=[1]))
    perturb(model, "x", seed=3)
    ak.save_adapter(model, "x", str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1]
    batch = tokenizer(["good film", "a dull plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    # and PEFT's own placement loads back with it
    wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"],
                                                                        layers_to_transform=[0]))
    wrapped.save_pretrained(tmp_path / "peft")
    again = copy.deepcopy(base)
    ak.load_adapter(again, tmp_path / "peft")
    assert ak.get_adapter_config(again, "default").layers == [0]
    assert all(".layer.0." in p for p in adapted_paths(again))


def test_place_in_layers_keeps_the_top_blocks_and_saves_that(folder, tmp_path):
    model, tokenizer = fresh(folder)
    ak.add_adapter(model, "x", ak.LoraConfig(rank=2, targets=["query", "value"]))
    perturb(model, "x", seed=1)
    top = {p: layer.lora_B["x"].weight.detach().clone() for p, layer in adapter_layers(model)
           if layer.method == "lora" and ".layer.1." in p}
    placed = ak.place_in_layers(model, "x", "top:1")
    assert placed.layers == [1] and ak.get_adapter_config(model, "x").layers == [1]
    assert sorted(adapted_paths(model)) == sorted(top)
    for path, layer in adapter_layers(model):
        if layer.method == "lora":
            assert torch.equal(layer.lora_B["x"].weight, top[path])  # the kept blocks keep their weights
    ak.save_adapter(model, "x", str(tmp_path / "x"))
    reloaded, _ = fresh(folder)
    ak.load_adapter(reloaded, tmp_path / "x")
    batch = tokenizer(["good film"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    with pytest.raises(ak.errors.UsageError, match="already placed in layers"):
        ak.place_in_layers(model, "x", "top:2")


def test_input_methods_and_merged_adapters_are_refused(folder):
    model, _ = fresh(folder)
    ak.add_adapter(model, "p", ak.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ak.errors.UsageError, match="no per-block placement"):
        ak.place_in_layers(model, "p", "top:1")
    ak.add_adapter(model, "m", ak.LoraConfig(rank=2, targets=["query"]))
    ak.merge(model, "m")
    with pytest.raises(ak.errors.UsageError, match="unmerge"):
        ak.place_in_layers(model, "m", "top:1")


def test_training_with_adapter_layers_stops_the_backward_below_them(folder, tmp_path):
    model, tokenizer = fresh(folder)
    ak.add_adapter(model, "x", ak.LoraConfig(rank=2, targets=["query", "value"]))
    blocks = model.bert.encoder.layer
    seen: dict[int, bool] = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0].requires_grad))
             for i, block in enumerate(blocks)]
    data = ak.load_data(toy_sentiment(32))
    result = ak.train(model, tokenizer, data, None, ak.TrainConfig(
        max_steps=2, batch_size=8, progress=False, num_threads=1, adapter_layers="top:1",
        output_dir=str(tmp_path / "run")))
    for hook in hooks:
        hook.remove()
    assert seen == {0: False, 1: True}  # nothing below block 1 is part of the graph
    assert all(".layer.1." in p for p in adapted_paths(model))
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1] and result.step == 2


def test_command_line_places_and_caches(folder, tmp_path, capsys):
    import pandas as pd

    from adapterkit.cli.main import main

    pd.DataFrame(toy_sentiment(32)).to_csv(tmp_path / "train.csv", index=False)
    run = tmp_path / "run"
    code = main(["train", "--model", str(folder), "--data", str(tmp_path / "train.csv"), "--eval-data",
                 str(tmp_path / "train.csv"), "--test-data", str(tmp_path / "train.csv"), "--epochs", "2", "--batch-size", "8", "--threads", "1",
                 "--adapter-layers", "top:1", "--cache-frozen-prefix", "--output", str(run)])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "epoch"]
    assert [e["prefix_cache_hits"] for e in epochs] == [0, 32]
