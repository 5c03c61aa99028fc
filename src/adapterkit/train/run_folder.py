"""The run folder: what a training run may write where, and how an earlier run is kept safe.

Three ways to point a run at a folder:

- a new or empty folder: the run writes there;
- a folder that holds a run, with ``resume``: the run continues it;
- a folder that holds a run, with ``overwrite``: the new run is written into a
  staging folder beside it, and swapped into place (atomically, see
  :func:`adapterkit.core.atomic.exchange`) only once it has written its first
  checkpoint. Until then the earlier run stays whole; if the new run fails
  first, the staging folder is deleted and nothing of the earlier run changed.

Without either flag, a folder that holds a run is refused.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from adapterkit.core.atomic import replace_folder
from adapterkit.errors import ResumeError, RunFolderError

# Entries whose presence means a folder holds (part of) a training run.
RUN_MARKERS = ("config.yaml", "train_config.yaml", "metrics.jsonl", "checkpoints", "adapter")
STAGING_MARK = ".overwrite-"


def holds_run(folder: Path) -> bool:
    """True when ``folder`` has any file a training run writes."""
    return folder.is_dir() and any((folder / name).exists() for name in RUN_MARKERS)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written in it.

    Raises :class:`RunFolderError` naming the folder and the reason (read-only
    file system, no permission, disk full, a file in the way), so a run fails
    before it loads data and models rather than when it first saves.
    """
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run folder {folder} is a file, not a folder; give --output a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        with probe.open("wb") as out:
            out.write(b"\0" * 4096)  # a few blocks, so a full disk shows up here
            out.flush()
            os.fsync(out.fileno())
        probe.unlink()
    except OSError as err:
        reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
                  errno.EDQUOT: "the disk quota is used up"}.get(err.errno or 0, err.strerror or str(err))
        raise RunFolderError(
            f"cannot write the run folder {folder}: {reason}. A training run writes checkpoints, "
            "metrics and the adapter there; give --output a writable folder with free space"
        ) from None


class RunFolder:
    """Where a run writes, resolved once before it loads anything.

    Attributes:
        final: the folder the user named.
        path: where files go now: ``final``, or the staging folder of an
            ``overwrite`` run until :meth:`commit` swaps it in.
        resume: the run continues the one in ``final``.
    """

    def __init__(self, final: Path, path: Path, resume: bool) -> None:
        self.final = final
        self.path = path
        self.resume = resume

    @property
    def staging(self) -> bool:
        """True while the run writes beside an earlier run it will replace."""
        return self.path != self.final

    @classmethod
    def prepare(cls, folder: str | os.PathLike[str], *, resume: bool = False,
                overwrite: bool = False) -> "RunFolder":
        """Check ``folder`` against the flags and make it ready to write.

        Raises:
            RunFolderError: the folder holds a run and neither flag was given,
                or it cannot be written.
            ResumeError: ``resume`` without a run in the folder, or with ``overwrite``.
        """
        final = Path(folder)
        if resume and overwrite:
            raise ResumeError("--resume continues the run in the folder and --overwrite replaces it; give one")
        if final.exists() and not final.is_dir():
            raise RunFolderError(f"run folder {final} is a file, not a folder; give --output a folder path")
        if resume:
            if not holds_run(final):
                raise ResumeError(f"--resume: {final} holds no training run to continue "
                                  "(no config.yaml, metrics.jsonl or checkpoints/); start without --resume")
            check_writable(final)
            return cls(final, final, resume=True)
        if not holds_run(final):
            check_writable(final)
            return cls(final, final, resume=False)
        if not overwrite:
            raise RunFolderError(
                f"{final} already holds a training run ({', '.join(n for n in RUN_MARKERS if (final / n).exists())}). "
                "Continue it with --resume, replace it with --overwrite (the earlier run is kept until the "
                "new one has written its first checkpoint), or choose another --output"
            )
        check_writable(final.parent)
        staging = final.parent / f".{final.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        return cls(final, staging, resume=False)

    def commit(self) -> None:
        """Put a staged run in place of the earlier one (a no-op for an ordinary run).

        Files open in the staging folder stay valid: a rename moves the folder,
        not the files in it.
        """
        if not self.staging:
            return
        replace_folder(self.path, self.final)  # the earlier run is deleted once the new one is in place
        self.path = self.final

    def discard(self) -> None:
        """Delete a staging folder that never got its first checkpoint; the earlier run is untouched."""
        if self.staging:
            shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.final)!r}, staging={self.staging}, resume={self.resume})"
