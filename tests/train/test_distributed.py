"""Two processes on gloo (``torchrun``): DDP and FSDP2 train what one process trains on the same global batch.

Every run is real: ``python -m torch.distributed.run`` starts the processes,
which join a gloo group on 127.0.0.1 and train the tiny BERT (dropout 0,
one thread each). The reference is one process with twice the gradient
accumulation, so that each optimizer step sees the same 16 examples.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tiny_lm import tiny_model_folder, toy_instructions
from tests.tiny_text import tiny_bert_folder, toy_sentiment

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TIME_CAP = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), *args]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIME_CAP)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    model = tiny_bert_folder(root / "model", dropout=0.0)
    train, evaluation = root / "train.jsonl", root / "eval.jsonl"
    pd.DataFrame(toy_sentiment(96)).to_json(train, orient="records", lines=True)
    pd.DataFrame(toy_sentiment(24, seed=1)).to_json(evaluation, orient="records", lines=True)
    return {"root": root, "model": model, "train": train, "eval": evaluation}


@pytest.fixture(scope="module")
def reference(world) -> dict:
    """One process, gradient accumulation 2 x batch 8: the global batch of the two-process runs."""
    out = world["root"] / "single"
    _run([sys.executable, str(WORKER), str(world["model"]), str(world["train"]), str(world["eval"]), str(out),
          "none", "2"])
    return torch.load(f"{out}.rank0.pt", weights_only=False)


def _two_processes(world: dict, strategy: str, task: str = "classification") -> tuple[Path, list[dict]]:
    out = world["root"] / strategy
    _run(_torchrun(str(WORKER), str(world["model"]), str(world["train"]), str(world["eval"]), str(out),
                   strategy, "1", task))
    return out, [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama (no dropout) and toy instructions: training takes the fused chunked causal-LM loss."""
    root = tmp_path_factory.mktemp("dist-lm")
    model = tiny_model_folder(root / "model", "llama")
    train, evaluation = root / "train.jsonl", root / "eval.jsonl"
    pd.DataFrame(toy_instructions(96, seed=1)).to_json(train, orient="records", lines=True)
    pd.DataFrame(toy_instructions(24, seed=2)).to_json(evaluation, orient="records", lines=True)
    return {"root": root, "model": model, "train": train, "eval": evaluation}


@pytest.fixture(scope="module")
def lm_reference(lm_world) -> dict:
    out = lm_world["root"] / "single"
    _run([sys.executable, str(WORKER), str(lm_world["model"]), str(lm_world["train"]), str(lm_world["eval"]),
          str(out), "none", "2", "causal-lm"])
    return torch.load(f"{out}.rank0.pt", weights_only=False)


def _assert_same_training(ranks: list[dict], reference: dict, exact: tuple[str, ...] = ("accuracy",)) -> None:
    for rank in ranks:
        assert rank["base_unchanged"]
        assert rank["trainable"].keys() == reference["trainable"].keys()
        for name, value in reference["trainable"].items():
            # float32 sums in another order (two halves all-reduced) through 6 AdamW steps
            torch.testing.assert_close(rank["trainable"][name], value, rtol=1e-4, atol=1e-6)
        assert [h["step"] for h in rank["history"]] == [h["step"] for h in reference["history"]]
        for mine, ref in zip(rank["history"], reference["history"]):
            for metric in exact:  # classification's accuracy; a causal LM's evaluation is compared by its loss
                assert mine[metric] == ref[metric]
            assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4)


def _assert_written_once(out: Path, ranks: list[dict], reference: dict) -> None:
    """The main process wrote the run folder: the whole adapter (not a shard), each record once."""
    from adapterkit.models import load_with_adapter

    assert ranks[0]["output_dir"] == str(out)
    loaded, _, _ = load_with_adapter(out / "adapter")
    own = dict(loaded.named_parameters())
    for name, tensor in ranks[0]["trainable"].items():  # the adapter and the head, exactly as trained
        assert torch.equal(own[name].detach(), tensor), name
    steps = [record["step"] for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if record.get("split") == "eval"]
    assert steps == [h["step"] for h in reference["history"]]  # one writer: no line twice


def test_ddp_matches_one_process_on_the_same_global_batch(world, reference):
    out, ranks = _two_processes(world, "ddp")
    _assert_same_training(ranks, reference)
    _assert_written_once(out, ranks, reference)


def test_fsdp2_matches_one_process_and_saves_the_whole_adapter(world, reference):
    out, ranks = _two_processes(world, "fsdp")
    _assert_same_training(ranks, reference)
    _assert_written_once(out, ranks, reference)
    ddp = load_file(str(world["root"] / "ddp" / "adapter" / "adapter_model.safetensors")) \
        if (world["root"] / "ddp").exists() else None
    fsdp = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    if ddp is not None:  # what DDP saved, up to the order of float sums
        assert ddp.keys() == fsdp.keys()
        for key in ddp:
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_causal_lm_training_with_the_fused_loss_matches_one_process(lm_world, lm_reference, strategy):
    from adapterkit.models import load_model
    from adapterkit.tasks.lm_loss import uses_chunked_lm_loss

    model, _ = load_model(str(lm_world["model"]), task="causal-lm")
    assert uses_chunked_lm_loss(model)  # so the runs below train through the fused loss
    out, ranks = _two_processes(lm_world, strategy, "causal-lm")
    _assert_same_training(ranks, lm_reference, exact=())
    _assert_written_once(out, ranks, lm_reference)


def _cli_config(world: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "model": str(world["model"]), "task": "classification", "data": str(world["train"]),
        "eval_data": str(world["eval"]),
        "adapter": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
        "train": {"max_steps": 60, "batch_size": 4, "eval_every": 2, "lr": 1e-2, "precision": "fp32",
                  "device": "cpu", "progress": False, "seed": 3},
    }))
    return path


def _step_of(run: Path) -> int:
    state = run / "checkpoints" / "last" / "state.json"
    try:
        return json.loads(state.read_text())["loop"]["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_ddp_kill_and_resume_ends_identical_to_the_uninterrupted_run(world):
    config = _cli_config(world, world["root"] / "run.yaml")
    whole, resumed = world["root"] / "cli-whole", world["root"] / "cli-resumed"
    train = ["-m", "adapterkit", "train", "--config", str(config), "--threads", "1"]
    _run(_torchrun(*train, "--output", str(whole)))

    process = subprocess.Popen(_torchrun(*train, "--output", str(resumed)), env=_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIME_CAP
    while _step_of(resumed) < 6 and process.poll() is None:
        assert time.monotonic() < deadline, "the run never checkpointed"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
    process.wait(60)
    killed_at = _step_of(resumed)
    assert 6 <= killed_at < 60, f"the run was not killed mid-way (last checkpoint at step {killed_at})"
    _run(_torchrun(*train, "--output", str(resumed), "--resume"))

    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended elsewhere"
