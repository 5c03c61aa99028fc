"""The marker of errors that are the user's to fix.

Every error raised because of what the user gave (a file, a flag, a folder, a
config value) derives from :class:`UserError` as well as from the built-in type
that fits it (``ValueError``, ``FileNotFoundError``...). The command line prints
a ``UserError``'s message and exits non-zero without a traceback; any other
exception is an internal error and keeps its traceback. Nothing here imports
the rest of adapterkit, so every layer may use it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; its message says what was expected,
    what was found, and, where it can, what to do."""


class RunFolderError(UserError, FileExistsError):
    """A run folder that cannot be used as asked (it holds another run, or is not writable)."""


class ResumeError(UserError, ValueError):
    """A ``--resume`` that cannot continue the run in the folder as asked."""


class UsageError(UserError, ValueError):
    """Options that do not go together, or a value no option accepts."""


class UnknownNameError(UserError, KeyError):
    """A name (adapter, method, task, metric) that is not among the known ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class WrongTypeError(UserError, TypeError):
    """A value of a type the function or option does not take."""


class UnsupportedError(UserError, NotImplementedError):
    """A request adapterkit understands but cannot do for this method, task or model."""
