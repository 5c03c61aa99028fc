"""Parallel text files: ``train.en`` and ``train.de`` aligned line by line (Multi30k, WMT).

A path whose suffix is a language code and which has a sibling with the same
stem and another language code is a parallel file: ``multi30k/train.en``
pairs with ``multi30k/train.de`` (English to German); give ``train.de`` for
the other direction.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from adapterkit.data.errors import DataError
from adapterkit.data.sources import read_text, require_file, split_lines

# Language codes whose names go into translation prompts; other codes are used as they are.
LANGUAGES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fi": "Finnish",
    "fr": "French", "hi": "Hindi", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "tr": "Turkish", "uk": "Ukrainian",
    "zh": "Chinese",
}
LANGUAGE_SUFFIX = re.compile(r"^\.[a-z]{2,3}$")
# Suffixes that are file formats, never languages.
NOT_LANGUAGES = {".csv", ".tsv", ".txt", ".json", ".jsonl", ".pq", ".gz", ".bz2", ".xz", ".yml", ".yaml"}


@dataclass
class ParallelText:
    """Aligned source and target lines of one parallel file pair."""

    sources: list[str]
    targets: list[str]
    source_language: str  # language code, e.g. "en"
    target_language: str
    source: str  # description for error messages and metadata
    where: list[str]  # "line N" of each pair

    @property
    def source_name(self) -> str:
        """The source language's name, e.g. "English"."""
        return language_name(self.source_language)

    @property
    def target_name(self) -> str:
        """The target language's name, e.g. "German"."""
        return language_name(self.target_language)


def language_name(code: str) -> str:
    """``"de"`` -> ``"German"``; unknown codes come back unchanged."""
    return LANGUAGES.get(code, code)


def _siblings(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.glob(f"{path.stem}.*")
                  if p != path and LANGUAGE_SUFFIX.match(p.suffix) and p.suffix not in NOT_LANGUAGES)


def is_parallel_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one side of a parallel file pair (``train.en`` beside ``train.de``)."""
    path = Path(path)
    if not LANGUAGE_SUFFIX.match(path.suffix) or path.suffix in NOT_LANGUAGES or not path.is_file():
        return False
    return bool(_siblings(path))


def _lines(path: Path) -> list[str]:
    """The lines of ``path``, without the blank lines at its end."""
    lines = split_lines(read_text(path))
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_parallel(path: str | os.PathLike, target_language: str | None = None) -> ParallelText:
    """Read ``path`` (the source side) and its sibling in ``target_language``.

    Without ``target_language`` the sibling must be the only one. Lines pair up
    by position (a line ends at ``\n``, ``\r\n`` or ``\r``, nowhere else);
    both files must have the same number of lines, not counting blank lines
    at the end. A pair whose two sides are both blank is skipped; a pair with
    one blank side is an error, as it is almost always a misalignment.
    """
    path = require_file(path)
    siblings = _siblings(path)
    if target_language is not None:
        siblings = [p for p in siblings if p.suffix == f".{target_language}"]
    if len(siblings) != 1:
        found = [p.name for p in _siblings(path)]
        raise DataError(str(path), f"expected one parallel file beside it, found {found or 'none'}"
                        + ("" if target_language else "; choose one with target_language=..."))
    target = siblings[0]
    sources, targets = _lines(path), _lines(target)
    if len(sources) != len(targets):
        raise DataError(str(path), f"{len(sources)} lines, but {target.name} has {len(targets)}; "
                        "parallel files must align line by line")
    for i, (text, other) in enumerate(zip(sources, targets)):
        if bool(text.strip()) != bool(other.strip()):
            blank, full = (path.name, target.name) if not text.strip() else (target.name, path.name)
            raise DataError(f"{path} + {target.name}", f"expected both sides of a pair to hold text, found "
                            f"a blank line in {blank} beside text in {full}; parallel files must align "
                            "line by line", where=f"line {i + 1}")
    kept = [i for i, (s, t) in enumerate(zip(sources, targets)) if s.strip()]
    return ParallelText(
        sources=[sources[i].strip() for i in kept],
        targets=[targets[i].strip() for i in kept],
        source_language=path.suffix[1:],
        target_language=target.suffix[1:],
        source=f"{path} + {target.name}",
        where=[f"line {i + 1}" for i in kept],
    )
