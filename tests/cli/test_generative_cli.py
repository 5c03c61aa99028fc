"""The command line for generative tasks on tiny models: train -> evaluate (with and without
the adapter) -> predict / generate / chat, for causal-lm and seq2seq; base-model evaluation
for every task."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from adapterkit.cli.main import main
from tests.tiny_lm import one_thread  # noqa: F401  (a fixture)
from tests.tiny_lm import tiny_model_folder, toy_arithmetic, toy_instructions, toy_translation
from tests.tiny_ner import tiny_ner_folder, toy_ner
from tests.tiny_qa import tiny_qa_folder, toy_colours, write_squad
from tests.tiny_text import tiny_bert_folder, toy_sentiment

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = {"max_steps": 6, "batch_size": 8, "eval_every": 6, "num_threads": 1, "progress": False, "lr": 0.01}


def _run(capsys, monkeypatch, argv: list[str], stdin: str | None = None) -> tuple[int, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return code, out


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("causal")
    model = tiny_model_folder(root / "model", "llama", chat_template=True)
    for name, rows in (("train.jsonl", toy_instructions(48)), ("eval.jsonl", toy_instructions(8, seed=1))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "run.yaml").write_text(yaml.safe_dump({"adapter": {"rank": 4, "alpha": 8}, "train": TRAIN}))
    assert main(["train", "--config", str(root / "run.yaml"), "--task", "causal-lm", "--model", str(model),
                 "--data", str(root / "train.jsonl"), "--eval-data", str(root / "eval.jsonl"), "--packing",
                 "--max-length", "48", "--output", str(root / "run"), "--json"]) == 0
    return root, model, root / "run" / "adapter"


def test_causal_lm_train_evaluate_before_and_after(causal_run, capsys, monkeypatch) -> None:
    root, model, adapter = causal_run
    capsys.readouterr()
    resolved = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert resolved["train"]["packing"] is True and resolved["adapter"]["targets"] is None
    _, out = _run(capsys, monkeypatch, ["evaluate", "--adapter", str(adapter), "--data", str(root / "eval.jsonl"), "--json"])
    after = json.loads(out)
    _, out = _run(capsys, monkeypatch, ["evaluate", "--model", str(model), "--task", "causal-lm",
                                        "--data", str(root / "eval.jsonl"), "--max-length", "48", "--json"])
    before = json.loads(out)
    assert after["count"] == before["count"] == 8
    assert after["perplexity"] < before["perplexity"]


def test_causal_lm_generate_predict_and_chat(causal_run, capsys, monkeypatch) -> None:
    root, model, adapter = causal_run
    capsys.readouterr()
    _, out = _run(capsys, monkeypatch, ["generate", "--adapter", str(adapter), "say red twice", "hello",
                                        "--max-new-tokens", "5", "--json"])
    replies = json.loads(out)
    assert [r["prompt"] for r in replies] == ["say red twice", "hello"]
    assert all(len(r["text"].split()) <= 5 for r in replies)
    sample = ["generate", "--adapter", str(adapter), "say red twice", "--temperature", "1.5", "--seed", "3",
              "--max-new-tokens", "6"]
    assert _run(capsys, monkeypatch, sample)[1] == _run(capsys, monkeypatch, sample)[1]
    greedy = _run(capsys, monkeypatch, ["generate", "--adapter", str(adapter), "say red twice",
                                        "--max-new-tokens", "6"])[1].strip()
    if len(greedy.split()) > 1:  # --stop cuts before the stop string
        stop = greedy.split()[1]
        cut = _run(capsys, monkeypatch, ["generate", "--adapter", str(adapter), "say red twice",
                                         "--max-new-tokens", "6", "--stop", stop])[1].strip()
        assert cut == greedy[: greedy.index(stop)].strip()
    _, out = _run(capsys, monkeypatch, ["generate", "--model", str(model), "--max-new-tokens", "3"], stdin="hello\n")
    assert out.count("\n") == 1  # the base model alone, prompt from stdin
    _, out = _run(capsys, monkeypatch, ["predict", "--adapter", str(adapter), "say red twice"])
    assert out.count("\n") == 1
    _, out = _run(capsys, monkeypatch, ["chat", "--adapter", str(adapter), "--max-new-tokens", "4"],
                  stdin="say red twice\n\n/reset\nsay blue twice\n/exit\nnot read\n")
    assert out.count("\n") == 2


def test_seq2seq_on_parallel_files(tmp_path: Path, capsys, monkeypatch) -> None:
    model = tiny_model_folder(tmp_path / "t5", "t5")
    for split, n in (("train", 48), ("val", 8)):
        english, german = toy_translation(n, seed=n)
        (tmp_path / f"{split}.en").write_text("\n".join(english) + "\n")
        (tmp_path / f"{split}.de").write_text("\n".join(german) + "\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"adapter": {"rank": 4, "alpha": 8}, "train": TRAIN}))
    _run(capsys, monkeypatch, ["train", "--config", str(tmp_path / "run.yaml"), "--task", "seq2seq", "--model",
                               str(model), "--data", str(tmp_path / "train.en"), "--eval-data", str(tmp_path / "val.en"),
                               "--max-length", "32", "--output", str(tmp_path / "run"), "--json"])
    adapter = tmp_path / "run" / "adapter"
    _, out = _run(capsys, monkeypatch, ["evaluate", "--adapter", str(adapter), "--data", str(tmp_path / "val.en"), "--json"])
    after = json.loads(out)
    _, out = _run(capsys, monkeypatch, ["evaluate", "--model", str(model), "--task", "seq2seq",
                                        "--data", str(tmp_path / "val.en"), "--max-length", "32", "--json"])
    before = json.loads(out)
    assert {"bleu", "chrf", "perplexity"} <= set(after) and after["count"] == before["count"] == 8
    assert after["loss"] < before["loss"]
    _, out = _run(capsys, monkeypatch, ["generate", "--adapter", str(adapter), "red red red red", "--max-new-tokens", "6"])
    assert out.count("\n") == 1


def test_base_model_evaluation_works_for_the_encoder_tasks(tmp_path: Path, capsys, monkeypatch) -> None:
    bert = tiny_bert_folder(tmp_path / "bert")
    pd.DataFrame(toy_sentiment(20)).to_csv(tmp_path / "test.csv", index=False)
    _, out = _run(capsys, monkeypatch, ["evaluate", "--model", str(bert), "--task", "classification",
                                        "--data", str(tmp_path / "test.csv"), "--json"])
    assert json.loads(out)["count"] == 20
    ner = tiny_ner_folder(tmp_path / "ner")
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_ner(10)))
    _, out = _run(capsys, monkeypatch, ["evaluate", "--model", str(ner), "--task", "token-classification",
                                        "--data", str(tmp_path / "ner.jsonl"), "--json"])
    assert "f1" in json.loads(out)
    qa = tiny_qa_folder(tmp_path / "qa")
    write_squad(tmp_path / "qa.json", toy_colours(10))
    _, out = _run(capsys, monkeypatch, ["evaluate", "--model", str(qa), "--task", "question-answering",
                                        "--data", str(tmp_path / "qa.json"), "--json"])
    assert {"exact_match", "f1"} <= set(json.loads(out))


def test_evaluate_generation_flags_reach_the_generated_metrics(causal_run, capsys, monkeypatch) -> None:
    root, model, adapter = causal_run
    capsys.readouterr()
    (root / "arithmetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_arithmetic(6)))
    flags = ["--data", str(root / "arithmetic.jsonl"), "--max-new-tokens", "3", "--stop", "STOP", ".",
             "--batch-size", "4", "--json"]
    for source in (["--adapter", str(adapter)], ["--model", str(model), "--task", "causal-lm"]):
        _, out = _run(capsys, monkeypatch, ["evaluate", *source, *flags])
        metrics = json.loads(out)
        assert metrics["answered"] == 6 and "exact_match" in metrics
        assert metrics["settings"]["generation"] == {"generate": True, "max_new_tokens": 3, "temperature": 0.0,
                                                     "top_p": 1.0, "stop": ["STOP", "."], "seed": None,
                                                     "batch_size": 4}
        _, out = _run(capsys, monkeypatch, ["evaluate", *source, "--data", str(root / "arithmetic.jsonl"),
                                            "--no-generate", "--json"])
        alone = json.loads(out)
        assert "exact_match" not in alone and alone["perplexity"] == pytest.approx(metrics["perplexity"])
        assert alone["settings"]["generation"]["generate"] is False


def test_evaluate_refuses_generation_flags_for_a_classifier(tmp_path: Path, capsys) -> None:
    bert = tiny_bert_folder(tmp_path / "bert")
    pd.DataFrame(toy_sentiment(8)).to_csv(tmp_path / "test.csv", index=False)
    for flag in (["--max-new-tokens", "4"], ["--no-generate"]):
        code = main(["evaluate", "--model", str(bert), "--task", "classification",
                     "--data", str(tmp_path / "test.csv"), *flag])
        assert code == 2 and "apply to causal-lm and seq2seq" in capsys.readouterr().err
