"""The classification task: encoding, dynamic padding, decoding and scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterkit.data import TaskData, load_data
from adapterkit.data.errors import DataError
from adapterkit.tasks import LabelPrediction, get_task, pad_features, task_name_for_model
from tests.tiny_text import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_encode_truncates_and_keeps_labels(tokenizer):
    data = load_data([{"text": "good film", "label": "pos"}, {"text": "the plot was very dull and weak", "label": "neg"}])
    task = get_task("classification")
    features = task.encode(data, tokenizer, max_length=6)
    assert [len(f["input_ids"]) for f in features] == [4, 6]  # [CLS] good film [SEP]; truncated to 6
    assert [f["labels"] for f in features] == [1, 0]
    assert [f["_example"] for f in features] == [0, 1]
    assert tokenizer.convert_ids_to_tokens(features[0]["input_ids"]) == ["[CLS]", "good", "film", "[SEP]"]


def test_collate_pads_to_the_longest_in_the_batch(tokenizer):
    task = get_task("classification")
    data = load_data([{"text": "good", "label": "a"}, {"text": "the film was good", "label": "b"},
                      {"text": "a very very very long and dull story", "label": "a"}])
    features = task.encode(data, tokenizer, 64)
    batch = task.collate(features[:2], tokenizer)
    assert batch["input_ids"].shape == (2, 6)  # longest of the two, not of the data set
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["input_ids"][0, 3:].tolist() == [tokenizer.pad_token_id] * 3
    assert batch["labels"].tolist() == [0, 1]
    assert "_example" not in batch


def test_pad_features_left_side_and_label_padding(tokenizer):
    features = [{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": [8], "labels": [4]}]
    tokenizer.padding_side = "left"
    try:
        batch = pad_features(features, tokenizer)
    finally:
        tokenizer.padding_side = "right"
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["labels"].tolist() == [[1, 2, 3], [-100, -100, 4]]


def test_decode_and_score_match_a_reference():
    task = get_task("classification")
    data = TaskData("classification", [{"text": "x", "label": 0}, {"text": "y", "label": 1},
                                       {"text": "z", "label": 1}], ["neg", "pos"])
    logits = [np.array([2.0, 0.0]), np.array([0.0, 1.0]), np.array([3.0, -1.0])]
    predictions = task.decode(data, [{} for _ in logits], logits)
    probabilities = torch.softmax(torch.tensor(np.stack(logits)), dim=-1)
    assert [p.label for p in predictions] == ["neg", "pos", "neg"]
    assert [p.score for p in predictions] == pytest.approx(probabilities.max(dim=-1).values.tolist())
    metrics = task.score(data, predictions, logits)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    expected_loss = torch.nn.functional.cross_entropy(torch.tensor(np.stack(logits)), torch.tensor([0, 1, 1]))
    assert metrics["loss"] == pytest.approx(expected_loss.item())
    assert task.format(LabelPrediction("pos", 0.91234)) == "pos\t0.9123"


def test_relabel_reorders_and_rejects_unknown_labels():
    task = get_task("classification")
    data = TaskData("classification", [{"text": "x", "label": 0, "where": "line 2"}], ["pos"], "eval.csv")
    assert task.relabel(data, ["neg", "pos"]).examples[0]["label"] == 1
    with pytest.raises(DataError, match="never seen in training") as err:
        task.relabel(data, ["neg", "other"])
    assert err.value.where == "line 2"


def test_task_of_a_model_from_its_head_class():
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    config = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8)
    assert task_name_for_model(BertForSequenceClassification(config)) == "classification"
    assert task_name_for_model(BertForTokenClassification(config)) == "token-classification"
    with pytest.raises(ValueError, match="unknown task"):
        get_task("summarisation")
