"""``kill -9`` of ``adapterkit train`` at any moment, then ``--resume``: the same adapter every time.

Each trial forks a process (torch is already imported, so a trial costs a
fraction of a second), lets it train, and SIGKILLs it: either from outside
after a random delay, or from inside at the n-th call of a step of a save
(writing a checkpoint file, flushing the new folder, swapping it in, and the
rename-aside path used where the file system cannot swap atomically), so
that kills land during checkpoint and adapter saves. A fresh process then
runs the same command with ``--resume``; its adapter must be byte-identical
to the adapter of an uninterrupted run.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from adapterkit.cli.main import main
from adapterkit.core import atomic
from adapterkit.train import checkpoint
from tests.tiny_text import tiny_bert_folder, toy_sentiment

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "adapterkit.json")
# (module, attribute) of the save steps a kill may land in.
SAVE_STEPS = {
    "write-file": (checkpoint, "save_file"),      # a checkpoint's tensors, mid-folder
    "flush": (atomic, "fsync_dir"),               # a finished temporary folder (checkpoints and adapters)
    "swap": (atomic, "exchange"),                 # just before the atomic swap
}


def _forked(argv: list[str], prepare: Callable[[], None] | None = None, kill_after: float | None = None) -> int:
    """Run ``main(argv)`` in a forked process; returns its exit code (-9 when killed)."""

    def child() -> None:
        os.environ["TQDM_DISABLE"] = "1"
        if prepare is not None:
            prepare()
        os._exit(main(argv))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    if kill_after is not None:
        process.join(kill_after)
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
    process.join(120)
    assert process.exitcode is not None, "the training process hung"
    return process.exitcode


def _kill_at_call(module, name: str, n: int, fallback_rename: bool = False) -> Callable[[], None]:
    """A ``prepare`` that makes the n-th call of ``module.name`` SIGKILL its own process."""

    def prepare() -> None:
        if fallback_rename:  # the path of file systems without an atomic swap
            atomic._RENAMEAT2 = None
        real = getattr(module, name)
        calls = [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(module, name, wrapper)

    return prepare


def _kill_between_renames(n: int) -> Callable[[], None]:
    """A ``prepare`` for the rename-aside path that dies after the n-th save renamed its old folder away."""

    def prepare() -> None:
        atomic._RENAMEAT2 = None
        real = os.rename
        calls = [0]

        def rename(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            if atomic.OLD_MARK in Path(dst).name:
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)

        atomic.os.rename = rename  # the module's own reference to os

    return prepare


def _count_calls(counts: Path) -> Callable[[], None]:
    """A ``prepare`` that records how often each save step runs, written when the process exits."""

    def prepare() -> None:
        tally: dict[str, int] = {}
        for step, (module, name) in SAVE_STEPS.items():
            real = getattr(module, name)

            def wrapper(*args, _real=real, _step=step, **kwargs):
                tally[_step] = tally.get(_step, 0) + 1
                return _real(*args, **kwargs)

            setattr(module, name, wrapper)
        real_exit = os._exit

        def exit_after_writing(code):
            counts.write_text(yaml.safe_dump(tally))
            real_exit(code)

        os._exit = exit_after_writing

    return prepare


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model = tiny_bert_folder(root / "model")
    pd.DataFrame(toy_sentiment(160)).to_csv(root / "train.csv", index=False)
    (root / "run.yaml").write_text(yaml.safe_dump(
        {"adapter": {"rank": 4, "alpha": 8}, "train": {"progress": False, "num_threads": 1, "batch_size": 16,
                                                       "eval_every": 3, "max_steps": 15, "lr": 0.02}}))
    argv = ["train", "--config", str(root / "run.yaml"), "--model", str(model), "--data", str(root / "train.csv")]
    reference = root / "reference"
    started = time.perf_counter()
    assert _forked(argv + ["--output", str(reference)], prepare=_count_calls(root / "counts.yaml")) == 0
    duration = time.perf_counter() - started
    counts = yaml.safe_load((root / "counts.yaml").read_text())
    expected = {name: (reference / "adapter" / name).read_bytes() for name in ADAPTER_FILES}
    return root, argv, expected, duration, counts


def _trials(duration: float, counts: dict[str, int]) -> list[tuple[str, Callable[[], None] | None, float | None]]:
    rng = random.Random(0)
    trials: list[tuple[str, Callable[[], None] | None, float | None]] = []
    for _ in range(8):  # from outside, at any moment of the run
        delay = rng.uniform(0.05, duration)
        trials.append((f"after {delay:.2f}s", None, delay))
    for step, (module, name) in SAVE_STEPS.items():
        for n in sorted(rng.sample(range(1, counts[step] + 1), min(4, counts[step]))):
            trials.append((f"{step} #{n}", _kill_at_call(module, name, n), None))
    for n in (1, 3, 5):  # rename-aside path: checkpoint and adapter folders left renamed away
        trials.append((f"between renames #{n}", _kill_between_renames(n), None))
    for n in (2, 6):
        trials.append((f"flush #{n}, no atomic swap", _kill_at_call(atomic, "fsync_dir", n, fallback_rename=True),
                       None))
    return trials


def test_kill_at_random_moments_then_resume_gives_the_uninterrupted_adapter(job, tmp_path):
    root, argv, expected, duration, counts = job
    trials = _trials(duration, counts)
    assert len(trials) >= 20
    killed = 0
    for index, (label, prepare, delay) in enumerate(trials):
        run = tmp_path / f"trial{index}"
        code = _forked(argv + ["--output", str(run)], prepare=prepare, kill_after=delay)
        killed += code == -signal.SIGKILL
        if code == -signal.SIGKILL and not (run / "config.yaml").exists():
            # Killed before the run wrote anything: there is nothing to resume, and a plain run starts it.
            assert _forked(argv + ["--output", str(run)]) == 0, label
        else:
            assert _forked(argv + ["--output", str(run), "--resume"]) == 0, label
        for name in ADAPTER_FILES:
            assert (run / "adapter" / name).read_bytes() == expected[name], f"{label}: {name} differs"
        assert not atomic.leftovers(run / "adapter"), label
    assert killed >= len(trials) - 4  # nearly every trial really died mid-run
