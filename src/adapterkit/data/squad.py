"""Extractive question answering data: SQuAD-format JSON, flat records, and a split by article.

A QA example is ``{"id", "question", "context", "answers", "title", "where"}``
where ``answers`` is a list of ``{"text", "answer_start"}`` reference answers
(several in SQuAD's dev set; none for a question to be answered by ``predict``)
and ``answer_start`` is a character offset into ``context``. Every reference
answer is checked against its context when it is read, so a misaligned offset
is reported with its file and JSON path rather than silently training on the
wrong span.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.jsontext import loads
from adapterkit.data.sources import read_text, require_file
from adapterkit.data.tables import Table, read_table
from adapterkit.data.values import is_missing, kind, preview

TASK = "question-answering"
SQUAD_SPLIT_SEED = 20240607  # fixed: changing it changes which articles are held out


def _require(condition: bool, source: str, where: str, problem: str) -> None:
    if not condition:
        raise DataError(source, problem, where=where)


def _answer(raw: Any, context: str, source: str, where: str) -> dict[str, Any]:
    """One checked reference answer ``{"text", "answer_start"}``."""
    _require(isinstance(raw, dict), source, where, f"expected an object with text and answer_start, "
             f"found {kind(raw)} {preview(raw)}")
    text, start = raw.get("text"), raw.get("answer_start")
    if hasattr(start, "item") and getattr(start, "ndim", 0) == 0:
        start = start.item()  # a numpy integer read from Parquet
    _require(isinstance(text, str) and text.strip() != "", source, where,
             f"expected the answer text to be a non-empty string, found {preview(text)}")
    _require(isinstance(start, int) and not isinstance(start, bool) and start >= 0, source, where,
             f"expected answer_start to be a non-negative integer character offset, found {preview(start)}")
    found = context[start : start + len(text)]
    _require(found == text, source, where,
             f"expected the answer {preview(text)} at character {start} of the context, found "
             f"{preview(found)} there; answer_start must be the 0-based character offset of the "
             "answer text in the context")
    return {"text": text, "answer_start": start}


def qa_example(question: str, context: str, answers: Sequence[Any] = (), qid: str | None = None,
               title: str = "", source: str = "<memory>", where: str = "") -> dict[str, Any]:
    """A checked QA example; ``answers`` may be empty (a question to answer with ``predict``)."""
    _require(isinstance(question, str) and question.strip() != "", source, where,
             f"expected the question to be a non-empty string, found {preview(question)}")
    _require(isinstance(context, str) and context.strip() != "", source, where,
             f"expected the context to be a non-empty string, found {preview(context)}")
    checked = [_answer(a, context, source, f"{where}.answers[{k}]" if where else f"answers[{k}]")
               for k, a in enumerate(answers)]
    return {"id": qid if qid is not None else where, "question": question, "context": context,
            "answers": checked, "title": title, "where": where}


def _articles(data: Any, source: str) -> list[Any]:
    _require(isinstance(data, dict) and isinstance(data.get("data"), list), source, "top level",
             'expected a SQuAD object {"version": ..., "data": [articles]}; '
             f"found {kind(data)}" + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else ""))
    return data["data"]


def squad_from_object(data: Any, source: str = "<memory>") -> TaskData:
    """Examples from a parsed SQuAD object ``{"data": [{"title", "paragraphs": [...]}]}``."""
    examples: list[dict[str, Any]] = []
    for a, article in enumerate(_articles(data, source)):
        where_a = f"data[{a}]"
        _require(isinstance(article, dict) and isinstance(article.get("paragraphs"), list), source,
                 where_a, f"expected an article object with a 'paragraphs' list, found {_shape(article)}")
        title = str(article.get("title", ""))
        for p, paragraph in enumerate(article["paragraphs"]):
            where_p = f"{where_a}.paragraphs[{p}]"
            _require(isinstance(paragraph, dict) and isinstance(paragraph.get("qas"), list), source,
                     where_p, f"expected a paragraph object with 'context' and a 'qas' list, found "
                     f"{_shape(paragraph)}")
            for q, qa in enumerate(paragraph["qas"]):
                where = f"{where_p}.qas[{q}]"
                _require(isinstance(qa, dict), source, where,
                         f"expected a question object, found {_shape(qa)}")
                qid = _question_id(qa.get("id"), source, where)
                if qid is not None:
                    where += f" (id {qid})"
                _require(qa.get("is_impossible", False) in (None, False), source, where,
                         "expected an answerable question, found is_impossible set; unanswerable "
                         "(SQuAD 2.0) questions are not supported, drop them")
                answers = qa.get("answers")
                answers = [] if answers is None else answers
                _require(isinstance(answers, list), source, where,
                         f"expected 'answers' to be a list, found {kind(answers)} {preview(answers)}")
                examples.append(qa_example(qa.get("question"), paragraph.get("context"), answers,
                                           qid, title, source, where))
    if not examples:
        raise DataError(source, "expected at least one question, found none")
    return TaskData(TASK, examples, None, source)


def _shape(value: Any) -> str:
    """An object's keys, or what it is instead, for a message."""
    if isinstance(value, dict):
        return f"an object with keys {sorted(map(str, value))[:8]}"
    return f"{kind(value)} {preview(value)}"


def _question_id(value: Any, source: str, where: str) -> str | None:
    """A question id as text; ids are strings or whole numbers."""
    if is_missing(value):
        return None
    _require(isinstance(value, (str, int)) and not isinstance(value, bool), source, where,
             f"expected the question id to be a string or a whole number, found {kind(value)} {preview(value)}")
    return str(value)


def _as_list(value: Any) -> Any:
    """Numpy arrays (list cells read from Parquet) as lists; anything else unchanged."""
    return value.tolist() if hasattr(value, "tolist") and getattr(value, "ndim", 0) else value


def _record_answers(value: Any, source: str, where: str) -> list[Any]:
    """Answers of a flat record: a list of objects, or ``{"text": [...], "answer_start": [...]}``."""
    value = _as_list(value)
    if is_missing(value):
        return []
    if isinstance(value, dict):  # Hugging Face datasets layout
        texts, starts = _as_list(value.get("text", [])), _as_list(value.get("answer_start", []))
        _require(isinstance(texts, list) and isinstance(starts, list), source, where,
                 "expected answers {\"text\": [texts], \"answer_start\": [offsets]}, found "
                 f"{kind(texts)} text and {kind(starts)} answer_start")
        _require(len(texts) == len(starts), source, where,
                 f"expected as many answer texts as answer_start values, found {len(texts)} texts "
                 f"but {len(starts)} answer_start values")
        return [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    _require(isinstance(value, (list, tuple)), source, where,
             f"expected answers to be a list of {{text, answer_start}} objects, found {kind(value)} "
             f"{preview(value)}")
    return list(value)


def qa_from_table(table: Table, question_column: str = "question", context_column: str = "context",
                  answers_column: str | None = "answers", id_column: str | None = "id",
                  labels: Sequence[str] | None = None) -> TaskData:
    """Examples from flat records (JSONL, Parquet, a ``datasets.Dataset``, a list of dicts).

    ``answers`` holds a list of ``{"text", "answer_start"}`` objects or the
    ``datasets`` layout ``{"text": [...], "answer_start": [...]}``. ``labels``
    is accepted for a uniform reader signature and ignored: question answering
    has no label vocabulary.
    """
    frame = table.frame
    for role, column in (("question", question_column), ("context", context_column)):
        if column not in frame.columns:
            raise DataError(table.source, f"no {role} column {column!r}; the columns found are "
                            f"{[str(c) for c in frame.columns]}")
    examples = []
    for i, row in enumerate(frame.to_dict("records")):
        where = table.where(i)
        answers = _record_answers(row.get(answers_column) if answers_column else None, table.source, where)
        qid = _question_id(row.get(id_column), table.source, where) if id_column else None
        examples.append(qa_example(row[question_column], row[context_column], answers,
                                   qid if qid is not None else where, "", table.source, where))
    if not examples:
        raise DataError(table.source, "expected at least one question, found none")
    columns = {"question_column": question_column, "context_column": context_column,
               "answers_column": answers_column, "id_column": id_column}
    return TaskData(TASK, examples, None, table.source, columns)


def qa_from_pairs(pairs: Iterable[Any]) -> TaskData:
    """Unlabelled examples for ``predict``: ``(question, context)`` pairs or ``{"question", "context"}`` dicts."""
    examples = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, dict) and {"question", "context"} <= set(pair):
            pair = (pair["question"], pair["context"])
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise DataError("<inputs>", "expected a (question, context) pair or a {question, context} "
                            f"object, found {kind(pair)} {preview(pair)}", where=f"input {i}")
        examples.append(qa_example(pair[0], pair[1], (), str(i), where=f"input {i}"))
    return TaskData(TASK, examples, None, "<inputs>")


def _load_json(path: Path) -> Any:
    return loads(read_text(path), str(path))


def _is_squad(data: Any) -> bool:
    """Whether parsed JSON has SQuAD's nested layout: ``{"data": [{"paragraphs": ...}]}``.

    One article with ``paragraphs`` is enough: the others are then checked as
    SQuAD articles, so a damaged one is reported as such.
    """
    articles = data.get("data") if isinstance(data, dict) else None
    return isinstance(articles, list) and any(isinstance(a, dict) and "paragraphs" in a for a in articles)


def read_squad(path: str | os.PathLike) -> TaskData:
    """Read a SQuAD-format JSON file (v1.1 layout) into ``TaskData``."""
    path = require_file(path)
    return squad_from_object(_load_json(path), str(path))


def read_qa_file(path: str | os.PathLike, labels: Sequence[str] | None = None, **columns: str | None) -> TaskData:
    """A QA file: SQuAD JSON, or flat records (JSONL, Parquet...) read with ``qa_from_table``.

    ``labels`` is ignored (no label vocabulary); ``columns`` name the columns of flat records.
    """
    path = Path(path)
    if path.suffix.lower() == ".json" and path.is_file():
        data = _load_json(path)
        if _is_squad(data):
            return squad_from_object(data, str(path))
    return qa_from_table(read_table(path), **{k: v for k, v in columns.items() if v is not None})


def split_by_article(data: dict[str, Any], validation: int | float = 0.2, seed: int = SQUAD_SPLIT_SEED,
                     source: str = "<memory>") -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a parsed SQuAD object into ``(train, validation)`` objects by whole articles.

    Questions about one article never land on both sides, so validation
    measures reading unseen text. ``validation`` is a number of articles
    (``int``) or a fraction of them (``float`` in (0, 1)); the held-out
    articles are drawn with a seeded generator, and both sides keep file order.
    """
    articles = _articles(data, source)
    n = len(articles)
    if isinstance(validation, float):
        if not 0.0 < validation < 1.0:
            raise DataError(source, f"expected a validation fraction between 0 and 1, found {validation}")
        count = max(1, int(round(validation * n)))
    else:
        count = validation
    if not 0 < count < n:
        raise DataError(source, f"cannot hold out {count} of {n} articles; expected to keep at least one "
                        "on each side")
    held = set(np.random.default_rng(seed).permutation(n)[:count].tolist())
    version = data.get("version", "1.1")
    train = {"version": version, "data": [a for i, a in enumerate(articles) if i not in held]}
    valid = {"version": version, "data": [a for i, a in enumerate(articles) if i in held]}
    return train, valid


def split_squad_file(path: str | os.PathLike, out_dir: str | os.PathLike, validation: int | float = 0.2,
                     seed: int = SQUAD_SPLIT_SEED) -> tuple[Path, Path]:
    """Split a SQuAD file by article into ``out_dir/train.json`` and ``out_dir/validation.json``."""
    path = require_file(path)
    train, valid = split_by_article(_load_json(path), validation, seed, str(path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "train.json", out / "validation.json")
    for target, part in zip(paths, (train, valid)):
        target.write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
    return paths
