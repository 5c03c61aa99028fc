"""NER on sentences longer than ``max_length``: windows instead of truncation.

Every word of a long sentence must get exactly one prediction, and entity F1
must count every gold entity. The exact references come from models that are
*context-free*: a word's logits depend on its own sub-token only, not on its
position or its neighbours, so cutting a sentence into windows cannot change
them. Then the windowed run at ``max_length=16`` must reproduce, word for
word, a run at a ``max_length`` that holds each sentence whole.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

import adapterkit as ak
from adapterkit.data import TaskData, load_data
from adapterkit.data.tagging import entity_spans
from adapterkit.errors import UsageError
from adapterkit.evaluate import evaluate, predict
from adapterkit.runtime.inference import run_inference
from adapterkit.models import load_model
from adapterkit.tasks import get_task
from adapterkit.tasks.entity_metrics import entity_metrics
from adapterkit.tasks.token_classification import TokenClassificationTask, WordLogits
from adapterkit.tasks.word_windows import merge_windows, window_stride
from adapterkit.train import TrainConfig, train
from tests.tiny_ner import CITIES, ORGS, PEOPLE, SURNAMES, long_toy_ner, tiny_ner_folder, tiny_ner_tokenizer
from tests.tolerances import assert_close_scaled, forward_ops

TASK = "token-classification"
LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
SHORT = 16  # 14 sub-tokens a window; the long sentences below run to about 40
WHOLE = 128  # holds every sentence below in one window


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_ner_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sentences() -> TaskData:
    return load_data(long_toy_ner(24, parts=5, seed=5), task=TASK, labels=LABELS)


def _head_config(tokenizer, **sizes) -> BertConfig:
    return BertConfig(vocab_size=len(tokenizer), max_position_embeddings=WHOLE, num_labels=len(LABELS),
                      id2label=dict(enumerate(LABELS)), label2id={t: i for i, t in enumerate(LABELS)}, **sizes)


# The lexicon tagger's tag for each sub-token (others: "O"), with two deliberate mistakes so that
# its F1 is neither 0 nor 1: "lagos" is called an organisation and "wong" is not part of a name.
LEXICON = {**{p: "B-PER" for p in PEOPLE}, **{s: "I-PER" for s in SURNAMES},
           **{c: "B-LOC" for c in CITIES if c != "newyork"}, "new": "B-LOC",
           **{o: "B-ORG" for o in ORGS if o != "megacorp"}, "mega": "B-ORG",
           "lagos": "B-ORG", "wong": "O"}


def lexicon_model(tokenizer) -> BertForTokenClassification:
    """A BERT with no layers (float64) that tags each word by its first sub-token alone, through ``LEXICON``.

    Position and token-type embeddings are zero, so the hidden state of a
    sub-token is LayerNorm(4 * one-hot(tag)), which is the same for every
    position, window and neighbour; the head reads the tag back from the
    one-hot's coordinate.
    """
    model = BertForTokenClassification(_head_config(tokenizer, hidden_size=16, num_hidden_layers=0,
                                                    num_attention_heads=2, intermediate_size=16)).double().eval()
    with torch.no_grad():
        embeddings = model.bert.embeddings
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
        embeddings.word_embeddings.weight.zero_()
        for token, i in tokenizer.get_vocab().items():
            embeddings.word_embeddings.weight[i, LABELS.index(LEXICON.get(token, "O"))] = 4.0
        model.classifier.weight.zero_()
        model.classifier.weight[:, :len(LABELS)] = torch.eye(len(LABELS))
        model.classifier.bias.zero_()
    return model


def context_free_model(tokenizer) -> BertForTokenClassification:
    """A random 2-layer BERT in float64 whose attention cannot mix tokens, and that ignores positions.

    With the value projection zero (weight and bias), every attention head
    outputs exactly 0 whatever its weights on other tokens, so each layer is
    a function of the token's own hidden state; with zero position
    embeddings that state does not depend on where the token sits either.
    The rest (query/key, feed-forward, layer norms, head) stays random.
    """
    torch.manual_seed(3)
    model = BertForTokenClassification(_head_config(tokenizer, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64))
    model = model.double().eval()
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.zero_()
        for layer in model.bert.encoder.layer:
            layer.attention.self.value.weight.zero_()
            layer.attention.self.value.bias.zero_()
    return model


def _first_sub_tokens(tokenizer, words: list[str]) -> list[int]:
    """The index of each word's first sub-token among the sentence's sub-tokens (no special tokens)."""
    word_ids = tokenizer(words, is_split_into_words=True, add_special_tokens=False).word_ids()
    return [word_ids.index(w) for w in range(len(words))]


@pytest.mark.parametrize("max_length, stride", [(SHORT, None), (SHORT, 0), (SHORT, 3), (SHORT, 100), (5, None)])
def test_windows_cover_every_word_once_per_window(tokenizer, sentences, max_length, stride):
    """Windows are at most ``max_length`` long, overlap by the stride, and label each word in
    exactly the windows that hold its first sub-token."""
    task = TokenClassificationTask(stride=stride)
    features = task.encode(sentences, tokenizer, max_length)
    assert max(sum(f["_example"] == e for f in features) for e in range(len(sentences.examples))) >= 3
    content = max_length - 2
    overlap = window_stride(content, stride)
    assert overlap == min(content // 2 if stride is None else stride, content - 1)
    index = {tag: i for i, tag in enumerate(LABELS)}
    for e, example in enumerate(sentences.examples):
        windows = [f for f in features if f["_example"] == e]
        assert all(len(f["input_ids"]) <= max_length for f in windows)
        full = tokenizer(example["tokens"], is_split_into_words=True, add_special_tokens=False)["input_ids"]
        firsts = _first_sub_tokens(tokenizer, example["tokens"])
        start, labelled = 0, set()
        for window in windows:
            ids = window["input_ids"][1:-1]  # without [CLS] and [SEP]
            assert ids == full[start:start + len(ids)]
            inside = [w for w, first in enumerate(firsts) if start <= first < start + len(ids)]
            assert window["_words"] == inside
            for position, word in zip(window["_positions"], window["_words"]):
                assert window["input_ids"][position] == full[firsts[word]]
                assert window["labels"][position] == index[example["tags"][word]]
            assert sum(label != -100 for label in window["labels"]) == len(inside)
            labelled.update(inside)
            start += len(ids) - overlap
        assert labelled == set(range(len(example["tokens"])))
        assert start + overlap == len(full)  # the last window ends with the sentence


def test_merge_keeps_the_window_with_most_context(tokenizer):
    logits = {k: np.full((1, 2), float(k)) for k in range(4)}
    merged = merge_windows([(0, [5], [1], logits[0]), (0, [5], [4], logits[1]), (0, [5], [4], logits[2]),
                            (1, [2], [0], logits[3]), (0, [1], [9], logits[3])], num_examples=3)
    words, rows = merged[0]
    assert words.tolist() == [1, 5] and rows[:, 0].tolist() == [3.0, 1.0]  # margin 4 wins; a tie keeps the first
    assert merged[1][0].tolist() == [2] and len(merged[2][0]) == 0
    assert window_stride(14, None) == 7 and window_stride(14, 100) == 13 and window_stride(1, None) == 0
    with pytest.raises(UsageError):
        window_stride(0, None)
    with pytest.raises(UsageError, match="no room"):
        get_task(TASK).encode(load_data([{"tokens": ["john"], "tags": ["B-PER"]}], task=TASK, labels=LABELS),
                              tokenizer, 2)


def test_lexicon_tagger_predicts_every_word_windowed(tokenizer, sentences):
    """The lexicon model windowed at 16 tags every word by ``LEXICON``: the same tags, entities
    and metrics as the model run on whole sentences, and as ``LEXICON`` applied by hand."""
    model, task = lexicon_model(tokenizer), get_task(TASK)
    expected = [[LEXICON.get(tokenizer.tokenize(w)[0], "O") for w in e["tokens"]] for e in sentences.examples]
    gold = [e["tags"] for e in sentences.examples]
    windowed, _ = run_inference(model, tokenizer, task, sentences, SHORT)
    whole, whole_outputs = run_inference(model, tokenizer, task, sentences, WHOLE)
    assert len(whole_outputs) == len(sentences.examples)  # one window per sentence
    assert [p.tags for p in windowed] == expected == [p.tags for p in whole]
    assert windowed == whole  # entities, character spans and scores too

    metrics = evaluate(model, tokenizer, sentences, max_length=SHORT)
    reference = entity_metrics(gold, expected)
    assert 0.5 < metrics["f1"] < 1.0
    for key in ("f1", "precision", "recall", "accuracy", "entities", "predicted_entities", "per_class"):
        assert metrics[key] == reference[key] == evaluate(model, tokenizer, sentences, max_length=WHOLE)[key]
    assert metrics["entities"] == sum(len(entity_spans(tags)) for tags in gold)
    assert metrics["loss"] == pytest.approx(evaluate(model, tokenizer, sentences, max_length=WHOLE)["loss"])
    assert _late_entities(tokenizer, sentences) > metrics["entities"] / 4


def _late_entities(tokenizer, data: TaskData) -> int:
    """Gold entities whose first word starts past the first window: those truncation at ``SHORT`` loses."""
    return sum(_first_sub_tokens(tokenizer, e["tokens"])[span.start] >= SHORT - 2
               for e in data.examples for span in entity_spans(e["tags"]))


def test_predict_on_raw_text_windows_too(tokenizer):
    """``predict`` on a plain string longer than the window tags every word, up to the last."""
    model = lexicon_model(tokenizer)
    text = ("john smith visited the megacorp office in newyork and met mary khan from unicef at the acme "
            "works in lima and then ahmed flew from paris to visited lagos with olga")
    [found] = predict(model, tokenizer, [text], max_length=SHORT)
    words = text.split()
    assert len(tokenizer(words, is_split_into_words=True)["input_ids"]) > 2 * SHORT
    assert found.tags == [LEXICON.get(tokenizer.tokenize(w)[0], "O") for w in words]
    assert [(e.type, e.text) for e in found.entities][-4:] == [("PER", "ahmed"), ("LOC", "paris"), ("ORG", "lagos"),
                                                                ("PER", "olga")]
    assert all(text[e.start:e.end] == e.text for e in found.entities)


def test_context_free_random_model_windowed_equals_whole(tokenizer, sentences):
    """For a random model that cannot see context, the merged windows give every word the logits
    of the whole-sentence run (up to rounding), so the same tags, F1 and word-level loss."""
    model, task = context_free_model(tokenizer), get_task(TASK)
    windowed, windowed_outputs = run_inference(model, tokenizer, task, sentences, SHORT)
    whole, whole_outputs = run_inference(model, tokenizer, task, sentences, WHOLE)
    assert len(windowed_outputs) > 2 * len(whole_outputs) == 2 * len(sentences.examples)
    merged = merge_windows([(o.example, o.words, o.margins, o.logits) for o in windowed_outputs],
                           len(sentences.examples))
    for example, (words, logits), reference in zip(sentences.examples, merged, sorted(
            whole_outputs, key=lambda o: o.example)):
        assert words.tolist() == list(range(len(example["tokens"]))) == reference.words.tolist()
        assert_close_scaled(torch.from_numpy(logits), torch.from_numpy(reference.logits), ops=forward_ops(model),
                            dtype=torch.float32)
    assert [p.tags for p in windowed] == [p.tags for p in whole]
    scored = task.score(sentences, windowed, windowed_outputs)
    reference = task.score(sentences, whole, whole_outputs)
    assert scored["f1"] == reference["f1"] and scored["entities"] == reference["entities"]
    assert_close_scaled(scored["loss"], reference["loss"], ops=forward_ops(model) + len(LABELS),
                        dtype=torch.float32)


def test_score_needs_outputs_from_infer(tokenizer):
    data = load_data([{"tokens": ["john"], "tags": ["B-PER"]}], task=TASK, labels=LABELS)
    task = get_task(TASK)
    outputs = [WordLogits(np.array([0]), np.zeros((1, len(LABELS))))]
    predictions = task.decode(data, [{"_example": 0}], outputs)
    with pytest.raises(UsageError, match="example index"):
        task.score(data, predictions, outputs)


def test_training_on_long_sentences_counts_every_entity(tmp_path):
    """A LoRA run on sentences two to three windows long learns the tags; on longer ones its F1 counts
    every gold entity of the evaluation data, a third of which lie past the first window
    (150 steps, under a second)."""
    folder = tiny_ner_folder(tmp_path / "tiny_ner")
    train_data = load_data(long_toy_ner(240, parts=3, seed=0), task=TASK)
    eval_data = load_data(long_toy_ner(30, parts=4, seed=1), task=TASK, labels=train_data.labels)
    model, tokenizer = load_model(folder, task=TASK, labels=train_data.labels)
    ak.add_adapter(model, "ner", ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    config = TrainConfig(epochs=6, batch_size=16, lr=5e-2, warmup_ratio=0.0, eval_every=1000, num_threads=1,
                         max_length=SHORT, progress=False)
    result = train(model, tokenizer, train_data, eval_data, config)
    gold_entities = sum(len(entity_spans(e["tags"])) for e in eval_data.examples)
    assert result.metrics["entities"] == gold_entities and result.metrics["count"] == 30
    assert result.metrics["f1"] > 0.9 and _late_entities(tokenizer, eval_data) > gold_entities / 4
    metrics = evaluate(model, tokenizer, eval_data, max_length=SHORT)
    assert metrics["f1"] == pytest.approx(result.metrics["f1"]) and metrics["entities"] == gold_entities
    assert sum(v["support"] for v in metrics["per_class"].values()) == gold_entities
