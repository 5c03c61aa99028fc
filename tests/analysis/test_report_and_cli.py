"""The written report: files, a page that opens in headless Chromium with every section, and the command."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from playwright.sync_api import sync_playwright

import adapterkit as ak
from adapterkit.cli.main import main

from tests.tiny_models import perturb
from tests.tiny_text import tiny_bert_folder, toy_sentiment

CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real training run folder (``ak.train`` with an output folder) and a second adapter to compare with."""
    root = tmp_path_factory.mktemp("report")
    folder = tiny_bert_folder(root / "model", dropout=0.0)
    train_data = ak.load_data(toy_sentiment(96, seed=0))
    eval_data = ak.load_data(toy_sentiment(32, seed=1))
    pd.DataFrame(toy_sentiment(40, seed=2)).to_csv(root / "val.csv", index=False)
    for name, seed in (("run", 0), ("seed1", 1)):
        model, tokenizer = ak.load_model(folder, labels=train_data.labels)
        torch.manual_seed(seed)
        ak.add_adapter(model, "sent", ak.LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
        ak.train(model, tokenizer, train_data, eval_data,
                 ak.TrainConfig(epochs=2, batch_size=16, lr=3e-2, progress=False, num_threads=1,
                                output_dir=str(root / name)))
    return root


def test_report_files_and_page_in_chromium(run, tmp_path):
    model, tokenizer, _ = ak.models.load_with_adapter(run / "run" / "adapter")
    report = ak.analyze(model, "sent", data=str(run / "val.csv"), compare=run / "seed1" / "adapter", ablate=True,
                        tokenizer=tokenizer, output=tmp_path / "out", adapter_dir=run / "run" / "adapter",
                        baseline_run=run / "seed1")
    out = tmp_path / "out"
    pictures = ["update_heatmaps", "spectra", "subspace_similarity", "prediction_changes", "hidden_state_change",
                "ablation"]
    for picture in pictures:
        path = out / f"{picture}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["ablation"]["verdict"] == report["ablation"]["verdict"]
    assert saved["cost"]["trainable_parameters"] == report["cost"]["trainable_parameters"] > 0
    training = saved["cost"]["training"]
    assert training["steps"] == 12 and training["wall_time_s"] > 0 and training["tokens_per_s"] > 0
    assert saved["cost"]["ratios"]["wall_time_s"] > 0 and "peak_rss_mib" in training

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").as_uri())
        for section in ("summary", "updates", "parameters", "compare", "behaviour", "ablation", "cost"):
            assert page.locator(f"section#{section} h2").is_visible(), section
        widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == len(pictures) and all(w > 0 for w in widths)
        assert "top:" in page.locator("section#ablation").inner_text() or "keep adapters" in page.locator(
            "section#ablation").inner_text()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        shutil.copy(tmp_path / "report.png", "/tmp/an/report.png") if __import__("os").environ.get("AK_KEEP") else None
        browser.close()
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_command_writes_the_report_and_never_overwrites_unasked(run, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["analyze", "--adapter", str(run / "run" / "adapter"), "--data", str(run / "val.csv"), "--ablate",
            "--output", str(out), "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "ablation:" in printed
    first = (out / "analysis.json").read_text()
    assert json.loads(first)["behaviour"]["predictions"]["examples"] == 40
    assert main(argv) == 2
    assert "already holds a report" in capsys.readouterr().err
    assert (out / "analysis.json").read_text() == first
    assert main(argv + ["--overwrite"]) == 0


def test_command_explains_bad_input(run, tmp_path, capsys):
    adapter = str(run / "run" / "adapter")
    assert main(["analyze", "--adapter", adapter, "--ablate", "--output", str(tmp_path / "a")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["analyze", "--adapter", str(run / "run" / "adapter"), "--compare", str(tmp_path / "nowhere"),
                 "--output", str(tmp_path / "b")]) == 2
    assert "expected an adapter folder" in capsys.readouterr().err
    ia3 = tmp_path / "ia3"
    model, _ = ak.load_model(run / "model", labels=["neg", "pos"])
    ak.add_adapter(model, "i", ak.IA3Config())
    perturb(model, "i")
    ak.save_adapter(model, "i", str(ia3))
    shutil.rmtree(tmp_path / "b", ignore_errors=True)
    assert main(["analyze", "--adapter", str(run / "run" / "adapter"), "--compare", str(ia3),
                 "--output", str(tmp_path / "b")]) == 2
    assert "change no weight in common" in capsys.readouterr().err


def test_a_trainer_output_folder_is_a_baseline(run, tmp_path):
    """Full fine-tuning usually runs in transformers' Trainer: its trainer_state.json is read as the baseline."""
    from adapterkit.analysis.cost import cost_report

    folder = tmp_path / "full-ft"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 30, "log_history": [
        {"loss": 0.5, "step": 10}, {"train_runtime": 120.0, "train_samples_per_second": 8.0, "step": 30}]}))
    model, _, _ = ak.models.load_with_adapter(run / "run" / "adapter")
    cost = cost_report(model, "sent", run / "run" / "adapter", folder)
    assert cost["baseline"] == {"run": str(folder), "steps": 30, "wall_time_s": 120.0, "examples_per_s": 8.0}
    assert cost["ratios"]["wall_time_s"] == pytest.approx(cost["training"]["wall_time_s"] / 120.0)
    with pytest.raises(ak.errors.UsageError, match="is not a run folder"):
        cost_report(model, "sent", None, tmp_path)
