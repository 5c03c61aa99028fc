"""The command line end to end on a tiny model folder: train -> evaluate -> predict -> info."""

from __future__ import annotations

import io
import json
import re
from importlib.metadata import entry_points

import pandas as pd
import pytest
import yaml

from adapterkit.cli.main import main
from adapterkit.evaluate import predict
from adapterkit.models import load_with_adapter
from adapterkit.train.recipe import RunConfig
from tests.tiny_text import tiny_bert_folder, toy_sentiment


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained through ``adapterkit train`` with a YAML file plus overriding flags."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_bert_folder(root / "model")
    pd.DataFrame(toy_sentiment(200)).rename(columns={"text": "review"}).to_csv(root / "train.csv", index=False)
    pd.DataFrame(toy_sentiment(60, seed=1)).rename(columns={"text": "review"}).to_csv(root / "test.csv", index=False)
    (root / "run.yaml").write_text(yaml.safe_dump({
        "model": "overridden-by-the-flag",
        "text_column": "review",
        "adapter": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
        "train": {"epochs": 1, "batch_size": 16, "eval_every": 10, "num_threads": 1, "progress": False},
    }))
    run = root / "run"
    argv = ["train", "--config", str(root / "run.yaml"), "--model", str(model), "--data", str(root / "train.csv"),
            "--test-data", str(root / "test.csv"), "--epochs", "6", "--lr", "0.03", "--output", str(run)]
    return root, run, argv


def _run(capsys, argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_evaluate_predict_info(trained, capsys, monkeypatch):
    root, run, argv = trained
    code, out, _ = _run(capsys, argv)
    assert code == 0
    test_accuracy = float(re.search(r"test:\s+accuracy ([\d.]+) on 60 examples", out).group(1))
    assert test_accuracy >= 0.8

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 6 and resolved["train"]["lr"] == 0.03  # flags win
    assert resolved["train"]["batch_size"] == 16 and resolved["adapter"]["rank"] == 4  # YAML kept
    assert resolved["model"] == argv[argv.index("--model") + 1]
    for name in ("adapter/adapter_model.safetensors", "metrics.jsonl", "training_curve.png",
                 "test/confusion_matrix.png", "checkpoints/last/state.json"):
        assert (run / name).is_file(), name

    code, out, _ = _run(capsys, ["evaluate", "--adapter", str(run / "adapter"), "--data", str(root / "test.csv"),
                                 "--json"])
    metrics = json.loads(out)
    assert code == 0 and metrics["count"] == 60
    assert metrics["accuracy"] == pytest.approx(test_accuracy, abs=5e-5)
    assert metrics["accuracy"] == pytest.approx(json.loads((run / "test" / "metrics.json").read_text())["accuracy"])

    code, out, _ = _run(capsys, ["evaluate", "--adapter", str(run / "adapter"), "--data", str(root / "test.csv")])
    assert "accuracy" in out and "confusion matrix" in out

    texts = ["a good film", "the plot was dull", "great story", "bad acting"]
    model, tokenizer, _ = load_with_adapter(run / "adapter")
    expected = predict(model, tokenizer, texts)  # the reference: the same adapter from Python
    assert sum(label == want for (label, _), want in zip(expected, ["pos", "neg", "pos", "neg"])) >= 3
    code, out, _ = _run(capsys, ["predict", "--adapter", str(run / "adapter"), *texts[:2]])
    assert code == 0 and out.splitlines() == [f"{label}\t{score:.4f}" for label, score in expected[:2]]

    code, out, _ = _run(capsys, ["predict", "--adapter", str(run / "adapter"), "--json"],
                        stdin="great story\n\nbad acting\n", monkeypatch=monkeypatch)
    got = json.loads(out)
    assert [p["text"] for p in got] == texts[2:]
    assert [(p["label"], pytest.approx(p["score"])) for p in got] == [tuple(p) for p in expected[2:]]

    code, out, _ = _run(capsys, ["predict", "--adapter", str(run / "adapter"), "--file", str(root / "test.csv")])
    assert len(out.splitlines()) == 60  # the table's text column, "review" as in training

    code, out, _ = _run(capsys, ["info", str(run / "adapter")])
    assert code == 0
    assert re.search(r"method:\s+lora", out) and re.search(r"labels:\s+neg, pos", out)
    assert re.search(r"task:\s+classification", out) and "test:" in out
    code, out, _ = _run(capsys, ["info", str(run / "adapter"), "--json"])
    info = json.loads(out)
    # LoRA A (4x32) and B (32x4) on query and value of 2 layers, plus the 2x32 head and its bias
    assert info["trainable_parameters"] == 2 * 2 * (4 * 32 + 32 * 4) + 2 * 32 + 2
    assert info["metrics"]["test"]["accuracy"] == pytest.approx(test_accuracy, abs=5e-5)


def test_user_errors_exit_2_with_a_message(trained, capsys, tmp_path):
    root, _, _ = trained
    code, _, err = _run(capsys, ["train", "--data", str(root / "train.csv"), "--text-column", "sentence",
                                 "--output", str(tmp_path / "x")])
    assert code == 2 and "no column 'sentence' for the text" in err and "['review', 'label']" in err
    code, _, err = _run(capsys, ["train", "--resume"])
    assert code == 2 and "--output" in err
    code, _, err = _run(capsys, ["info", str(tmp_path)])
    assert code == 2 and "not an adapter folder" in err
    with pytest.raises(SystemExit):
        main(["train", "--method", "magic"])


def test_run_config_resolution(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: a.csv\nadapter: {rank: 2}\ntrain: {lr: 0.01, epochs: 3}\n")
    config = RunConfig.resolve(path, epochs=5, model=None, method="lora")
    assert (config.data, config.adapter, config.train) == ("a.csv", {"rank": 2}, {"lr": 0.01, "epochs": 5})
    assert RunConfig.resolve() == RunConfig()  # no file, no flags: the built-in default
    path.write_text("dataset: a.csv\n")
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.resolve(path)


def test_console_script_points_at_main():
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == "adapterkit"]
    if not scripts:
        pytest.skip("adapterkit is not installed")
    assert scripts[0].load() is main
