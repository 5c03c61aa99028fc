"""Each task's default length, and the truncation report, against hand-made data.

The tiny tokenizers are word level: a sentence of n known words is n tokens
plus the model's special tokens, so every expected count can be written down.
"""

from __future__ import annotations

import warnings

import pandas as pd
import pytest

from adapterkit.data import load_data
from adapterkit.models import load_model
from adapterkit.tasks import get_task
from adapterkit.tasks.lengths import covering_length, model_limit, report_truncation
from adapterkit.train import TrainConfig, train
from tests.tiny_lm import tiny_gpt2, tiny_tokenizer
from tests.tiny_text import FILLER, tiny_bert_folder


def _sentences(word_counts: list[int]) -> list[dict]:
    return [{"text": " ".join((FILLER * 8)[:n]), "label": "pos" if i % 2 else "neg"}
            for i, n in enumerate(word_counts)]


def test_covering_length_takes_the_99th_percentile_rounded_up_and_capped():
    assert covering_length([5] * 99 + [60], limit=512) == 8  # one outlier in 100 does not count
    assert covering_length([5] * 98 + [60] * 2, limit=512) == 64  # two do
    assert covering_length([700] * 100, limit=512) == 512
    assert covering_length([], limit=512) == 64


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tiny_bert_folder(tmp_path_factory.mktemp("bert"))  # 64 position embeddings
    return load_model(folder, labels=["neg", "pos"])


def test_classification_default_fits_99_percent_of_the_training_examples(bert):
    model, tokenizer = bert
    task = get_task("classification")
    data = load_data(_sentences([10] * 198 + [40] * 2), task="classification")
    # 10 words + [CLS] + [SEP] = 12 tokens for 99% of the examples -> 16
    assert task.default_lengths(data, tokenizer, model) == {"max_length": 16}
    long = load_data(_sentences([100] * 10), task="classification")
    assert model_limit(model) == 64 and task.default_lengths(long, tokenizer, model) == {"max_length": 64}


def test_question_answering_uses_384_token_windows_up_to_the_model_limit(bert):
    model, tokenizer = bert
    task = get_task("question-answering")
    assert task.default_lengths(None, tokenizer, model) == {"max_length": 64}  # this model's limit
    model.config.max_position_embeddings = 4096
    try:
        assert task.default_lengths(None, tokenizer, model) == {"max_length": 384}
    finally:
        model.config.max_position_embeddings = 64


def test_causal_lm_uses_the_context_up_to_1024():
    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(tokenizer)
    task = get_task("causal-lm")
    model.config.n_positions = 2048
    assert task.default_lengths(None, tokenizer, model) == {"max_length": 1024}
    model.config.n_positions = 256
    assert task.default_lengths(None, tokenizer, model) == {"max_length": 256}


def test_classification_truncation_report_counts_examples_and_tokens(bert, tmp_path, capsys):
    model, tokenizer = bert
    path = tmp_path / "reviews.csv"
    pd.DataFrame(_sentences([4, 4, 4, 10, 20])).to_csv(path, index=False)  # 6, 6, 6, 12, 22 tokens
    data = load_data(str(path), task="classification")
    [report] = get_task("classification").truncation(data, tokenizer, 8)
    assert (report.examples, report.cut, report.tokens, report.lost) == (5, 2, 52, 4 + 14)
    report_truncation([report], str(path))
    err = capsys.readouterr().err
    assert (f"truncation ({path}): 2 of 5 examples are longer than --max-length 8; 18 of 52 tokens (34.6%) "
            "are cut. --max-length N changes it") in err


def test_a_run_prints_the_report_and_warns_when_responses_are_cut(capsys):
    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(tokenizer)
    from adapterkit import LoraConfig, add_adapter

    add_adapter(model, "it", LoraConfig(rank=2, targets=["c_attn"]))
    rows = [{"instruction": "say red twice", "output": " ".join(["red"] * 30)} for _ in range(8)]
    data = load_data(rows, task="causal-lm")
    [report] = get_task("causal-lm").truncation(data, tokenizer, 24)
    assert report.unit == "response tokens" and report.cut == 8 and report.share > 0.05
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, tokenizer, data, None, TrainConfig(max_steps=1, batch_size=4, max_length=24, num_threads=1))
    err = capsys.readouterr().err
    assert "truncation (training data" in err and "response tokens" in err and "--max-length N" in err
    assert any("not comparable" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, tokenizer, data, None, TrainConfig(max_steps=1, batch_size=4, max_length=256, num_threads=1))
    assert "truncation" not in capsys.readouterr().err  # nothing is cut: nothing is said
    assert not any("not comparable" in str(w.message) for w in caught)
