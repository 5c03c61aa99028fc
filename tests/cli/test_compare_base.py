"""``evaluate --compare-base``: the adapter and its base on the same examples, the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.evaluate.compare import scalar_metrics
from tests.tiny_lm import tiny_model_folder, toy_arithmetic


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    model = tiny_model_folder(root / "model", "llama", chat_template=True)
    for name, rows in {"train": toy_arithmetic(64, seed=1), "test": toy_arithmetic(12, seed=2)}.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "--task", "causal-lm", "--model", str(model), "--data", str(root / "train.jsonl"),
                 "--max-steps", "30", "--batch-size", "8", "--lr", "0.03", "--output", str(root / "run")])
    assert code == 0
    return model, root / "run" / "adapter", root / "test.jsonl"


def _evaluate(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_both_columns_share_every_setting_and_match_separate_runs(trained, capsys):
    model, adapter, data = trained
    flags = ["--data", str(data), "--max-new-tokens", "6", "--json"]
    result = _evaluate(capsys, ["evaluate", "--adapter", str(adapter), "--compare-base"] + flags)
    assert result["adapter"]["settings"] == result["base"]["settings"] == result["settings"]
    assert result["settings"]["max_length"] == 256  # the task default (the tiny model's context), not 64
    assert result["settings"]["generation"]["max_new_tokens"] == 6
    # each column equals the separate evaluation of the same thing, so "before" is the base model itself
    base = _evaluate(capsys, ["evaluate", "--model", str(model), "--task", "causal-lm"] + flags)
    alone = _evaluate(capsys, ["evaluate", "--adapter", str(adapter)] + flags)
    assert base["settings"] == alone["settings"] == result["settings"]
    for column, separate in (("base", base), ("adapter", alone)):
        assert scalar_metrics(result[column]) == pytest.approx(scalar_metrics(separate), rel=1e-6), column
    change = result["change"]["perplexity"]
    assert change["ratio"] == pytest.approx(alone["perplexity"] / base["perplexity"])
    assert change["ratio"] < 0.9  # 30 steps on the toy task already lower the perplexity


def test_the_table_shows_both_columns_and_says_the_settings_are_shared(trained, capsys):
    model, adapter, data = trained
    assert main(["evaluate", "--adapter", str(adapter), "--data", str(data), "--compare-base", "--no-generate"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert header.split() == ["metric", "base", "adapter", "change"]
    perplexity = next(r for r in rows if r.startswith("perplexity")).split()
    assert float(perplexity[2]) < float(perplexity[1]) and perplexity[3].startswith("x")
    assert "settings (the same for both columns): max_length=256" in out
    assert "generation.generate=False" in out


def test_compare_base_from_python_leaves_the_adapter_active(trained):
    model, adapter, data = trained
    loaded, tokenizer, _ = ak.models.load_with_adapter(adapter)
    result = ak.evaluate(loaded, tokenizer, str(data), compare_base=True, generate=False)
    assert result["change"]["perplexity"]["ratio"] < 1
    assert ak.evaluate(loaded, tokenizer, str(data), generate=False)["perplexity"] == pytest.approx(
        result["adapter"]["perplexity"], rel=1e-6)


def test_compare_base_needs_an_adapter(trained, capsys):
    model, adapter, data = trained
    code = main(["evaluate", "--model", str(model), "--task", "causal-lm", "--data", str(data), "--compare-base"])
    assert code == 2 and "--compare-base compares an adapter with its base" in capsys.readouterr().err
