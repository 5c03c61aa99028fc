"""Extractive QA: windows and answer positions, span decoding, SQuAD metrics, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterkit as ak
from adapterkit.data import load_data
from adapterkit.data.examples import TaskData
from adapterkit.data.squad import qa_example
from adapterkit.evaluate import evaluate, predict
from adapterkit.models import load_model
from adapterkit.tasks import get_task
from adapterkit.tasks.qa_metrics import normalize_answer, squad_scores, token_f1
from adapterkit.tasks.qa_spans import best_span, best_span_over_windows
from adapterkit.tasks.question_answering import QuestionAnsweringTask, SpanLogits
from adapterkit.train import TrainConfig, train
from tests.tiny_qa import tiny_qa_folder, tiny_qa_tokenizer, toy_colours

# "w0 w1 ... w39": w0-w9 take 3 characters with their space, w10-w39 take 4.
LONG_CONTEXT = " ".join(f"w{i}" for i in range(40))


def char_of(word: int) -> int:
    """Hand-computed character offset of ``w<word>`` in ``LONG_CONTEXT``."""
    return 3 * word if word < 10 else 30 + 4 * (word - 10)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return tiny_qa_tokenizer(tmp_path_factory.mktemp("tok"))


def long_example(answer_words: range) -> TaskData:
    text = " ".join(f"w{i}" for i in answer_words)
    start = char_of(answer_words[0])
    assert LONG_CONTEXT[start : start + len(text)] == text
    example = qa_example("where is w25 ?", LONG_CONTEXT, [{"text": text, "answer_start": start}], "x")
    return TaskData("question-answering", [example])


def test_windows_overlap_by_stride_and_only_the_context_is_cut(tokenizer) -> None:
    # max_length 18 = [CLS] + 4 question tokens + [SEP] + 11 context tokens + [SEP];
    # with stride 4 window k starts at context token 7k: w0, w7, w14, w21, w28, w35.
    features = QuestionAnsweringTask(stride=4).encode(long_example(range(25, 27)), tokenizer, 18)
    assert len(features) == 6 and all(f["_example"] == 0 for f in features)
    assert all(len(f["input_ids"]) <= 18 for f in features)
    question = tokenizer.convert_tokens_to_ids(["[CLS]", "where", "is", "w25", "?", "[SEP]"])
    assert all(f["input_ids"][:6] == question for f in features)
    first_context = [next(span for span in f["_offsets"] if span is not None) for f in features]
    assert [s for s, _ in first_context] == [char_of(w) for w in (0, 7, 14, 21, 28, 35)]
    assert all(span is None for f in features for span in f["_offsets"][:6])


def test_answer_positions_point_into_the_right_window_and_map_back(tokenizer) -> None:
    features = QuestionAnsweringTask(stride=4).encode(long_example(range(25, 27)), tokenizer, 18)
    positions = [(f["start_positions"], f["end_positions"]) for f in features]
    # Only window 3 (context tokens w21..w31) holds w25 w26: 6 leading tokens + (25 - 21).
    assert positions == [(0, 0), (0, 0), (0, 0), (10, 11), (0, 0), (0, 0)]
    offsets = features[3]["_offsets"]
    assert (offsets[10][0], offsets[11][1]) == (90, 97) == (char_of(25), char_of(26) + 3)
    assert LONG_CONTEXT[90:97] == "w25 w26"


def test_answer_cut_by_a_window_boundary_is_taken_from_the_next_window(tokenizer) -> None:
    # w23 w24 w25: window 2 ends at w24, window 3 (from w21) holds all three.
    features = QuestionAnsweringTask(stride=4).encode(long_example(range(23, 26)), tokenizer, 18)
    positions = [(f["start_positions"], f["end_positions"]) for f in features]
    assert positions == [(0, 0), (0, 0), (0, 0), (8, 10), (0, 0), (0, 0)]


def test_decoding_the_training_positions_gives_back_the_answer(tokenizer) -> None:
    task = QuestionAnsweringTask(stride=4)
    data = long_example(range(25, 27))
    features = task.encode(data, tokenizer, 18)
    outputs = []
    for f in features:  # logits that point at each window's training positions
        start, end = np.zeros(len(f["input_ids"])), np.zeros(len(f["input_ids"]))
        start[f["start_positions"]] += 5.0
        end[f["end_positions"]] += 5.0
        outputs.append(SpanLogits(start, end, None))
    [prediction] = task.decode(data, features, outputs)
    assert (prediction.answer, prediction.start, prediction.end) == ("w25 w26", 90, 97)


def test_long_questions_are_clipped_to_leave_room_for_the_context(tokenizer) -> None:
    example = qa_example(" ".join(["where"] * 30), "w1 w2 red w3", [{"text": "red", "answer_start": 6}])
    features = QuestionAnsweringTask(stride=4).encode(TaskData("question-answering", [example]), tokenizer, 18)
    assert all(len(f["input_ids"]) <= 18 for f in features)
    assert any(f["start_positions"] > 0 for f in features)


CONTEXT_OFFSETS = [None, None, None, (0, 2), (3, 5), (6, 8), None]  # [CLS] q q c c c [SEP]


@pytest.mark.parametrize(
    "start, end, offsets, max_len, n_best, expected",
    [
        # question and special tokens score highest but are not context
        ([9, 8, 0, 1, 2, 0, 7], [9, 0, 8, 0, 0, 3, 9], CONTEXT_OFFSETS, 30, 20, (4, 5, 3, 8)),
        # start 3 + end 1 scores 11 but ends before it starts; best valid is (1, 1)
        ([0, 0.5, 0, 5, 0, 0], [0, 6, 0, 0, 1, 0], [(3 * i, 3 * i + 2) for i in range(6)], 30, 20, (1, 1, 3, 5)),
        # (0, 5) scores 11 but is 6 tokens long; best within 3 tokens is (3, 5)
        ([5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 6], [(3 * i, 3 * i + 2) for i in range(6)], 3, 20, (3, 5, 9, 17)),
        # only the top start (1) and top end (0) are paired with n_best=1: nothing valid
        ([0, 3, 2], [4, 0, 3], [(0, 1), (2, 3), (4, 5)], 30, 1, None),
        ([0, 3, 2], [4, 0, 3], [(0, 1), (2, 3), (4, 5)], 30, 2, (1, 2, 2, 5)),
    ],
)
def test_best_span_from_crafted_logits(start, end, offsets, max_len, n_best, expected) -> None:
    span = best_span(np.array(start, float), np.array(end, float), offsets, max_len, n_best)
    if expected is None:
        assert span is None
        return
    assert (span.start_token, span.end_token, span.start_char, span.end_char) == expected
    assert span.score == pytest.approx(start[expected[0]] + end[expected[1]])
    p_start = math.exp(start[expected[0]]) / sum(math.exp(x) for x in start)
    p_end = math.exp(end[expected[1]]) / sum(math.exp(x) for x in end)
    assert span.probability == pytest.approx(p_start * p_end)


def test_best_span_matches_exhaustive_search_and_windows_compete() -> None:
    rng = np.random.default_rng(0)
    offsets = [None] * 5 + [(2 * i, 2 * i + 1) for i in range(25)] + [None]
    for _ in range(20):
        start, end = rng.normal(size=31), rng.normal(size=31)
        valid = [(start[s] + end[e], s, e) for s in range(31) for e in range(s, min(s + 4, 31))
                 if offsets[s] is not None and offsets[e] is not None]
        score, s, e = max(valid)
        span = best_span(start, end, offsets, max_answer_length=4, n_best=31)
        assert (span.start_token, span.end_token) == (s, e) and span.score == pytest.approx(score)
    low = (np.zeros(31), np.zeros(31), offsets)
    high_start, high_end = np.zeros(31), np.zeros(31)
    high_start[7], high_end[8] = 2.0, 2.0
    window, span = best_span_over_windows([low, (high_start, high_end, offsets), low])
    assert window == 1 and (span.start_char, span.end_char) == (4, 7)


def test_official_normalisation_and_scores_by_hand() -> None:
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("the theory of U.S. law") == "theory of us law"
    assert normalize_answer("An apple") == normalize_answer("apple.") == "apple"
    # "big red ball" vs "red ball game": 2 shared tokens, P = R = 2/3
    assert token_f1("the big red ball", "a red ball game") == pytest.approx(2 / 3)
    # "x x y" vs "x y": shared counts min(2,1) + 1 = 2, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("x x y", "x y") == pytest.approx(0.8)
    assert token_f1("the", "a") == 0.0  # both normalise to nothing
    scores = squad_scores(["Denver Broncos", "the big red ball", "nothing"],
                          [["Broncos", "denver broncos!"], ["a red ball game"], ["something"]])
    # EM: 1, 0, 0; F1: max(2/3 vs "Broncos", 1) = 1, 2/3, 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="no reference"):
        squad_scores(["a"], [[]])


def test_train_evaluate_predict_end_to_end(tmp_path: Path) -> None:
    model, tokenizer = load_model(str(tiny_qa_folder(tmp_path / "model")), task="question-answering")
    train_data = load_data(toy_colours(192, seed=0), task="question-answering")
    eval_data = load_data(toy_colours(32, seed=1), task="question-answering")
    ak.add_adapter(model, "qa", ak.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    before = evaluate(model, tokenizer, eval_data, max_length=32)
    torch.manual_seed(0)
    result = train(model, tokenizer, train_data, eval_data,
                   TrainConfig(max_steps=60, batch_size=16, lr=3e-2, max_length=32, eval_every=60,
                               progress=False, num_threads=1))
    after = evaluate(model, tokenizer, eval_data, max_length=32)
    assert after["loss"] < before["loss"]
    assert after["f1"] == pytest.approx(result.metrics["f1"])

    pairs = [(r["question"], r["context"]) for r in toy_colours(4, seed=2)]
    predictions = predict(model, tokenizer, pairs, max_length=32)
    assert len(predictions) == 4
    for (question, context), p in zip(pairs, predictions):
        assert p.answer == context[p.start : p.end] and 0.0 <= p.score <= 1.0
    scores = squad_scores([p.answer for p in predictions],
                          [[r["answers"][0]["text"]] for r in toy_colours(4, seed=2)])
    metrics = evaluate(model, tokenizer, load_data(toy_colours(4, seed=2), task="question-answering"),
                       max_length=32)
    assert metrics["f1"] == pytest.approx(scores["f1"])
    assert get_task("question-answering").to_json(predictions[0])["answer"] == predictions[0].answer

