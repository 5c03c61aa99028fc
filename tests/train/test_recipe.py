"""The ``adapterkit train`` recipe with every adapter method: train, save, reload, same metrics."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from adapterkit.evaluate import evaluate
from adapterkit.models import adapter_info, load_with_adapter
from adapterkit.train.recipe import RunConfig, run
from tests.tiny_text import tiny_bert_folder, toy_sentiment


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    tiny_bert_folder(root / "model")
    pd.DataFrame(toy_sentiment(64)).to_csv(root / "train.csv", index=False)
    pd.DataFrame(toy_sentiment(24, seed=1)).to_csv(root / "test.csv", index=False)
    return root


@pytest.mark.parametrize("method", ["lora", "bottleneck", "ia3", "prefix", "prompt", "bitfit"])
def test_every_method_trains_saves_and_reloads(files, method, tmp_path):
    config = RunConfig(model=str(files / "model"), data=str(files / "train.csv"), test_data=str(files / "test.csv"),
                       method=method, output=str(tmp_path / "run"),
                       train={"max_steps": 3, "batch_size": 8, "num_threads": 1, "progress": False})
    result = run(config)
    assert result.train.step == 3 and len(result.train.history) == 1  # evaluated at the end
    assert 0 < result.trainable["trainable"] < result.trainable["total"]
    info = adapter_info(result.adapter_dir)
    assert info["method"] in (method, f"{method}_tuning") and info["labels"] == ["neg", "pos"]

    model, tokenizer, metadata = load_with_adapter(result.adapter_dir)
    again = evaluate(model, tokenizer, files / "test.csv", max_length=metadata["max_length"])
    assert again["accuracy"] == pytest.approx(result.test_metrics["accuracy"])
    assert again["loss"] == pytest.approx(result.test_metrics["loss"], rel=1e-5)


def test_a_file_without_eval_data_holds_out_ten_percent(files, tmp_path):
    result = run(RunConfig(model=str(files / "model"), data=str(files / "train.csv"), output=str(tmp_path / "run"),
                           train={"max_steps": 1, "batch_size": 8, "num_threads": 1, "progress": False}))
    assert result.train.metrics["count"] == 6  # 10% of 64, rounded, per class 3 + 3
    assert result.test_metrics == {}  # no test file, no test split


def test_same_config_same_adapter_in_any_process_state(files, tmp_path):
    """The new head and the adapter are initialised from the run's seed, not from whatever
    state the global generator happens to be in."""
    base = tiny_bert_folder(tmp_path / "encoder", with_head=False)  # classify -> a fresh head
    saved = []
    for i in range(2):
        torch.rand(i + 1)  # leave the global generator somewhere else each time
        result = run(RunConfig(model=str(base), data=str(files / "train.csv"), output=str(tmp_path / f"run{i}"),
                               train={"max_steps": 2, "batch_size": 8, "num_threads": 1, "progress": False}))
        saved.append(load_file(f"{result.adapter_dir}/adapter_model.safetensors"))
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


@pytest.mark.filterwarnings("ignore:.*stay in float")
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_run_on_a_quantised_base_records_it_and_reloads_quantised(files, scheme, tmp_path):
    import json

    result = run(RunConfig(model=str(files / "model"), data=str(files / "train.csv"), test_data=str(files / "test.csv"),
                           quantize=scheme, output=str(tmp_path / "run"),
                           train={"max_steps": 3, "batch_size": 8, "num_threads": 1, "progress": False}))
    kit = json.loads((tmp_path / "run" / "adapter" / "adapterkit.json").read_text())
    assert kit["quantization"]["scheme"] == scheme
    assert result.trainable["base_bytes"] < run_float_base_bytes(files)
    model, tokenizer, metadata = load_with_adapter(result.adapter_dir, quantize=scheme)
    again = evaluate(model, tokenizer, files / "test.csv", max_length=metadata["max_length"])
    assert again["accuracy"] == pytest.approx(result.test_metrics["accuracy"])
    assert again["loss"] == pytest.approx(result.test_metrics["loss"], rel=1e-5)


def run_float_base_bytes(files) -> int:
    from adapterkit.core import add_adapter, trainable_summary
    from adapterkit.methods import LoraConfig
    from adapterkit.models import load_model

    model, _ = load_model(files / "model", labels=["neg", "pos"])
    add_adapter(model, "x", LoraConfig())
    return trainable_summary(model)["base_bytes"]
