"""Getting a data file's text: checks on the path, decompression, strict UTF-8, lines.

Every reader goes through these functions, so a missing file, a corrupt
``.gz`` or a byte that is not UTF-8 gives the same kind of ``DataError``
whatever the format.

Lines: a line ends at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (Python's universal
newlines), and nowhere else. ``str.splitlines`` is not used because it also
breaks at characters that are ordinary text inside a record (form feed,
``\\x1c``-``\\x1e``, NEL ``\\x85``, U+2028 and U+2029), which would shift line
numbers and, in line-aligned formats, split one record in two.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from collections.abc import Callable
from pathlib import Path

from adapterkit.data.errors import DataError

# Compression suffixes undone before parsing, and how.
DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".bz2": bz2.decompress,
    ".gz": gzip.decompress,
    ".xz": lzma.decompress,
}
# What the decompressors raise for data that is not what the suffix says.
DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)

LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BYTE_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` without their line breaks; a final line break adds no empty line."""
    lines = LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def line_at(text: str | bytes, offset: int) -> int:
    """The 1-based line on which character (or byte) ``offset`` of ``text`` lies."""
    pattern = _BYTE_LINE_BREAK if isinstance(text, bytes) else LINE_BREAK
    # A "\r\n" cut in half by ``offset`` counts once: the "\r" alone is the break.
    return len(pattern.findall(text, 0, offset)) + 1


def require_file(path: str | Path) -> Path:
    """``path`` as a ``Path``, or a ``DataError`` when it is missing or not a file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), "expected a data file, found a folder; give the file inside it")
    if not path.is_file():
        raise DataError(str(path), "the file does not exist; check the path and the working directory")
    return path


def read_bytes(path: str | Path) -> bytes:
    """The contents of the file at ``path``, decompressed when its last suffix is .bz2/.gz/.xz.

    Raises:
        DataError: the file is missing or unreadable, or its contents are not
            what the compression suffix says.
    """
    path = require_file(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(str(path), f"cannot read the file: {err.strerror or err}") from None
    suffix = path.suffix.lower()
    if suffix not in DECOMPRESSORS:
        return raw
    try:
        return DECOMPRESSORS[suffix](raw)
    except DECOMPRESSION_ERRORS as err:
        raise DataError(str(path), f"expected {suffix}-compressed data, found bytes that do not "
                        f"decompress ({err}); check the file is complete, or rename it if it is "
                        "not compressed") from None


def decode_utf8(raw: bytes, source: str) -> str:
    """Strict UTF-8 decoding without a byte-order mark.

    Raises:
        DataError: a byte that is not UTF-8 (with its line and offset), or a
            file with nothing but whitespace.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 4]
        raise DataError(
            source,
            f"expected UTF-8 text, found the bytes {bad!r} at byte offset {err.start}, which are "
            "not valid UTF-8; re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
            where=f"line {line_at(raw, err.start)}",
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first line
    if not text.strip():
        raise DataError(source, "expected data, found an empty file (or only whitespace)")
    return text


def read_text(path: str | Path) -> str:
    """The decoded text of a (possibly compressed) UTF-8 file; see ``read_bytes`` and ``decode_utf8``."""
    return decode_utf8(read_bytes(path), str(path))
