"""Replacing a folder all at once.

An adapter or a checkpoint is several files that only make sense together, so
a save writes them into a fresh folder beside the destination, flushes them to
disk, and only then swaps that folder into place. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)`` call, so the destination always holds a complete
copy, old or new; elsewhere the old folder is renamed aside, the new one
renamed in, and the old one deleted, and a crash between the two renames
leaves the destination missing with both complete copies beside it, which
:func:`interrupted_save` finds. An exception or a crash at any point never
leaves a mix of old and new files at the destination.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator

# Names of the folders a save leaves beside its destination while it runs.
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_AT_FDCWD = -100


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


def write_text_atomically(path: Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` so a crash leaves the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    with tmp.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_folder(dest: str | os.PathLike[str], owned: Collection[str] | None = None) -> Iterator[Path]:
    """Yield an empty folder to fill; on a clean exit it replaces ``dest``.

    ``owned`` names the entries this writer is responsible for (``None``: all of
    them, the folder is replaced whole). Other entries
    already in ``dest`` (a training run's logs, say) are carried over into the
    new folder unchanged. On an exception the temporary folder is deleted and
    ``dest`` is left exactly as it was.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"cannot save an adapter to {dest}: it exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the writer's process id, see _abandoned
    tmp = dest.parent / f".{dest.name}{TMP_MARK}{token}"
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
    for stale in leftovers(dest):  # what interrupted saves left; dest is newer and whole
        if OLD_MARK in stale.name or _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)


def _abandoned(tmp: Path) -> bool:
    """True for a temporary folder whose writing process no longer runs (it was killed mid-save)."""
    try:
        pid = int(tmp.name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _renameat2() -> "ctypes._CFuncPtr | None":
    """libc's ``renameat2``, or None where the C library has none (not Linux, old glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one atomic step.

    Returns False (and changes nothing) where the operating system or file
    system cannot do it; the caller then falls back to two renames.
    """
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_folder(new: Path, dest: Path) -> None:
    """Put the complete folder ``new`` in place of the folder ``dest``, whole, and delete the old one."""
    _swap_in(new, dest, None, uuid.uuid4().hex[:8])


def _swap_in(tmp: Path, dest: Path, owned: Collection[str] | None, token: str) -> None:
    """Carry ``dest``'s foreign entries over into ``tmp``, then put ``tmp`` in ``dest``'s place."""
    if not dest.exists():
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
        return
    foreign = [] if owned is None else [
        e.name for e in dest.iterdir() if e.name not in owned and not (tmp / e.name).exists()]
    if not foreign and exchange(tmp, dest):
        # ``tmp`` now holds the previous copy; ``dest`` was complete at every instant.
        fsync_dir(dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = dest.parent / f".{dest.name}{OLD_MARK}{token}"
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


def leftovers(dest: str | os.PathLike[str]) -> list[Path]:
    """Folders an interrupted save of ``dest`` left beside it (newest first)."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    found = [p for p in dest.parent.iterdir() if p.is_dir()
             and (p.name.startswith(f".{dest.name}{TMP_MARK}") or p.name.startswith(f".{dest.name}{OLD_MARK}"))]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def interrupted_save(dest: str | os.PathLike[str]) -> str | None:
    """What to tell a user whose ``dest`` is missing or incomplete after a crash, or None.

    A ``.old-`` folder is the previous complete copy, renamed aside just before
    the new one was renamed in; a ``.tmp-`` folder is a copy being written,
    complete only if the crash came after it was flushed.
    """
    dest = Path(dest)
    found = leftovers(dest)
    if not found:
        return None
    old = [p for p in found if OLD_MARK in p.name]
    if old:
        return (f"a save of {dest} was interrupted between its two renames; {old[0]} holds the "
                f"previous complete copy: rename it to {dest} (mv '{old[0]}' '{dest}') to use it")
    return (f"a save of {dest} was interrupted while {found[0]} was being written; that folder "
            "may be incomplete: delete it, and use the last complete copy or rerun the save")
