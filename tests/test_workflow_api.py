"""The README quickstart through the top-level names: load, adapt, train, evaluate, predict, save, reload."""

from __future__ import annotations

import inspect

import pytest
import torch

import adapterkit as ak
from tests.tiny_text import tiny_bert_folder, toy_sentiment
from tests.tolerances import assert_close_scaled, forward_ops


def test_quickstart_round_trip(tmp_path):
    folder = tiny_bert_folder(tmp_path / "model")
    train_data = ak.load_data(toy_sentiment(160))
    eval_rows = toy_sentiment(40, seed=1)
    eval_data = ak.load_data(eval_rows, labels=train_data.labels)
    model, tokenizer = ak.load_model(folder, task="classification", labels=train_data.labels)
    ak.add_adapter(model, "toy", ak.LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
    result = ak.train(model, tokenizer, train_data, eval_data,
                      ak.TrainConfig(epochs=6, batch_size=16, lr=3e-2, num_threads=1, progress=False))
    assert isinstance(result, ak.TrainResult)
    metrics = ak.evaluate(model, tokenizer, eval_data)
    assert metrics["accuracy"] == pytest.approx(result.best_metric) and metrics["accuracy"] >= 0.8
    # predict labels the evaluation set as evaluate scored it (which sentences a toy run of six epochs
    # gets wrong depends on its random draws)
    texts = [row["text"] for row in eval_rows]
    before = ak.predict(model, tokenizer, texts)
    right = sum(label == row["label"] for (label, _), row in zip(before, eval_rows))
    assert right == round(metrics["accuracy"] * len(eval_rows))

    ak.save_adapter(model, "toy", tmp_path / "adapter")
    fresh, tokenizer = ak.load_model(folder, labels=train_data.labels)
    assert ak.load_adapter(fresh, tmp_path / "adapter") == "toy"
    fresh.eval()
    after = ak.predict(fresh, tokenizer, texts)
    assert [label for label, _ in after] == [label for label, _ in before]
    with torch.no_grad():  # a softmax probability moves by at most half the largest change of its logits
        largest = float(fresh(**tokenizer(texts, padding=True, return_tensors="pt")).logits.abs().max())
    assert_close_scaled([score for _, score in after], [score for _, score in before], ops=forward_ops(fresh),
                        scale=largest, dtype=torch.float32)


def test_train_and_evaluate_are_callable_packages():
    import adapterkit.evaluate
    import adapterkit.train

    assert callable(adapterkit.train) and adapterkit.train.TrainConfig is ak.TrainConfig
    assert "train_data" in inspect.signature(ak.train).parameters
    assert "tokenizer" in inspect.signature(ak.evaluate).parameters
