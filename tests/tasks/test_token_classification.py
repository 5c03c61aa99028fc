"""The token-classification task: sub-word alignment, decoding to character spans,
entity metrics against seqeval, and train -> evaluate -> predict on a tiny BERT."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from adapterkit.data import TaskData, load_data, token_classification_from_texts
from adapterkit.data.errors import DataError
from adapterkit.tasks import get_task
from adapterkit.tasks.entity_metrics import entity_metrics
from adapterkit.tasks.token_classification import Entity, TagPrediction, WordLogits
from tests.tiny_ner import tiny_ner_tokenizer
from tests.tolerances import assert_close_scaled, forward_ops

TASK = "token-classification"
LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_ner_tokenizer(tmp_path_factory.mktemp("tok"))


def _data(rows: list[dict]) -> TaskData:
    return load_data(rows, task=TASK, labels=LABELS)


def test_first_sub_token_carries_the_label(tokenizer):
    data = _data([{"tokens": ["John", "visited", "NewYork", "megacorp"], "tags": ["B-PER", "O", "B-LOC", "B-ORG"]}])
    task = get_task(TASK)
    [feature] = task.encode(data, tokenizer, max_length=64)
    tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert tokens == ["[CLS]", "john", "visited", "new", "##york", "mega", "##co", "##rp", "[SEP]"]
    #                  -100    B-PER   O          B-LOC  -100      B-ORG   -100   -100    -100
    assert feature["labels"] == [-100, 5, 0, 1, -100, 3, -100, -100, -100]
    assert feature["_positions"] == [1, 2, 3, 5] and feature["_words"] == [0, 1, 2, 3]


def test_long_sentences_become_overlapping_windows(tokenizer):
    """max_length 6 leaves 4 sub-tokens a window, and consecutive windows share 2 of them."""
    data = _data([{"tokens": ["john", "visited", "newyork", "and", "lima"],
                   "tags": ["B-PER", "O", "B-LOC", "O", "B-LOC"]}])
    task = get_task(TASK)
    first, second = task.encode(data, tokenizer, max_length=6)
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == ["[CLS]", "john", "visited", "new", "##york", "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(second["input_ids"]) == ["[CLS]", "new", "##york", "and", "lima", "[SEP]"]
    assert first["_example"] == second["_example"] == 0
    assert first["_words"] == [0, 1, 2] and second["_words"] == [2, 3, 4]
    assert first["labels"] == [-100, 5, 0, 1, -100, -100] and second["labels"] == [-100, 1, -100, 0, 1, -100]
    # Sub-tokens to the nearer cut edge; the sentence's own ends cut nothing. "newyork" has one
    # sub-token of context after it in the first window and none before it in the second.
    assert first["_margins"] == [3, 2, 1] and second["_margins"] == [0, 2, 3]
    vote = {tag: np.eye(len(LABELS))[LABELS.index(tag)] * 5.0 for tag in LABELS}
    outputs = [WordLogits(np.array([0, 1, 2]), np.stack([vote["B-PER"], vote["O"], vote["B-LOC"]])),
               WordLogits(np.array([2, 3, 4]), np.stack([vote["O"], vote["O"], vote["B-LOC"]]))]
    [prediction] = task.decode(data, [first, second], outputs)
    assert prediction.tags == ["B-PER", "O", "B-LOC", "O", "B-LOC"]  # "newyork" from the first window


def test_collate_infer_and_loss(tokenizer):
    torch.manual_seed(0)
    from transformers import BertConfig, BertForTokenClassification

    model = BertForTokenClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32,
                                                  num_labels=len(LABELS))).eval()
    data = _data([{"tokens": ["john"], "tags": ["B-PER"]},
                  {"tokens": ["mary", "visited", "megacorp"], "tags": ["B-PER", "O", "B-ORG"]}])
    task = get_task(TASK)
    features = task.encode(data, tokenizer, 64)
    batch = task.collate(features, tokenizer)
    assert batch["_positions"].tolist() == [[1, -1, -1], [1, 2, 3]]
    outputs = task.infer(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert outputs[0].words.tolist() == [0] and outputs[1].words.tolist() == [0, 1, 2]
    assert_close_scaled(torch.as_tensor(outputs[1].logits), full[1, [1, 2, 3]], ops=forward_ops(model))
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, len(LABELS)), batch["labels"].reshape(-1))
    # each word's cross-entropy moves by at most twice its logits' rounding error; then a
    # log-sum-exp over the labels and a mean over the words
    ops = forward_ops(model) + len(LABELS) + batch["labels"].numel()
    scale = 2 * max(float(full.detach().abs().max()), expected.item())
    assert_close_scaled(task.loss(model, batch).item(), expected, ops=ops, scale=scale)
    metrics = task.score(data, task.decode(data, features, outputs), outputs)
    assert_close_scaled(metrics["loss"], expected, ops=ops, scale=scale)  # same words, same mean
    batch["labels"][:] = -100
    assert task.loss(model, batch).item() == 0.0  # no labelled word: zero, not NaN


def test_decode_gives_character_spans():
    task = get_task(TASK)
    text = "Then John  Smith flew to Paris."
    data = token_classification_from_texts([text], LABELS)
    assert data.examples[0]["tokens"] == ["Then", "John", "Smith", "flew", "to", "Paris", "."]
    tags = ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "O"]
    logits = np.stack([np.eye(len(LABELS))[LABELS.index(t)] * 4.0 for t in tags])
    [prediction] = task.decode(data, [{"_example": 0}], [WordLogits(np.arange(7), logits)])
    assert prediction.tags == tags
    assert [(e.type, e.start, e.end, e.text) for e in prediction.entities] == \
        [("PER", 5, 16, "John  Smith"), ("LOC", 25, 30, "Paris")]
    probability = float(np.exp(4.0) / (np.exp(4.0) + len(LABELS) - 1))
    assert prediction.entities[0].score == pytest.approx(probability)
    assert task.format(prediction) == "PER 'John  Smith' 5:16 (0.90); LOC 'Paris' 25:30 (0.90)"
    assert task.to_json(prediction)["entities"][1] == {"type": "LOC", "start": 25, "end": 30, "text": "Paris",
                                                       "score": pytest.approx(probability)}
    assert task.format(TagPrediction(["O"], [])) == "(no entities)"


def test_relabel_converts_scheme_and_rejects_unknown_types():
    task = get_task(TASK)
    bioes = load_data([{"tokens": list("abc"), "tags": ["B-PER", "E-PER", "S-LOC"]}], task=TASK)
    assert task.relabel(bioes, LABELS).examples[0]["tags"] == ["B-PER", "I-PER", "B-LOC"]
    with pytest.raises(DataError, match="'LOC' was never seen"):
        task.relabel(bioes, ["O", "B-PER", "I-PER"])


def _seqeval_metrics(gold, guess):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = classification_report(gold, guess, output_dict=True, zero_division=0)
        overall = (precision_score(gold, guess), recall_score(gold, guess), f1_score(gold, guess))
    return overall, report


@pytest.mark.parametrize("prefixes", ["BI", "BIES"])
def test_entity_metrics_match_seqeval(prefixes):
    """Random, often malformed sequences (I- without B-, type changes) in IOB1/IOB2 or BIOES."""
    rng = random.Random(len(prefixes))
    tags = ["O"] * 6 + [f"{p}-{t}" for p in prefixes for t in ("PER", "LOC", "MISC")]
    gold, guess = [], []
    for _ in range(300):
        n = rng.randint(1, 12)
        gold.append([rng.choice(tags) for _ in range(n)])
        # A prediction that is often right, so counts are not all zero.
        guess.append([g if rng.random() < 0.7 else rng.choice(tags) for g in gold[-1]])
    ours = entity_metrics(gold, guess)
    (precision, recall, f1), report = _seqeval_metrics(gold, guess)
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((precision, recall, f1))
    for type_, values in ours["per_class"].items():
        assert values["precision"] == pytest.approx(report[type_]["precision"])
        assert values["recall"] == pytest.approx(report[type_]["recall"])
        assert values["f1"] == pytest.approx(report[type_]["f1-score"])
        assert values["support"] == report[type_]["support"]


def test_entity_metrics_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "O"]]
    guess = [["B-PER", "I-PER", "O", "B-PER"], ["B-ORG", "O"]]  # PER right, LOC missed as PER, ORG right
    metrics = entity_metrics(gold, guess)
    assert (metrics["precision"], metrics["recall"]) == (2 / 3, 2 / 3)
    assert metrics["per_class"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["per_class"]["PER"]["precision"] == 0.5 and metrics["accuracy"] == 4 / 6
    assert entity_metrics([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError, match="sentence 1"):
        entity_metrics([["O", "O"]], [["O"]])


def test_entity_tuple_fields():
    assert Entity("PER", 0, 4, "John", 0.9)._fields == ("type", "start", "end", "text", "score")
