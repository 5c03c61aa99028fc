"""Run folders through ``adapterkit train``: an earlier run is never lost or misdescribed.

Each test checks the message a user sees and that the earlier run's files
are byte-identical afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from adapterkit.cli.main import main
from adapterkit.train import run_folder as run_folder_module
from tests.tiny_text import tiny_bert_folder, toy_sentiment


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = tiny_bert_folder(root / "model")
    pd.DataFrame(toy_sentiment(96)).to_csv(root / "train.csv", index=False)
    (root / "run.yaml").write_text(yaml.safe_dump(
        {"adapter": {"rank": 4, "alpha": 8}, "train": {"progress": False, "num_threads": 1, "batch_size": 16,
                                                       "eval_every": 2}}))
    base = ["train", "--config", str(root / "run.yaml"), "--model", str(model), "--data", str(root / "train.csv"),
            "--max-steps", "6", "--lr", "0.02"]
    return root, base


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (TensorBoard's aside) by its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def train_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def finished(setup, tmp_path, capsys):
    """A finished run in its own folder, and the snapshot of its files."""
    root, base = setup
    run = tmp_path / "run"
    code, _, err = train_cli(capsys, base + ["--output", str(run)])
    assert code == 0, err
    return root, base, run, snapshot(run)


def test_a_folder_with_a_run_is_refused_without_resume_or_overwrite(finished, capsys):
    root, base, run, before = finished
    code, _, err = train_cli(capsys, base + ["--output", str(run), "--seed", "7"])
    assert code == 2 and "Traceback" not in err
    assert f"{run} already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(finished, capsys, monkeypatch):
    root, base, run, before = finished
    seen: list[dict] = []
    real_commit = run_folder_module.RunFolder.commit

    def commit_and_look(self):
        # Before the first swap the final folder still holds the earlier run, unchanged.
        if self.staging:
            seen.append(snapshot(self.final))
            assert (self.path / "checkpoints" / "last" / "state.json").is_file()
        real_commit(self)

    monkeypatch.setattr(run_folder_module.RunFolder, "commit", commit_and_look)
    code, out, err = train_cli(capsys, base + ["--output", str(run), "--overwrite", "--seed", "7"])
    assert code == 0, err
    assert seen and seen[0] == before
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["seed"] == 7 and config["train"]["overwrite"] is True
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".run.")]  # no staging folder left


def test_a_failing_overwrite_run_leaves_the_old_run_whole(finished, capsys):
    root, base, run, before = finished
    code, _, err = train_cli(capsys, base + ["--output", str(run), "--overwrite", "--lr", "1e30"])
    assert code == 2 and "Traceback" not in err
    assert "training loss became" in err and f"earlier run in {run} is untouched" in err
    assert snapshot(run) == before
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".run.")]


@pytest.mark.parametrize("change, expected", [
    (["--lr", "0.05"], "train.lr: 0.02 -> 0.05"),
    (["--batch-size", "8"], "train.batch_size: 16 -> 8"),
    (["--seed", "1"], "train.seed: 42 -> 1"),
    (["--method", "ia3"], "method: 'lora' -> 'ia3'"),
])
def test_resume_with_changed_settings_is_refused_naming_each(finished, capsys, change, expected):
    root, base, run, before = finished
    code, _, err = train_cli(capsys, base + ["--output", str(run), "--resume"] + change)
    assert code == 2 and "Traceback" not in err
    assert "cannot resume" in err and expected in err
    assert err.count(" -> ") == 2  # "(old -> new)" and the one change, not every option of both methods
    assert snapshot(run) == before


def test_resume_with_changed_adapter_options_in_the_config_is_refused(finished, capsys, tmp_path):
    root, base, run, before = finished
    changed = tmp_path / "changed.yaml"
    data = yaml.safe_load((root / "run.yaml").read_text())
    data["adapter"] = {"rank": 4, "alpha": 64, "dropout": 0.2}
    changed.write_text(yaml.safe_dump(data))
    argv = [changed.as_posix() if a == str(root / "run.yaml") else a for a in base]
    code, _, err = train_cli(capsys, argv + ["--output", str(run), "--resume"])
    assert code == 2
    assert "adapter 'default' alpha: 8 -> 64" in err and "adapter 'default' dropout: 0.0 -> 0.2" in err
    assert snapshot(run) == before


def test_resume_may_change_how_often_it_evaluates_and_logs(finished, capsys, tmp_path):
    root, base, run, before = finished
    argv = [a for a in base]
    argv[argv.index("--max-steps") + 1] = "8"  # a longer run is another schedule: refused
    code, _, err = train_cli(capsys, argv + ["--output", str(run), "--resume"])
    assert code == 2 and "train.max_steps: 6 -> 8" in err
    relaxed = tmp_path / "relaxed.yaml"
    data = yaml.safe_load((root / "run.yaml").read_text())
    data["train"].update(eval_every=3, log_every=1, num_threads=2)
    relaxed.write_text(yaml.safe_dump(data))
    argv = [relaxed.as_posix() if a == str(root / "run.yaml") else a for a in base]
    code, _, err = train_cli(capsys, argv + ["--output", str(run), "--resume"])
    assert code == 0, err


def test_bad_flags_and_config_files_name_what_is_wrong(setup, capsys, tmp_path):
    root, base = setup
    out = ["--output", str(tmp_path / "new")]
    cases = {
        "--seed": (["--seed", "-1"], "TrainConfig.seed (--seed"),
        "--lr": (["--lr", "inf"], "TrainConfig.lr (--lr"),
    }
    for flag, (extra, expected) in cases.items():
        code, _, err = train_cli(capsys, base + extra + out)
        assert code == 2 and expected in err and "got" in err and "Traceback" not in err, flag
    typo = tmp_path / "typo.yaml"
    typo.write_text("adapter: {rnak: 4}\n")
    code, _, err = train_cli(capsys, ["train", "--config", str(typo)] + out)
    assert code == 2 and "'rnak'" in err and "rank" in err and "lora" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: 2\n lr: [0.1\n")
    code, _, err = train_cli(capsys, ["train", "--config", str(broken)] + out)
    assert code == 2 and f"--config {broken}, line 3" in err and "not valid YAML" in err
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def _tiny_filesystem(mount_point: Path, options: str) -> bool:
    """Mount a 64 KiB tmpfs (root on Linux can); False where this machine does not allow it."""
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64k,{options}", "tmpfs", str(mount_point)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("kind, reason", [("ro", "read-only"), ("full", "disk is full")])
def test_an_unwritable_output_is_refused_before_anything_loads(setup, capsys, tmp_path, monkeypatch, kind, reason):
    root, base = setup
    mount = tmp_path / "mnt"
    real = _tiny_filesystem(mount, "ro" if kind == "ro" else "rw")
    try:
        if real and kind == "full":
            (mount / "filler").write_bytes(b"\0" * 64 * 1024)
        if not real:  # the same failure, raised where the write would fail
            mount.mkdir(exist_ok=True)
            code_for = errno.EROFS if kind == "ro" else errno.ENOSPC

            def failing_open(self, *args, **kwargs):
                raise OSError(code_for, "simulated")

            monkeypatch.setattr(Path, "open", failing_open)
        loaded: list[str] = []
        monkeypatch.setattr("adapterkit.train.recipe.load_run_data", lambda c: loaded.append("data"))
        code, _, err = train_cli(capsys, base + ["--output", str(mount / "run")])
        assert code == 2 and "Traceback" not in err
        assert f"cannot write the run folder {mount / 'run'}" in err and reason in err
        assert loaded == []  # refused before the data (and the model) were loaded
    finally:
        if real:
            subprocess.run(["umount", str(mount)], check=True)


def test_output_that_is_a_file_is_refused(setup, capsys, tmp_path):
    root, base = setup
    target = tmp_path / "a-file"
    target.write_text("keep me")
    code, _, err = train_cli(capsys, base + ["--output", str(target)])
    assert code == 2 and "is a file, not a folder" in err
    assert target.read_text() == "keep me"


def test_metrics_survive_a_resume_without_duplicates(finished, capsys):
    root, base, run, before = finished
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4, 6]


def test_an_adapter_save_interrupted_between_its_renames_is_pointed_at(finished, capsys):
    root, base, run, before = finished
    aside = run / ".adapter.old-4242-deadbeef"
    (run / "adapter").rename(aside)  # what a crash between the two renames of a save leaves
    for argv in (["info", str(run / "adapter")], ["predict", "--adapter", str(run / "adapter"), "good film"],
                 ["evaluate", "--adapter", str(run / "adapter"), "--data", str(root / "train.csv")]):
        code, _, err = train_cli(capsys, argv)
        assert code == 2 and "Traceback" not in err, argv
        assert f"no adapter at {run / 'adapter'}" in err and str(aside) in err and "mv " in err, argv
    aside.rename(run / "adapter")  # following the advice gives the complete adapter back
    code, out, _ = train_cli(capsys, ["info", str(run / "adapter")])
    assert code == 0 and "lora" in out


def test_output_into_a_closed_pipe_ends_quietly(finished, tmp_path):
    root, base, run, before = finished
    texts = tmp_path / "texts.txt"
    texts.write_text("good film\n" * 8000)  # ~100 KB of predictions: more than a pipe buffer holds
    script = tmp_path / "pipe.sh"
    for command in (f"predict --adapter {run / 'adapter'} --file {texts}", f"info {run / 'adapter'}"):
        script.write_text(f"set -o pipefail\n{Path(sys.executable).parent / 'adapterkit'} {command} "
                          f"2> {tmp_path / 'err.txt'} | head -n 1 > {tmp_path / 'out.txt'}\n")
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
        err = (tmp_path / "err.txt").read_text()
        assert "Traceback" not in err and "BrokenPipeError" not in err, (command, err)
        assert done.returncode == 0, (command, err)
        assert len((tmp_path / "out.txt").read_text().splitlines()) == 1
