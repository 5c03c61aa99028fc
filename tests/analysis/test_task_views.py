"""The ablation's metric, rebuilt from per-example statistics, equals each task's own evaluation metric."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.analysis import analyze
from adapterkit.analysis.ablation import dropped

from tests.tiny_models import perturb
from tests.tiny_ner import tiny_ner_folder, toy_ner
from tests.tiny_qa import tiny_qa_folder, toy_colours


def test_entity_f1_from_pooled_counts_equals_evaluate(tmp_path):
    data = ak.load_data(toy_ner(40, seed=1), task="token-classification")
    model, tokenizer = ak.load_model(tiny_ner_folder(tmp_path / "ner"), task="token-classification",
                                     labels=data.labels)
    ak.add_adapter(model, "ner", ak.LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
    perturb(model, "ner", seed=2, scale=0.5)
    model.eval()
    expected = ak.evaluate(model, tokenizer, data, max_length=64)
    report = analyze(model, "ner", data=data, tokenizer=tokenizer, max_length=64, ablate=True)
    changes = report["behaviour"]["predictions"]
    assert changes["metric"] == "f1"
    assert changes["adapted_metric"] == pytest.approx(expected["f1"], abs=1e-12)
    assert report["ablation"]["full"] == pytest.approx(expected["f1"], abs=1e-12)
    # word tags are the confusion matrix's units: one count per word
    assert sum(map(sum, changes["confusion"]["matrix"])) == sum(len(e["tokens"]) for e in data.examples)
    # an ablation row is the task's own evaluation with those layers' adapters taken out
    below = report["ablation"]["below"][0]
    with dropped(model, "ner", {0}):
        without_first = ak.evaluate(model, tokenizer, data, max_length=64)["f1"]
    assert below["layers"] == [0] and below["metric"] == pytest.approx(without_first, abs=1e-12)


def test_squad_f1_from_per_question_scores_equals_evaluate(tmp_path):
    data = ak.load_data(toy_colours(24, seed=1), task="question-answering")
    model, tokenizer = ak.load_model(str(tiny_qa_folder(tmp_path / "qa")), task="question-answering")
    torch.manual_seed(0)
    ak.add_adapter(model, "qa", ak.LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
    perturb(model, "qa", seed=3, scale=0.5)
    model.eval()
    expected = ak.evaluate(model, tokenizer, data, max_length=32)
    report = analyze(model, "qa", data=data, tokenizer=tokenizer, max_length=32)
    changes = report["behaviour"]["predictions"]
    assert changes["adapted_metric"] == pytest.approx(expected["f1"], abs=1e-9)
    assert changes["confusion"]["units"] == sorted(set(changes["confusion"]["units"]))
    assert set(changes["confusion"]["units"]) <= {"right", "wrong"}
    assert sum(map(sum, changes["confusion"]["matrix"])) == len(data.examples)
