"""``adapterkit info`` / ``predict`` on broken adapter folders, in a real process: a non-zero
exit, one message naming the file and the values, and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import adapterkit as ak
from tests.tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m adapterkit.cli.main ARGV`` offline, with its output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "adapterkit.cli.main", *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT LoRA adapter folder, saved once; each case edits a copy."""
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "task", ak.LoraConfig(rank=4, targets=["query", "value"]))
    return ak.save_adapter(model, "task", tmp_path_factory.mktemp("cli-files") / "adapter",
                           metadata={"task": "classification", "labels": ["a", "b", "c"]})


def _edit(file: str, change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def apply(folder: Path) -> Path:
        data = json.loads((folder / file).read_text())
        change(data)
        (folder / file).write_text(json.dumps(data))
        return folder
    return apply


def _garble(file: str) -> Callable[[Path], Path]:
    def apply(folder: Path) -> Path:
        (folder / file).write_text("{not json")
        return folder
    return apply


def _not_safetensors(folder: Path) -> Path:
    (folder / "adapter_model.safetensors").write_text("hello")
    return folder


def _peft_without_task(folder: Path) -> Path:
    (folder / "adapterkit.json").unlink()
    return _edit("adapter_config.json", lambda d: d.update(task_type=None))(folder)


CASES: dict[str, tuple[str, Callable[[Path], Path], list[str]]] = {
    # case -> (command, damage done to a copy of the folder (returns the path to give), words expected)
    "a file instead of a folder": ("info", lambda f: f / "adapter_model.safetensors",
                                   ["is a file, not a folder", "adapter_config.json and adapter_model.safetensors",
                                    "is an adapter folder"]),
    "rank in both files against the tensors": (
        "info", lambda f: _edit("adapter_config.json", lambda d: d.update(r=2))(
            _edit("adapterkit.json", lambda d: d["config"].update(rank=2))(f)),
        ["adapterkit.json has config.rank = 2", "lora_A.weight", "rank 4", "inconsistent"]),
    "r only in adapter_config.json": ("info", _edit("adapter_config.json", lambda d: d.update(r=8)),
                                      ["adapter_config.json has r = 8", "adapterkit.json has config.rank = 4"]),
    "invalid JSON": ("info", _garble("adapterkit.json"), ["adapterkit.json is truncated or corrupt"]),
    "not safetensors": ("info", _not_safetensors, ["adapter_model.safetensors is truncated or corrupt"]),
    "a field of the wrong type": ("info", _edit("adapter_config.json", lambda d: d.update(r="four")),
                                  ["adapter_config.json", "'r' should be an integer"]),
    "PEFT folder with no task": ("predict", _peft_without_task,
                                 ["task of the adapter", "unknown", "task_type", "SEQ_CLS"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_folder_exits_non_zero_with_a_message_and_no_traceback(adapter: Path, tmp_path: Path,
                                                                      case: str) -> None:
    command, damage, words = CASES[case]
    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    path = damage(copy)
    argv = ["info", str(path)] if command == "info" else ["predict", "--adapter", str(path), "some text"]
    result = run_cli(*argv)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
