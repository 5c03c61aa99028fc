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
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.tables import Table, read_table

TASK = "question-answering"
SQUAD_SPLIT_SEED = 20240607  # fixed: changing it changes which articles are held out


def _require(condition: bool, source: str, where: str, problem: str) -> None:
    if not condition:
        raise DataError(source, problem, where=where)


def _answer(raw: Any, context: str, source: str, where: str) -> dict[str, Any]:
    """One checked reference answer ``{"text", "answer_start"}``."""
    _require(isinstance(raw, dict), source, where, f"expected an object with text and answer_start, "
             f"found {type(raw).__name__}")
    text, start = raw.get("text"), raw.get("answer_start")
    _require(isinstance(text, str) and text.strip() != "", source, where,
             f"answer text must be a non-empty string, found {text!r}")
    _require(isinstance(start, int) and not isinstance(start, bool) and start >= 0, source, where,
             f"answer_start must be a non-negative integer character offset, found {start!r}")
    found = context[start : start + len(text)]
    _require(found == text, source, where,
             f"answer {text!r} does not start at character {start} of the context, which has "
             f"{found!r} there; answer_start must be the 0-based character offset of the answer "
             "text in the context")
    return {"text": text, "answer_start": start}


def qa_example(question: str, context: str, answers: Sequence[Any] = (), qid: str | None = None,
               title: str = "", source: str = "<memory>", where: str = "") -> dict[str, Any]:
    """A checked QA example; ``answers`` may be empty (a question to answer with ``predict``)."""
    _require(isinstance(question, str) and question.strip() != "", source, where,
             f"question must be a non-empty string, found {question!r}")
    _require(isinstance(context, str) and context.strip() != "", source, where,
             f"context must be a non-empty string, found {context!r}")
    checked = [_answer(a, context, source, f"{where}.answers[{k}]" if where else f"answers[{k}]")
               for k, a in enumerate(answers)]
    return {"id": qid if qid is not None else where, "question": question, "context": context,
            "answers": checked, "title": title, "where": where}


def _articles(data: Any, source: str) -> list[Any]:
    _require(isinstance(data, dict) and isinstance(data.get("data"), list), source, "top level",
             'expected a SQuAD object {"version": ..., "data": [articles]}; '
             f"found {type(data).__name__} with keys {sorted(data) if isinstance(data, dict) else []}")
    return data["data"]


def squad_from_object(data: Any, source: str = "<memory>") -> TaskData:
    """Examples from a parsed SQuAD object ``{"data": [{"title", "paragraphs": [...]}]}``."""
    examples: list[dict[str, Any]] = []
    for a, article in enumerate(_articles(data, source)):
        where_a = f"data[{a}]"
        _require(isinstance(article, dict) and isinstance(article.get("paragraphs"), list), source,
                 where_a, "an article must be an object with a 'paragraphs' list")
        title = str(article.get("title", ""))
        for p, paragraph in enumerate(article["paragraphs"]):
            where_p = f"{where_a}.paragraphs[{p}]"
            _require(isinstance(paragraph, dict) and isinstance(paragraph.get("qas"), list), source,
                     where_p, "a paragraph must be an object with 'context' and a 'qas' list")
            for q, qa in enumerate(paragraph["qas"]):
                where = f"{where_p}.qas[{q}]"
                _require(isinstance(qa, dict), source, where, "a question must be an object")
                if "id" in qa:
                    where += f" (id {qa['id']})"
                _require(not qa.get("is_impossible", False), source, where,
                         "unanswerable (SQuAD 2.0) questions are not supported; drop them")
                answers = qa.get("answers") or []
                _require(isinstance(answers, list), source, where, "'answers' must be a list")
                examples.append(qa_example(qa.get("question"), paragraph.get("context"), answers,
                                           qa.get("id"), title, source, where))
    if not examples:
        raise DataError(source, "no questions found")
    return TaskData(TASK, examples, None, source)


def _record_answers(value: Any, source: str, where: str) -> list[Any]:
    """Answers of a flat record: a list of objects, or ``{"text": [...], "answer_start": [...]}``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, dict):  # Hugging Face datasets layout
        texts, starts = list(value.get("text", [])), list(value.get("answer_start", []))
        _require(len(texts) == len(starts), source, where,
                 f"answers has {len(texts)} texts but {len(starts)} answer_start values")
        return [{"text": t, "answer_start": int(s)} for t, s in zip(texts, starts)]
    _require(isinstance(value, (list, tuple, np.ndarray)), source, where,
             f"answers must be a list of {{text, answer_start}} objects, found {type(value).__name__}")
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
        _require(column in frame.columns, table.source, "columns",
                 f"no {role} column {column!r}; the columns found are {[str(c) for c in frame.columns]}")
    examples = []
    for i, row in enumerate(frame.to_dict("records")):
        where = table.where(i)
        answers = _record_answers(row.get(answers_column) if answers_column else None, table.source, where)
        qid = row.get(id_column) if id_column else None
        examples.append(qa_example(row[question_column], row[context_column], answers,
                                   str(qid) if qid is not None else where, "", table.source, where))
    if not examples:
        raise DataError(table.source, "no questions found")
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
            raise ValueError(f"question answering input {i} must be a (question, context) pair, got {pair!r}")
        examples.append(qa_example(pair[0], pair[1], (), str(i), where=f"input {i}"))
    return TaskData(TASK, examples, None, "<inputs>")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(str(path), f"invalid JSON: {err.msg}", where=f"line {err.lineno}") from None
    except UnicodeDecodeError as err:
        raise DataError(str(path), f"not valid UTF-8 at byte {err.start}; re-save the file as UTF-8") from None


def _is_squad(data: Any) -> bool:
    """Whether parsed JSON has SQuAD's nested layout: ``{"data": [{"paragraphs": ...}]}``."""
    articles = data.get("data") if isinstance(data, dict) else None
    return isinstance(articles, list) and all(isinstance(a, dict) and "paragraphs" in a for a in articles)


def read_squad(path: str | os.PathLike) -> TaskData:
    """Read a SQuAD-format JSON file (v1.1 layout) into ``TaskData``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such file")
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
            raise ValueError(f"validation fraction must be in (0, 1), got {validation}")
        count = max(1, int(round(validation * n)))
    else:
        count = validation
    if not 0 < count < n:
        raise ValueError(f"{source}: cannot hold out {count} of {n} articles; keep at least one on each side")
    held = set(np.random.default_rng(seed).permutation(n)[:count].tolist())
    version = data.get("version", "1.1")
    train = {"version": version, "data": [a for i, a in enumerate(articles) if i not in held]}
    valid = {"version": version, "data": [a for i, a in enumerate(articles) if i in held]}
    return train, valid


def split_squad_file(path: str | os.PathLike, out_dir: str | os.PathLike, validation: int | float = 0.2,
                     seed: int = SQUAD_SPLIT_SEED) -> tuple[Path, Path]:
    """Split a SQuAD file by article into ``out_dir/train.json`` and ``out_dir/validation.json``."""
    path = Path(path)
    train, valid = split_by_article(_load_json(path), validation, seed, str(path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "train.json", out / "validation.json")
    for target, part in zip(paths, (train, valid)):
        target.write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
    return paths
