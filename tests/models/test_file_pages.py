"""Quantising a memory-mapped checkpoint gives each float weight's file pages back as it goes.

The pages are measured in this process's ``RssFile`` (``/proc/self/status``): what
``release_file_pages`` hands back must leave the resident set, and the tensor must
still read its values afterwards (from the file, or from the private copy a write made).
"""

from __future__ import annotations

import mmap
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adapterkit.models.quantize as quantize_module
from adapterkit.models.quantize import quantize_model
from adapterkit.runtime.file_pages import file_backed_ranges, release_file_pages
from tests.tiny_models import build_tiny

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) and /proc are Linux's"),
    pytest.mark.filterwarnings("ignore:.*stay in float"),
]

MIB = 2**20
SIZE = 32 * MIB


def _rss_file() -> int:
    """This process's resident file-backed memory in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("/proc/self/status has no RssFile line")


@pytest.fixture
def mapped_folder():
    # next to the tests, on the checkout's own file system (a tmpfs page cannot be paged out without swap)
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        yield Path(folder)


def _mapped_tensor(folder: Path, values: torch.Tensor) -> tuple[torch.Tensor, object]:
    save_file({"w": values}, str(folder / "w.safetensors"))
    handle = safe_open(str(folder / "w.safetensors"), framework="pt")
    return handle.get_tensor("w"), handle


def test_a_mapped_tensors_pages_leave_the_resident_set_and_its_values_stay(mapped_folder: Path) -> None:
    values = torch.randn(SIZE // 4, generator=torch.Generator().manual_seed(0))
    tensor, handle = _mapped_tensor(mapped_folder, values)
    start = tensor.data_ptr()
    assert any(lo <= start < hi for lo, hi in file_backed_ranges()), "safetensors no longer maps the file"
    assert torch.equal(tensor, values)  # every page read, so resident
    resident = _rss_file()
    released = release_file_pages(tensor)
    # all but the partial pages at either end (the file's header shares the first)
    assert SIZE - 2 * mmap.PAGESIZE <= released <= SIZE
    assert resident - _rss_file() >= 0.9 * released
    assert torch.equal(tensor, values)  # read again from the file
    del handle


def test_a_page_this_process_wrote_keeps_what_was_written(mapped_folder: Path) -> None:
    values = torch.randn(4 * MIB // 4, generator=torch.Generator().manual_seed(1))
    tensor, handle = _mapped_tensor(mapped_folder, values)
    tensor.mul_(2)  # a private mapping: the written pages become this process's own copies
    release_file_pages(tensor)
    assert torch.equal(tensor, values * 2)
    del handle


def test_anonymous_memory_and_small_tensors_are_left_alone() -> None:
    anonymous = torch.randn(SIZE // 4)
    assert release_file_pages(anonymous) == 0
    assert release_file_pages(torch.ones(16)) == 0
    assert release_file_pages(torch.ones(0)) == 0


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantising_a_mapped_checkpoint_releases_each_float_weight_as_it_goes(scheme: str, mapped_folder: Path,
                                                                              monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    model, _ = build_tiny("llama")
    model.save_pretrained(mapped_folder)
    loaded = AutoModelForCausalLM.from_pretrained(mapped_folder, dtype=torch.float32)
    calls: list[int] = []  # bytes released by each call

    def spy(tensor: torch.Tensor, ranges=None) -> int:
        calls.append(release_file_pages(tensor, ranges))
        return calls[-1]

    monkeypatch.setattr(quantize_module, "release_file_pages", spy)
    info = quantize_model(loaded, scheme)
    assert len(calls) == info.layers  # once for every layer quantised, right after it
    assert sum(calls) > 0
    # the model computes what the float checkpoint's quantised layers compute: nothing was lost
    reference, inputs = build_tiny("llama")
    quantize_model(reference, scheme)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)
