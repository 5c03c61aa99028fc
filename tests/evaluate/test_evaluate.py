"""``evaluate`` and ``predict`` against a per-example reference computation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from adapterkit.data import DataError, load_data
from adapterkit.evaluate import evaluate, predict
from adapterkit.tasks.metrics import classification_metrics
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment
from tests.tolerances import assert_close_scaled, forward_ops


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    folder = tiny_bert_folder(tmp_path_factory.mktemp("tiny"), dropout=0.0)
    data = load_data(toy_sentiment(50, seed=3))
    model, tokenizer = tiny_lora_classifier(folder, data.labels, dropout=0.0)
    with torch.no_grad():  # a non-trivial adapter: predictions differ from the base model's
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval(), tokenizer, data


def _reference_logits(model, tokenizer, texts):
    """One text at a time: no padding, no batching."""
    with torch.no_grad():
        return np.stack([model(**tokenizer(t, return_tensors="pt")).logits[0].numpy() for t in texts])


def test_metrics_match_a_one_by_one_reference(model_and_data, tmp_path):
    model, tokenizer, data = model_and_data
    logits = _reference_logits(model, tokenizer, [e["text"] for e in data.examples])
    refs = [e["label"] for e in data.examples]
    expected = classification_metrics(refs, logits.argmax(1).tolist(), data.labels)
    got = evaluate(model, tokenizer, data, batch_size=7, output_dir=tmp_path)
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "confusion_matrix", "per_class"):
        assert got[key] == pytest.approx(expected[key]) if isinstance(expected[key], float) else got[key] == expected[key]
    expected_loss = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(refs)).item()
    # Batched (padded) against one text at a time: each example's cross-entropy moves by at most
    # twice its logits' rounding error; then a log-sum-exp over the labels and a mean over the texts.
    assert_close_scaled(got["loss"], expected_loss, ops=forward_ops(model) + len(data.labels) + len(refs),
                        scale=2 * max(float(np.abs(logits).max()), expected_loss), dtype=torch.float32)
    assert 0.0 < got["accuracy"] < 1.0
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == got["accuracy"]


def test_predict_gives_label_and_softmax_score(model_and_data):
    model, tokenizer, _ = model_and_data
    texts = ["good film", "the plot was dull", "a very good movie and a good story"]
    logits = _reference_logits(model, tokenizer, texts)
    probabilities = torch.softmax(torch.tensor(logits), dim=-1)
    predictions = predict(model, tokenizer, texts, batch_size=2)
    assert [label for label, _ in predictions] == [["neg", "pos"][i] for i in probabilities.argmax(1)]
    # a softmax probability moves by at most half the largest change of its logits
    assert_close_scaled([score for _, score in predictions], probabilities.max(1).values, ops=forward_ops(model),
                        scale=float(np.abs(logits).max()), dtype=torch.float32)
    assert predict(model, tokenizer, "good film")[0] == predictions[0]


def test_evaluate_a_file_with_its_own_label_order(model_and_data, tmp_path):
    model, tokenizer, data = model_and_data
    rows = [{"sentence": e["text"], "y": data.labels[e["label"]]} for e in data.examples]
    path = tmp_path / "eval.csv"
    pd.DataFrame(rows[::-1]).to_csv(path, index=False)  # reversed: another row order, same metrics
    from_file = evaluate(model, tokenizer, path, text_column="sentence", label_column="y")
    assert from_file["accuracy"] == pytest.approx(evaluate(model, tokenizer, data)["accuracy"])
    path.write_text("sentence,y\ngood,pos\nmeh,neutral\n")
    with pytest.raises(DataError, match="'neutral' was never seen in training") as err:
        evaluate(model, tokenizer, path, text_column="sentence", label_column="y")
    assert err.value.where == "line 3"


def test_predict_routes_each_text_to_its_adapter(tmp_path):
    import adapterkit as ak

    folder = tiny_bert_folder(tmp_path / "tiny", dropout=0.0)
    data = load_data(toy_sentiment(10, seed=1))
    model, tokenizer = tiny_lora_classifier(folder, data.labels, dropout=0.0)
    ak.add_adapter(model, "other", ak.LoraConfig(rank=2))
    with torch.no_grad():  # two clearly different adapters, heads included
        for i, name in enumerate(ak.list_adapters(model)):
            for param in ak.adapter_parameters(model, name).values():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
    model.eval()
    texts = ["good film", "the plot was dull", "a great story", "bad acting"]
    names = [ak.list_adapters(model)[0], "other", None, "other"]
    expected, largest = [], 0.0
    for text, name in zip(texts, names):
        if name is None:
            with ak.adapters_disabled(model):
                expected.append(predict(model, tokenizer, [text])[0])
                largest = max(largest, float(np.abs(_reference_logits(model, tokenizer, [text])).max()))
        else:
            ak.set_active(model, name)
            expected.append(predict(model, tokenizer, [text])[0])
            largest = max(largest, float(np.abs(_reference_logits(model, tokenizer, [text])).max()))
    routed = predict(model, tokenizer, texts, batch_size=4, adapter_names=names)
    assert [label for label, _ in routed] == [label for label, _ in expected]
    # a softmax probability moves by at most half the largest change of its logits
    assert_close_scaled([score for _, score in routed], [score for _, score in expected],
                        ops=forward_ops(model), scale=largest, dtype=torch.float32)
    with pytest.raises(ValueError, match="one per input"):
        predict(model, tokenizer, texts, adapter_names=names[:2])
