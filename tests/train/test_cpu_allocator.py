"""TrainConfig.cpu_allocator: "lean" makes glibc hand freed blocks back, measured in a fresh process."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from adapterkit.data import load_data
from adapterkit.runtime.allocator import CPU_ALLOCATOR_CHOICES, apply_cpu_allocator
from adapterkit.train import TrainConfig, TrainConfigError, train
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment

# A fresh process builds the heap the way training does: after one large block is freed, glibc's
# dynamic threshold lets 2 MiB blocks come from the heap. Every other block is then freed while its
# neighbours stay alive, which leaves holes glibc cannot trim. The process prints how much of the
# freed memory left its resident set.
PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    from adapterkit.runtime.allocator import apply_cpu_allocator, return_freed_memory

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    applied = apply_cpu_allocator(sys.argv[1])
    big = torch.ones(16 * 2**20 // 4)
    del big  # a mapped block freed: the threshold rises to its size under the default
    blocks = [torch.ones(2**20 // 2) for _ in range(128)]  # 128 blocks of 2 MiB, touched
    before = rss()
    freed = sum(b.numel() * 4 for b in blocks[::2])
    del blocks[::2]
    trimmed = return_freed_memory() if sys.argv[2:] == ["trim"] else None
    print(json.dumps({"applied": applied, "trimmed": trimmed, "returned": (before - rss()) / freed}))
""")


def _probe(choice: str, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, choice, *extra], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


GLIBC = platform.libc_ver()[0] == "glibc"


def test_lean_returns_freed_blocks_that_the_default_keeps():
    default, lean = _probe("default"), _probe("lean")
    assert default["applied"] is False
    assert lean["applied"] is GLIBC  # with another C library nothing is set and the caller warns
    if GLIBC:  # the CI's and every Linux wheel's C library
        assert default["returned"] < 0.25, default  # the holes stay resident
        assert lean["returned"] > 0.9, lean  # each 2 MiB block was mapped alone and unmapped on free


def test_trimming_once_returns_the_holes_the_default_keeps():
    """What quantising calls after dropping the float weights: one malloc_trim, no lasting setting."""
    trimmed = _probe("default", "trim")
    assert trimmed["trimmed"] is GLIBC
    if GLIBC:
        assert trimmed["returned"] > 0.9, trimmed


def test_unknown_choice_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"\['default', 'lean'\].*'fast'"):
        apply_cpu_allocator("fast")
    with pytest.raises(TrainConfigError, match=r"cpu_allocator.*\['default', 'lean'\].*'fast'"):
        TrainConfig(cpu_allocator="fast")
    assert CPU_ALLOCATOR_CHOICES == ("default", "lean")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tiny_bert_folder(tmp_path_factory.mktemp("tiny"))
    return folder, load_data(toy_sentiment(32))


def _train(setup, choice: str) -> dict[str, torch.Tensor]:
    folder, data = setup
    model, tokenizer = tiny_lora_classifier(folder, data.labels)
    train(model, tokenizer, data, None, TrainConfig(max_steps=3, batch_size=8, seed=1, lr=1e-2, num_threads=1,
                                                    progress=False, cpu_allocator=choice))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_applies_it_on_the_cpu_and_trains_the_same_weights(setup, monkeypatch):
    """The loop asks for the mode (not applied to this test process, which is shared); the numbers do not move."""
    import adapterkit.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "apply_cpu_allocator", lambda choice: calls.append(choice) or True)
    plain = _train(setup, "default")
    assert calls == []
    lean = _train(setup, "lean")
    assert calls == ["lean"]
    assert plain.keys() == lean.keys() and all(torch.equal(plain[n], lean[n]) for n in plain)


def test_a_c_library_without_the_setting_gets_a_warning_and_the_run_goes_on(setup, monkeypatch):
    import adapterkit.train.loop as loop

    monkeypatch.setattr(loop, "apply_cpu_allocator", lambda choice: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(setup, "lean")
    assert any("cpu_allocator='lean' needs glibc" in str(w.message) for w in caught)
