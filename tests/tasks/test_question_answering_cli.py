"""``adapterkit train/evaluate/predict --task question-answering`` on a tiny model and SQuAD files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterkit.cli.main import main
from adapterkit.data.squad import split_squad_file
from adapterkit.tasks.qa_metrics import squad_scores
from tests.tiny_qa import tiny_qa_folder, toy_colours, write_squad


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short ``adapterkit train`` run on a by-article split of a tiny SQuAD file."""
    tmp = tmp_path_factory.mktemp("qa_cli")
    model = tiny_qa_folder(tmp / "model")
    rows = toy_colours(120, seed=3)
    squad = write_squad(tmp / "squad.json", rows, per_article=6)  # 20 articles
    train_file, valid_file = split_squad_file(squad, tmp / "split", validation=4, seed=0)
    run = tmp / "run"
    return {"model": model, "rows": rows, "train": train_file, "valid": valid_file, "run": run,
            "status": main(["train", "--model", str(model), "--task", "question-answering",
                            "--data", str(train_file), "--eval-data", str(valid_file), "--max-steps", "6",
                            "--batch-size", "16", "--max-length", "32", "--output", str(run), "--json"])}


def test_cli_train_evaluate_predict(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    run, rows = trained["run"], trained["rows"]
    assert trained["status"] == 0
    metadata = json.loads((run / "adapter" / "adapterkit.json").read_text())
    assert metadata["task"] == "question-answering" and metadata["max_length"] == 32
    validation = metadata["metrics"]["validation"]
    assert set(validation) >= {"exact_match", "f1", "loss"}

    assert main(["evaluate", "--adapter", str(run / "adapter"), "--data", str(trained["valid"]), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 24
    assert metrics["f1"] == pytest.approx(validation["f1"])

    row = rows[0]
    assert main(["predict", "--adapter", str(run / "adapter"), "--question", row["question"],
                 "--context", row["context"], "--json"]) == 0
    [prediction] = json.loads(capsys.readouterr().out)
    assert prediction["answer"] == row["context"][prediction["start"] : prediction["end"]]
    assert 0.0 <= prediction["score"] <= 1.0
    assert main(["predict", "--adapter", str(run / "adapter"), "--question", row["question"],
                 "--context", row["context"]]) == 0
    answer, score, span = capsys.readouterr().out.strip().split("\t")
    assert answer == prediction["answer"] and span == f"[{prediction['start']}, {prediction['end']})"
    assert squad_scores([answer], [[prediction["answer"]]])["exact_match"] == 100.0


def test_cli_predict_needs_question_and_context(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["predict", "--adapter", str(trained["run"] / "adapter"), "--question", "which colour?"]) == 2
    assert "--question and --context go together" in capsys.readouterr().err
