"""Give back the resident pages of a memory-mapped weight that is about to be replaced.

transformers loads a safetensors checkpoint as views of one private memory
map of the file. A page of that map becomes resident (and counts in the
process's RSS) the first time it is read, and stays resident while any view
of the file lives, which for a model being quantised is until its last float
tensor has been copied out. Quantising reads every linear weight, so without
help the whole float checkpoint is resident beside its quantised copy at the
end of loading: on SmolLM2-135M that was the peak of the whole training run
(0.43 GB of float weights above the 0.1-0.2 GB quantised ones).

``release_file_pages(tensor)`` asks the kernel to reclaim the pages that lie
wholly inside ``tensor``'s bytes with ``madvise(MADV_PAGEOUT)`` (Linux 5.4
and later). That advice never loses data: a clean page of the file is
dropped and read again from the file if anything touches it later; a page
this process has written (a private copy) can only go to swap, and without
swap stays where it is. So it is safe to call on a tensor something else
might still read; it only costs a re-read then. Anonymous memory is left
alone, since paging it out would write a tensor to swap just before it is
freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import sys

import torch

MADV_PAGEOUT = 21  # <linux/mman.h>, Linux 5.4+


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()
_pageout_supported = _LIBC is not None


def file_backed_ranges() -> list[tuple[int, int]]:
    """The ``[start, end)`` address ranges of this process's mappings of regular files (``/proc/self/maps``)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                # a file mapping names its path; anonymous ones have none or a [bracketed] name
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def release_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> int:
    """Advise the kernel to reclaim the file-backed pages wholly inside ``tensor``'s bytes; bytes advised.

    Returns 0 (and does nothing) for a tensor that is not on the CPU, not in
    a file mapping, smaller than a page, or where the system offers no
    ``MADV_PAGEOUT`` (not Linux, or a kernel older than 5.4). ``ranges`` are
    ``file_backed_ranges()``, read again when not given.
    """
    global _pageout_supported
    if not _pageout_supported or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # only pages no other bytes share
    if last <= first:
        return 0
    ranges = file_backed_ranges() if ranges is None else ranges
    if not any(lo <= first and last <= hi for lo, hi in ranges):
        return 0
    if _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(MADV_PAGEOUT)) != 0:
        if ctypes.get_errno() == errno.EINVAL:  # the kernel does not know the advice: stop asking
            _pageout_supported = False
        return 0
    return last - first
