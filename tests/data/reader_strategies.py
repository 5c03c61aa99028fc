"""Hypothesis strategies and file writers for the reader properties (test_reader_properties.py).

Three kinds of input per format: noise (random bytes, and bytes built from the
format's own tokens so the parser gets past its first character), mutations
of a valid file (bytes deleted, inserted or replaced), and well-formed data
written with the standard writer (``csv``, ``json``, pandas' Parquet writer)
together with what a reader must give back.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd
from hypothesis import strategies as st

# A physical line ends at \n, \r\n or \r: counted here independently of the readers.
LINE_BREAK = re.compile(r"\r\n|\r|\n")

# Characters that stress parsers: delimiters, quotes, every line break Python
# knows, NUL, a byte-order mark, non-ASCII letters and an emoji.
TRICKY = ',;"\'\t\n\r \\\x00\x0b\x0c\x1c\x85\u2028\u2029\ufeffé中😀#{}[]:'
ANY_CHAR = st.one_of(st.sampled_from(TRICKY), st.characters(blacklist_categories=("Cs",)))


def texts(alphabet: st.SearchStrategy[str] = ANY_CHAR, max_size: int = 12) -> st.SearchStrategy[str]:
    """Texts with at least one non-space character."""
    return st.text(alphabet, min_size=1, max_size=max_size).filter(lambda s: s.strip() != "")


def no_chars(forbidden: str) -> st.SearchStrategy[str]:
    """``ANY_CHAR`` without the characters in ``forbidden``."""
    return ANY_CHAR.filter(lambda c: c not in forbidden)


# Labels are compared stripped, so generated ones have no outer whitespace.
LABELS = texts(max_size=6).map(str.strip).filter(bool)
# What one line of a line-based file may hold (a byte-order mark only ever starts a file).
LINE_CHARS = no_chars("\r\n\ufeff")
TSV_CHARS = no_chars("\t\r\n")
WORD_CHARS = ANY_CHAR.filter(lambda c: not c.isspace() and c != "\ufeff")


def start_line(text: str, offset: int) -> int:
    """The physical line (1-based) on which character ``offset`` of ``text`` lies."""
    return len(LINE_BREAK.findall(text, 0, offset)) + 1


# ---- noise ---------------------------------------------------------------------------------------

CSV_TOKENS = [b"text", b"label", b",", b"\t", b'"', b'""', b"\n", b"\r\n", b"\r", b"a", b" ", b"NA",
              b"1", b"\xff", b"\xc3\xa9", b"\xef\xbb\xbf", b"\x00", b"\xe2\x80\xa8"]
JSON_TOKENS = [b"{", b"}", b"[", b"]", b":", b",", b'"', b"\\", b'"a"', b"1", b"-0.5", b"1e999", b"null",
               b"true", b"NaN", b"\n", b" ", b"\xff", b"\xef\xbb\xbf", b'"text"', b'"label"',
               b'"data"', b'"paragraphs"', b'"qas"', b'"context"', b'"question"', b'"answers"',
               b'"answer_start"', b'"id"', b'"messages"', b'"role"', b'"content"', b'"user"',
               b'"assistant"', b'"prompt"', b'"response"', b'"instruction"', b'"output"',
               b'"tokens"', b'"tags"', b'"O"', b'"B-PER"']
CONLL_TOKENS = [b"word", b"O", b"B-PER", b"I-PER", b"E-LOC", b"S-", b"B-", b"X", b"-DOCSTART-", b" ",
                b"\t", b"\n", b"\r", b"\r\n", b"\x0c", b"\x85", b"\xe2\x80\xa8", b"\xff", b"\x00"]
LINE_TOKENS = [b"a dog", b" ", b"\n", b"\r\n", b"\r", b"\t", b"\xff", b"\xc3", b"\xef\xbb\xbf",
               b"\x0c", b"\xc2\x85", b"\xe2\x80\xa8", b"\x00"]


def noise(tokens: list[bytes], max_size: int = 120) -> st.SearchStrategy[bytes]:
    """Random bytes, or a random string of the format's tokens."""
    return st.one_of(st.binary(max_size=max_size),
                     st.lists(st.sampled_from(tokens), max_size=40).map(b"".join))


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes], tokens: list[bytes]) -> bytes:
    """A valid file with up to three bytes ranges deleted, tokens inserted or bytes replaced."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["delete", "insert", "replace"]))
        if action == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif action == "insert":
            data[at:at] = draw(st.sampled_from(tokens))
        elif data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
    return bytes(data)


JSON_KEYS = st.sampled_from(["text", "label", "data", "paragraphs", "qas", "context", "question",
                             "answers", "answer_start", "id", "messages", "role", "content",
                             "prompt", "response", "instruction", "input", "output", "tokens",
                             "tags", "title", "is_impossible"]) | st.text(max_size=4)
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.sampled_from(["user", "assistant", "O", "B-PER", "", " "]) | st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(JSON_KEYS, inner, max_size=5), max_leaves=25)


def json_shapes() -> st.SearchStrategy[bytes]:
    """Arbitrary JSON documents over the keys the readers look for."""
    return JSON_VALUES.map(lambda v: json.dumps(v).encode())


def jsonl_shapes() -> st.SearchStrategy[bytes]:
    """Arbitrary JSON Lines files over the keys the readers look for."""
    return st.lists(JSON_VALUES, max_size=5).map(
        lambda vs: "".join(json.dumps(v) + "\n" for v in vs).encode())


# ---- well-formed classification tables ----------------------------------------------------------

@dataclass
class Written:
    """A file's bytes and what reading it must give."""

    data: bytes
    texts: list[str]
    labels: list[str]
    where: list[str]  # the position of each row, as the reader names it


ROWS = st.lists(st.tuples(texts(), LABELS), min_size=1, max_size=8)


@st.composite
def csv_files(draw: st.DrawFn) -> Written:
    """A CSV file written by ``csv.writer``, with blank lines between records now and then.

    With "\n" line endings every field is quoted: Python's writer (3.11) quotes only
    the characters of its line terminator, so it would leave a lone "\r" bare,
    which every reader takes for a line break.
    """
    rows = draw(ROWS)
    ending, quoting = draw(st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\n", csv.QUOTE_ALL)]))
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator=ending, quoting=quoting)
    writer.writerow(["text", "label"])
    starts = []
    for text, label in rows:
        if draw(st.booleans()) and draw(st.booleans()):
            buffer.write(ending)  # a blank line
        starts.append(buffer.tell())
        writer.writerow([text, label])
    content = buffer.getvalue()
    where = [f"line {start_line(content, s)}" for s in starts]
    return Written(content.encode(), [t for t, _ in rows], [label for _, label in rows], where)


@st.composite
def tsv_files(draw: st.DrawFn) -> Written:
    """A TSV file: fields without tabs or line breaks, never quoted."""
    rows = draw(st.lists(st.tuples(texts(TSV_CHARS), LABELS.filter(lambda s: not set(s) & set("\t\r\n"))),
                         min_size=1, max_size=8))
    lines = ["text\tlabel", *(f"{t}\t{label}" for t, label in rows)]
    content = "\n".join(lines) + "\n"
    return Written(content.encode(), [t for t, _ in rows], [label for _, label in rows],
                   [f"line {i + 2}" for i in range(len(rows))])


@st.composite
def json_files(draw: st.DrawFn) -> Written:
    """A JSON list of records (or a {"data": [...]} wrapper), ASCII-escaped or not, indented or not."""
    rows = draw(ROWS)
    records: Any = [{"text": t, "label": label} for t, label in rows]
    if draw(st.booleans()):
        records = {"data": records}
    content = json.dumps(records, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    return Written(content.encode(), [t for t, _ in rows], [label for _, label in rows],
                   [f"record {i + 1}" for i in range(len(rows))])


@st.composite
def jsonl_files(draw: st.DrawFn) -> Written:
    """JSON Lines, one record per line, with raw U+2028/NEL when not ASCII-escaped, and blank lines."""
    rows = draw(ROWS)
    ascii_only = draw(st.booleans())
    lines, where = [], []
    for text, label in rows:
        if draw(st.booleans()) and draw(st.booleans()):
            lines.append("")
        lines.append(json.dumps({"text": text, "label": label}, ensure_ascii=ascii_only))
        where.append(f"line {len(lines)}")
    content = "\n".join(lines) + "\n"
    return Written(content.encode(), [t for t, _ in rows], [label for _, label in rows], where)


@st.composite
def parquet_files(draw: st.DrawFn) -> Written:
    """A Parquet file written by pandas, with or without its index."""
    rows = draw(ROWS)
    frame = pd.DataFrame({"text": [t for t, _ in rows], "label": [label for _, label in rows]})
    if draw(st.booleans()):
        frame.index = frame.index * 2 + 1  # a non-default index, stored as a column
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=draw(st.sampled_from([None, True, False])))
    return Written(buffer.getvalue(), list(frame["text"]), list(frame["label"]),
                   [f"record {i + 1}" for i in range(len(rows))])


def valid_parquet_bytes() -> st.SearchStrategy[bytes]:
    """Valid Parquet files, to be damaged by ``mutated``."""
    return parquet_files().map(lambda w: w.data)


def valid_bytes(files: st.SearchStrategy[Written]) -> st.SearchStrategy[bytes]:
    """Just the bytes of well-formed files."""
    return files.map(lambda w: w.data)


# ---- well-formed CoNLL ---------------------------------------------------------------------------

@dataclass
class Sentences:
    """A CoNLL file and the sentences a reader must give back."""

    data: bytes
    tokens: list[list[str]]
    tags: list[list[str]]
    where: list[str]


ENTITY_TYPES = st.sampled_from(["PER", "LOC", "geo-loc"])


@st.composite
def iob2_tags(draw: st.DrawFn) -> list[str]:
    """A valid IOB2 sequence (so the reader keeps it exactly as written)."""
    tags: list[str] = []
    for chunk in draw(st.lists(st.none() | st.tuples(ENTITY_TYPES, st.integers(1, 3)), min_size=1, max_size=5)):
        if chunk is None:
            tags.append("O")
        else:
            kind, size = chunk
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (size - 1)
    return tags


WORDS = st.text(WORD_CHARS, min_size=1, max_size=6).filter(lambda w: w != "-DOCSTART-")


@st.composite
def conll_files(draw: st.DrawFn) -> Sentences:
    """Token-per-line files: space or tab separated, an optional middle column, -DOCSTART- lines,
    whitespace-only sentence breaks."""
    separator = draw(st.sampled_from([" ", "\t", "  "]))
    middle = draw(st.booleans())
    lines: list[str] = ["-DOCSTART- -X- O", ""] if draw(st.booleans()) else []
    tokens, tags, where = [], [], []
    for sentence_tags in draw(st.lists(iob2_tags(), min_size=1, max_size=4)):
        words = [draw(WORDS) for _ in sentence_tags]
        where.append(f"sentence starting at line {len(lines) + 1}")
        for word, tag in zip(words, sentence_tags):
            lines.append(separator.join([word, "NN", tag] if middle else [word, tag]))
        lines.append(draw(st.sampled_from(["", " ", "\t"])))
        tokens.append(words)
        tags.append(sentence_tags)
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    return Sentences((ending.join(lines) + ending).encode(), tokens, tags, where)


# ---- well-formed SQuAD and flat QA records -------------------------------------------------------

@dataclass
class Questions:
    """A QA file and the examples a reader must give back: (id, question, context, answers)."""

    data: bytes
    examples: list[tuple[str, str, str, list[dict[str, Any]]]]
    where: list[str]


@st.composite
def answers_in(draw: st.DrawFn, context: str) -> list[dict[str, Any]]:
    """0-2 reference answers: spans of ``context`` that start on a non-space character."""
    starts = [i for i, c in enumerate(context) if not c.isspace()]
    found = []
    for _ in range(draw(st.integers(0, 2))):
        start = draw(st.sampled_from(starts))
        end = draw(st.integers(start + 1, len(context)))
        found.append({"text": context[start:end], "answer_start": start})
    return found


@st.composite
def squad_files(draw: st.DrawFn) -> Questions:
    """SQuAD v1.1 JSON: articles of paragraphs of questions."""
    examples, where, articles = [], [], []
    for a in range(draw(st.integers(1, 3))):
        paragraphs = []
        for p in range(draw(st.integers(1, 2))):
            context = draw(texts(max_size=30))
            qas = []
            for q in range(draw(st.integers(0 if p else 1, 2))):
                qid = f"q{len(examples)}"
                question, answers = draw(texts()), draw(answers_in(context))
                qas.append({"id": qid, "question": question, "answers": answers})
                examples.append((qid, question, context, answers))
                where.append(f"data[{a}].paragraphs[{p}].qas[{q}] (id {qid})")
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": draw(texts()), "paragraphs": paragraphs})
    content = json.dumps({"version": "1.1", "data": articles}, ensure_ascii=draw(st.booleans()))
    return Questions(content.encode(), examples, where)


@st.composite
def qa_record_files(draw: st.DrawFn, parquet: bool = False) -> Questions:
    """Flat QA records as JSON Lines (or Parquet), answers as a list of objects or in the datasets layout."""
    datasets_layout = draw(st.booleans())
    examples, records = [], []
    for i in range(draw(st.integers(1, 5))):
        context = draw(texts(max_size=30))
        question, answers = draw(texts()), draw(answers_in(context))
        stored: Any = answers
        if datasets_layout:
            stored = {"text": [x["text"] for x in answers], "answer_start": [x["answer_start"] for x in answers]}
        records.append({"id": f"r{i}", "question": question, "context": context, "answers": stored})
        examples.append((f"r{i}", question, context, answers))
    if parquet:
        buffer = io.BytesIO()
        pd.DataFrame(records).to_parquet(buffer)
        return Questions(buffer.getvalue(), examples, [f"record {i + 1}" for i in range(len(records))])
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records]
    return Questions(("\n".join(lines) + "\n").encode(), examples, [f"line {i + 1}" for i in range(len(lines))])


# ---- well-formed parallel text -------------------------------------------------------------------

@dataclass
class Parallel:
    """Two aligned files and the pairs a reader must give back."""

    source: bytes
    target: bytes
    pairs: list[tuple[str, str]]
    where: list[str]


LINES = st.text(LINE_CHARS, min_size=1, max_size=15).filter(lambda s: s.strip() != "")


@st.composite
def parallel_files(draw: st.DrawFn) -> Parallel:
    """``train.en``/``train.de``-style files; blank on both sides now and then (skipped)."""
    rows = draw(st.lists(st.none() | st.tuples(LINES, LINES), min_size=1, max_size=8)
                .filter(lambda rs: any(r is not None for r in rs)))
    sources = [r[0] if r else "" for r in rows]
    targets = [r[1] if r else "" for r in rows]
    kept = [(i, r) for i, r in enumerate(rows) if r is not None]
    endings = draw(st.sampled_from(["\n", "\r\n"])), draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return Parallel((endings[0].join(sources) + endings[0]).encode(), endings[1].join(targets).encode(),
                    [(s.strip(), t.strip()) for _, (s, t) in kept], [f"line {i + 1}" for i, _ in kept])


# ---- well-formed instruction data ----------------------------------------------------------------

@dataclass
class Instructions:
    """An instruction file and the examples a reader must give back: (prompt turns, response)."""

    suffix: str
    data: bytes
    examples: list[tuple[list[dict[str, str]], str]]
    where: list[str]


ROLES = st.sampled_from(["system", "user", "assistant"])


@st.composite
def instruction_record(draw: st.DrawFn, layout: str) -> tuple[dict[str, Any], list[dict[str, str]], str]:
    """One record of ``layout`` and the prompt turns and response it must give."""
    response = draw(texts())
    if layout == "prompt":
        prompt = draw(texts())
        return {"prompt": prompt, "response": response}, [{"role": "user", "content": prompt}], response
    if layout == "alpaca":
        instruction, extra = draw(texts()), draw(st.just("") | texts())
        content = f"{instruction}\n\n{extra}" if extra else instruction
        return ({"instruction": instruction, "input": extra, "output": response},
                [{"role": "user", "content": content}], response)
    turns = [{"role": draw(ROLES), "content": draw(texts())} for _ in range(draw(st.integers(1, 3)))]
    messages = [*turns, {"role": "assistant", "content": response}]
    return {"messages": messages}, turns, response


@st.composite
def instruction_files(draw: st.DrawFn, layouts: tuple[str, ...] = ("prompt", "alpaca", "chat"),
                      suffixes: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")) -> Instructions:
    """Prompt/response, Alpaca or chat records as JSON Lines, JSON, Parquet or (not chat) CSV."""
    layout = draw(st.sampled_from(layouts))
    suffix = draw(st.sampled_from([s for s in suffixes if s != ".csv" or layout != "chat"]))
    drawn = draw(st.lists(instruction_record(layout), min_size=1, max_size=5))
    records = [r for r, _, _ in drawn]
    examples = [(turns, response) for _, turns, response in drawn]
    if suffix == ".jsonl":
        content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        where = [f"line {i + 1}" for i in range(len(records))]
    elif suffix == ".json":
        content = json.dumps(records, ensure_ascii=False)
        where = [f"record {i + 1}" for i in range(len(records))]
    elif suffix == ".parquet":
        buffer = io.BytesIO()
        pd.DataFrame(records).to_parquet(buffer)
        return Instructions(suffix, buffer.getvalue(), examples, [f"record {i + 1}" for i in range(len(records))])
    else:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
        writer.writeheader()
        starts = []
        for record in records:
            starts.append(buffer.tell())
            writer.writerow(record)
        content = buffer.getvalue()
        where = [f"line {start_line(content, s)}" for s in starts]
    return Instructions(suffix, content.encode(), examples, where)
