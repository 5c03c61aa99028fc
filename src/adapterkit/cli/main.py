"""``adapterkit``: the command table, and the entry point that parses, calls and reports errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from adapterkit.cli import commands, generation

COMMANDS: dict[str, Callable[..., int]] = {
    "train": commands.train,
    "evaluate": commands.evaluate,
    "predict": commands.predict,
    "info": commands.info,
    "generate": generation.generate,
    "chat": generation.chat,
}

# Errors that are the user's to fix: print the message, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError,
                                                NotImplementedError, FloatingPointError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``adapterkit`` command; returns the process exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # adapterkit never downloads
    from adapterkit.cli.parser import build_parser, call

    parser = build_parser("adapterkit", "Adapter fine-tuning of pretrained transformers.", COMMANDS)
    args = parser.parse_args(argv)
    try:
        return call(args)
    except KeyboardInterrupt:
        print("adapterkit: interrupted; continue a training run with --resume --output RUN", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"adapterkit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
