"""Entity tag schemes (IOB1, IOB2/BIO, BIOES): parsing, entity spans, conversion.

A tag is ``O`` or ``PREFIX-TYPE`` with a prefix ``B`` (begin), ``I`` (inside),
``E`` (end) or ``S`` (single); the type may itself contain dashes
(``B-geo-loc``). Entity spans follow the CoNLL ``conlleval`` semantics,
extended to E/S the way ``seqeval`` extends them, so one function reads every
scheme and also reads malformed sequences (an ``I-`` without a ``B-`` starts
an entity; a type change ends one):

    a tag continues the open entity exactly when the previous tag is ``B`` or
    ``I``, this tag is ``I`` or ``E``, and the types are equal; any other
    non-``O`` tag starts a new entity, and an ``E`` or ``S`` closes its entity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

from adapterkit.errors import UserError

Scheme = Literal["IOB1", "IOB2", "BIOES"]
SCHEMES: tuple[Scheme, ...] = ("IOB1", "IOB2", "BIOES")
# Other names people use for the same schemes.
SCHEME_ALIASES: dict[str, Scheme] = {"BIO": "IOB2", "IOBES": "BIOES", "BILOU": "BIOES"}
# The prefixes each scheme may use (``O`` is always allowed).
SCHEME_PREFIXES: dict[str, tuple[str, ...]] = {"IOB1": ("B", "I"), "IOB2": ("B", "I"), "BIOES": ("B", "I", "E", "S")}
PREFIXES = frozenset("BIES")


class TagError(UserError, ValueError):
    """A tag or tag scheme name that is not one adapterkit reads (the user's to fix)."""


class Span(NamedTuple):
    """An entity over words ``start`` (inclusive) to ``end`` (exclusive)."""

    type: str
    start: int
    end: int


def scheme_name(name: str) -> Scheme:
    """The canonical name of a scheme (``"bio"`` -> ``"IOB2"``); raises ``TagError`` if unknown."""
    upper = name.upper()
    upper = SCHEME_ALIASES.get(upper, upper)
    if upper not in SCHEMES:
        raise TagError(f"unknown tag scheme {name!r}; expected one of {list(SCHEMES)} "
                       f"(or {sorted(SCHEME_ALIASES)})")
    return upper  # type: ignore[return-value]


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``, ``"O"`` -> ``("O", "")``.

    Raises:
        TagError: the tag is neither ``O`` nor ``B-/I-/E-/S-TYPE`` (a ``ValueError``).
    """
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[0] in PREFIXES and tag[1] == "-":
        return tag[0], tag[2:]
    raise TagError(f"tag {tag!r} is neither 'O' nor PREFIX-TYPE with a prefix B, I, E or S "
                   "(e.g. 'B-PER')")


def entity_spans(tags: Sequence[str]) -> list[Span]:
    """The entities of one tag sequence, in order, with CoNLL semantics (see the module doc)."""
    spans: list[Span] = []
    start: int | None = None  # start of the open entity
    prev_prefix, prev_type = "O", ""
    for i, tag in enumerate(tags):
        prefix, type_ = split_tag(tag)
        continues = prev_prefix in ("B", "I") and prefix in ("I", "E") and prev_type == type_
        if start is not None and not continues:
            spans.append(Span(prev_type, start, i))
            start = None
        if prefix != "O" and not continues:
            start = i
        if prefix in ("E", "S") and start is not None:
            spans.append(Span(type_, start, i + 1))
            start = None
        prev_prefix, prev_type = prefix, type_
    if start is not None:
        spans.append(Span(prev_type, start, len(tags)))
    return spans


def tags_from_spans(spans: Iterable[Span], length: int, scheme: Scheme) -> list[str]:
    """The tag sequence of ``length`` words that encodes ``spans`` (non-overlapping) in ``scheme``."""
    tags = ["O"] * length
    previous: Span | None = None
    for span in spans:
        size = span.end - span.start
        if scheme == "BIOES":
            inner = [f"I-{span.type}"] * max(size - 2, 0)
            tags[span.start:span.end] = [f"S-{span.type}"] if size == 1 else \
                [f"B-{span.type}", *inner, f"E-{span.type}"]
        else:
            # IOB1 uses B- only where an entity directly follows one of the same type.
            adjacent = previous is not None and previous.end == span.start and previous.type == span.type
            first = "B" if scheme == "IOB2" or adjacent else "I"
            tags[span.start:span.end] = [f"{first}-{span.type}"] + [f"I-{span.type}"] * (size - 1)
        previous = span
    return tags


def convert_tags(tags: Sequence[str], scheme: Scheme) -> list[str]:
    """``tags`` (in any scheme) re-encoded in ``scheme``; the entities stay the same."""
    return tags_from_spans(entity_spans(tags), len(tags), scheme)


def starts_with_inside(tags: Sequence[str]) -> int | None:
    """The index of the first ``I-`` tag that begins an entity (IOB1 style), else ``None``."""
    prev_prefix, prev_type = "O", ""
    for i, tag in enumerate(tags):
        prefix, type_ = split_tag(tag)
        if prefix == "I" and not (prev_prefix in ("B", "I") and prev_type == type_):
            return i
        prev_prefix, prev_type = prefix, type_
    return None


def detect_scheme(sequences: Iterable[Sequence[str]]) -> Scheme:
    """The scheme of a data set: BIOES if any ``E-``/``S-`` tag, IOB1 if an ``I-`` begins an entity, else IOB2."""
    iob1 = False
    for tags in sequences:
        if any(tag[:2] in ("E-", "S-") for tag in tags):
            return "BIOES"
        iob1 = iob1 or starts_with_inside(tags) is not None
    return "IOB1" if iob1 else "IOB2"


def scheme_labels(types: Iterable[str], scheme: Scheme) -> list[str]:
    """The label vocabulary of ``types`` in ``scheme``: ``O`` first, then each type's tags."""
    prefixes = SCHEME_PREFIXES["IOB2" if scheme == "IOB1" else scheme]
    return ["O"] + [f"{p}-{t}" for t in sorted(set(types)) for p in prefixes]


def labels_scheme(labels: Sequence[str]) -> Scheme:
    """The scheme a label vocabulary encodes: BIOES when it has ``E-``/``S-`` labels, else IOB2."""
    return "BIOES" if any(label[:2] in ("E-", "S-") for label in labels) else "IOB2"


def label_types(labels: Sequence[str]) -> list[str]:
    """The entity types of a label vocabulary, sorted."""
    return sorted({split_tag(label)[1] for label in labels if label != "O"})
