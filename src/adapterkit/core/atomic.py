"""Replacing a folder all at once.

An adapter is several files that only make sense together, so a save writes
them into a fresh folder beside the destination, flushes them to disk, and
only then swaps that folder into place (old folder renamed aside, new folder
renamed in, old folder deleted). An exception or a crash at any point leaves
either the previous adapter or the new one at the destination, never a mix.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator


def fsync_file(path: Path) -> None:
    """Force ``path``'s contents to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Force ``path``'s directory entries to stable storage (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(dest: str | os.PathLike[str], owned: Collection[str]) -> Iterator[Path]:
    """Yield an empty folder to fill; on a clean exit it replaces ``dest``.

    ``owned`` names the entries this writer is responsible for. Other entries
    already in ``dest`` (a training run's logs, say) are carried over into the
    new folder unchanged. On an exception the temporary folder is deleted and
    ``dest`` is left exactly as it was.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"cannot save an adapter to {dest}: it exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        for entry in tmp.iterdir():
            if entry.is_file():
                fsync_file(entry)
        fsync_dir(tmp)
        _swap_in(tmp, dest, owned, token)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, dest: Path, owned: Collection[str], token: str) -> None:
    """Rename ``dest`` aside, carry its foreign entries over, rename ``tmp`` in, delete the old one."""
    if not dest.exists():
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
        return
    old = dest.parent / f".{dest.name}.old-{token}"
    foreign = [e.name for e in dest.iterdir() if e.name not in owned and not (tmp / e.name).exists()]
    os.rename(dest, old)
    moved: list[str] = []
    try:
        for entry in foreign:
            os.rename(old / entry, tmp / entry)
            moved.append(entry)
        os.rename(tmp, dest)
    except BaseException:
        for entry in moved:  # put everything back where it was
            os.rename(tmp / entry, old / entry)
        if not dest.exists():
            os.rename(old, dest)
        raise
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
