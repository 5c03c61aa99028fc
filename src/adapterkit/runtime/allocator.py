"""How the C library's allocator hands CPU memory back: ``TrainConfig.cpu_allocator``, and trimming once.

PyTorch takes CPU tensors from the C library's ``malloc``. glibc serves a
request from its heap unless the request is at least its *mmap threshold*,
which starts at 128 KiB and rises, each time a mapped block is freed, to that
block's size (up to 32 MiB). After the first training step nearly every
activation of a small model is below it, so activations, their gradients and
the per-call dequantised weights of a quantised base are cut from one heap;
what is freed in its middle cannot be returned while a live block sits above
it. Measured on SmolLM2-135M with LoRA (batch 8, length 256, 2026-12-04, in
``docs/benchmarks.md`` section 6), the resident memory then settles 0.6-1.0
GB above what the live tensors need, and more so on an nf4 base, whose
dequantised weights add blocks of many sizes.

``"lean"`` fixes the threshold at 1 MiB: every block from 1 MiB up is
mapped on its own and given back to the system when it is freed, so the
process's resident memory follows its live tensors. The price is the page
faults of mapping those blocks afresh: 0.5-0.86x the tokens/s of the
default in those measurements (AMD EPYC, 2 threads), for 0.5-0.8x its peak.
``"default"`` leaves the C library as it is.

The setting is process-wide and lasts for the rest of the process (glibc's
``mallopt``); it only has an effect with glibc (Linux) and only on the CPU's
memory: CUDA tensors come from PyTorch's own caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Literal, get_args

CpuAllocator = Literal["default", "lean"]
CPU_ALLOCATOR_CHOICES: tuple[str, ...] = get_args(CpuAllocator)

# mallopt's parameter number for the mmap threshold (glibc's <malloc.h>), and the value "lean" sets
_M_MMAP_THRESHOLD = -3
LEAN_MMAP_THRESHOLD = 1 << 20


def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or ``None`` with another C library (musl, macOS, Windows)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def apply_cpu_allocator(choice: str) -> bool:
    """Put the C allocator in ``choice``'s mode (see the module's text); returns whether anything changed.

    ``"default"`` changes nothing and returns ``False``. ``"lean"`` returns
    ``True`` once glibc accepted the fixed threshold, and ``False`` where the
    C library is not glibc (the caller says so; nothing else differs).

    Raises:
        ValueError: ``choice`` is not one of ``CPU_ALLOCATOR_CHOICES``.
    """
    if choice not in CPU_ALLOCATOR_CHOICES:
        raise ValueError(f"cpu_allocator must be one of {list(CPU_ALLOCATOR_CHOICES)}, got {choice!r}")
    if choice == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(LEAN_MMAP_THRESHOLD)))


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc's ``malloc_trim``); whether glibc did.

    For a one-off moment when much was freed at once (a float checkpoint's
    weights after quantising); it changes no setting. ``False`` with another
    C library, where there is nothing to do.
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(ctypes.c_size_t(0)))
