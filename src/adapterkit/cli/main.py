"""``adapterkit``: the command table, and the entry point that parses, calls and reports errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from adapterkit.cli import analysis, commands, generation, serving

COMMANDS: dict[str, Callable[..., int]] = {
    "train": commands.train,
    "evaluate": commands.evaluate,
    "predict": commands.predict,
    "info": commands.info,
    "generate": generation.generate,
    "chat": generation.chat,
    "export": commands.export,
    "serve": serving.serve,
    "analyze": analysis.analyze,
}

def _quiet_broken_pipe() -> None:
    """Output piped into a reader that stopped (``| head``): exit quietly, as Unix tools do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not fail again
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``adapterkit`` command; returns the process exit status.

    Errors that are the user's to fix (:class:`adapterkit.errors.UserError`)
    print one message and exit with status 2; ``--debug`` shows their
    traceback too. Anything else is an internal error and keeps its traceback.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # adapterkit never downloads
    from adapterkit.cli.parser import build_parser, call
    from adapterkit.errors import UserError

    parser = build_parser("adapterkit", "Adapter fine-tuning of pretrained transformers.", COMMANDS)
    args = parser.parse_args(argv)
    try:
        code = call(args)
        sys.stdout.flush()  # a closed pipe shows here, not as a warning at exit
        return code
    except KeyboardInterrupt:
        print("adapterkit: interrupted; continue a training run with --resume --output RUN", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_broken_pipe()
        return 0
    except UserError as err:
        if getattr(args, "_debug", False):
            raise
        print(f"adapterkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
