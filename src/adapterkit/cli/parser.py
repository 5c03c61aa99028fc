"""Build an argparse parser from a table of typed command functions.

Flags come from each function's signature: a parameter without a default is
positional, a keyword-only one without a default is a required option, ``bool`` is a switch, ``X | None`` takes an ``X``, a ``Literal``
gives the choices, ``list[str]`` takes any number of values (an option may also be repeated). Help text comes
from the ``Args:`` section of the docstring.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal


def _doc_parts(fn: Callable) -> tuple[str, dict[str, str]]:
    """The summary line and ``{parameter: help}`` from a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n", 1)[0].replace("\n", " ")
    helps: dict[str, str] = {}
    if "Args:" in doc:
        body = doc.split("Args:", 1)[1]
        body = re.split(r"\n\S", body, maxsplit=1)[0]  # stop at the next section
        for match in re.finditer(r"^\s+(\w+):\s*(.+?)(?=^\s+\w+:|\Z)", body, re.M | re.S):
            helps[match.group(1)] = " ".join(match.group(2).split())
    return summary, helps


def _unwrap_optional(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _argument(name: str, param: inspect.Parameter, hint: Any, help_text: str) -> tuple[list[str], dict]:
    """argparse ``add_argument`` args and kwargs for one parameter."""
    hint = _unwrap_optional(hint)
    required = param.default is inspect.Parameter.empty
    positional = required and param.kind is not inspect.Parameter.KEYWORD_ONLY
    flag = name if positional else "--" + name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%")}
    if not positional:
        kwargs["dest"] = name
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
    if hint is bool:
        kwargs["action"] = "store_true"
    elif typing.get_origin(hint) is list:
        kwargs["nargs"] = "*"
        kwargs["type"] = typing.get_args(hint)[0] if typing.get_args(hint) else str
        if positional:
            kwargs["default"] = []
        else:  # ``--adapter A --adapter B`` and ``--adapter A B`` both give [A, B]
            kwargs["action"] = "extend"
    elif typing.get_origin(hint) is Literal:
        kwargs["choices"] = list(typing.get_args(hint))
    elif hint in (int, float, str, Path):
        kwargs["type"] = hint
        if not positional:
            kwargs["metavar"] = {int: "N", float: "X", str: name.split("_")[-1].upper(), Path: name.upper()}[hint]
    return [flag], kwargs


def build_parser(prog: str, description: str, commands: dict[str, Callable[..., int]]) -> argparse.ArgumentParser:
    """One sub-command per table entry, its options derived from the function."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command, fn in commands.items():
        summary, helps = _doc_parts(fn)
        hints = typing.get_type_hints(fn)
        cmd = sub.add_parser(command, help=summary, description=summary)
        for name, param in inspect.signature(fn).parameters.items():
            flags, kwargs = _argument(name, param, hints.get(name, str), helps.get(name, ""))
            cmd.add_argument(*flags, **kwargs)
        cmd.add_argument("--debug", action="store_true", dest="_debug",
                         help="show the traceback of an error, not only its message")
        cmd.set_defaults(_function=fn)
    return parser


def call(args: argparse.Namespace) -> int:
    """Call the chosen command function with the parsed values."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "_function", "_debug")}
    return int(args._function(**values) or 0)
