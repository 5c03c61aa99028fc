"""Properties of every file reader, checked with hypothesis.

(a) Whatever bytes a file holds, reading it gives data or a ``DataError`` that
    names the file in one line; no other exception escapes.
(b) Well-formed data written by the standard writer reads back exactly: as
    many rows as were written (never two merged into one), the same texts
    and labels, and each row's position (the physical line it starts on).
(c) Malformed structures are a ``DataError`` at the right line or record.

Every property is bounded and derandomized (the same examples on every run,
no example database), so CI never flakes and the file runs in a few seconds.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterkit.data import DataError, load_data, read_table, read_texts
from adapterkit.data.examples import TaskData
from tests.data import reader_strategies as rs

BOUNDED = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FEW = settings(BOUNDED, max_examples=25)


@contextmanager
def folder() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is one per test, shared by all examples)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def check_error(err: DataError, path: Path, where: str | None = None, *others: Path) -> None:
    """A ``DataError`` message is one line naming the file, or one of ``others`` read with it,
    and the position, when given."""
    message = str(err)
    assert any(p.name in message for p in (path, *others)), message
    assert "\n" not in message and err.problem, message
    if where is not None:
        assert err.where == where, message


def loads_or_data_error(load: Callable[[Path], Any], path: Path, *others: Path) -> Any:
    """``load(path)``, or ``None`` after checking the ``DataError`` it raised; any other exception fails.

    ``others`` are files read along with ``path`` (the other side of parallel text)."""
    try:
        return load(path)
    except DataError as err:
        check_error(err, path, None, *others)
        return None


def raises_at(load: Callable[[Path], Any], path: Path, where: str | None, *words: str) -> DataError:
    """``load(path)`` raises a ``DataError`` at ``where`` whose message has all ``words``."""
    with pytest.raises(DataError) as info:
        load(path)
    check_error(info.value, path, where)
    for word in words:
        assert word in str(info.value), str(info.value)
    return info.value


def classification(path: Path, labels: list[str] | None = None) -> TaskData:
    return load_data(path, labels=labels)


def task(name: str) -> Callable[[Path], TaskData]:
    return lambda path: load_data(path, task=name)


def squad_like(path: Path) -> TaskData:
    return load_data(path, task="question-answering")


# ---- (a) arbitrary bytes -------------------------------------------------------------------------

NOISE = [
    ("data.csv", classification, rs.noise(rs.CSV_TOKENS), rs.valid_bytes(rs.csv_files()), rs.CSV_TOKENS),
    ("data.tsv", classification, rs.noise(rs.CSV_TOKENS), rs.valid_bytes(rs.tsv_files()), rs.CSV_TOKENS),
    ("data.json", classification, rs.json_shapes(), rs.valid_bytes(rs.json_files()), rs.JSON_TOKENS),
    ("data.jsonl", classification, rs.jsonl_shapes(), rs.valid_bytes(rs.jsonl_files()), rs.JSON_TOKENS),
    ("data.parquet", classification, st.binary(max_size=200), rs.valid_parquet_bytes(), [b"PAR1", b"\x00"]),
    ("train.conll", task("token-classification"), rs.noise(rs.CONLL_TOKENS),
     rs.conll_files().map(lambda f: f.data), rs.CONLL_TOKENS),
    ("tokens.jsonl", task("token-classification"), rs.jsonl_shapes(), rs.valid_bytes(rs.jsonl_files()),
     rs.JSON_TOKENS),
    ("squad.json", squad_like, rs.json_shapes(), rs.squad_files().map(lambda f: f.data), rs.JSON_TOKENS),
    ("qa.jsonl", squad_like, rs.jsonl_shapes(), rs.qa_record_files().map(lambda f: f.data), rs.JSON_TOKENS),
    ("chat.jsonl", task("causal-lm"), rs.jsonl_shapes(),
     rs.instruction_files(suffixes=(".jsonl",)).map(lambda f: f.data), rs.JSON_TOKENS),
    ("alpaca.json", task("causal-lm"), rs.json_shapes(),
     rs.instruction_files(suffixes=(".json",)).map(lambda f: f.data), rs.JSON_TOKENS),
    ("pairs.csv", task("seq2seq"), rs.noise(rs.CSV_TOKENS), rs.valid_bytes(rs.csv_files()), rs.CSV_TOKENS),
]


@pytest.mark.parametrize("name, load, shapes, valid, tokens", NOISE, ids=[n[0] for n in NOISE])
def test_any_bytes_load_or_raise_a_data_error(name: str, load: Callable, shapes: st.SearchStrategy,
                                              valid: st.SearchStrategy, tokens: list[bytes]) -> None:
    @FEW
    @given(st.one_of(shapes, rs.mutated(valid, tokens)))
    def check(data: bytes) -> None:
        with folder() as directory:
            loads_or_data_error(load, write(directory, name, data))

    check()


@FEW
@given(rs.noise(rs.CSV_TOKENS) | rs.mutated(rs.valid_bytes(rs.csv_files()), rs.CSV_TOKENS), st.booleans())
def test_any_compressed_bytes_load_or_raise_a_data_error(data: bytes, compress: bool) -> None:
    with folder() as directory:
        # Compressed noise exercises the parser; raw noise behind a .gz suffix, the decompressor.
        content = gzip.compress(data) if compress else data
        loads_or_data_error(classification, write(directory, "data.csv.gz", content))


@FEW
@given(rs.noise(rs.LINE_TOKENS), rs.noise(rs.LINE_TOKENS))
def test_any_parallel_bytes_load_or_raise_a_data_error(source: bytes, target: bytes) -> None:
    with folder() as directory:
        other = write(directory, "train.de", target)
        path = write(directory, "train.en", source)
        for name in ("seq2seq", "causal-lm"):
            loads_or_data_error(task(name), path, other)
        loads_or_data_error(read_texts, path)


# ---- (b) well-formed data reads back exactly ---------------------------------------------------

def assert_rows(data: TaskData, written: rs.Written) -> None:
    vocabulary = sorted(set(written.labels))
    assert len(data) == len(written.texts)  # no two rows merged, none dropped
    assert [e["text"] for e in data.examples] == written.texts
    assert [data.labels[e["label"]] for e in data.examples] == written.labels
    assert data.labels == vocabulary
    assert [e["where"] for e in data.examples] == written.where


TABLES = [("data.csv", rs.csv_files()), ("data.tsv", rs.tsv_files()), ("data.json", rs.json_files()),
          ("data.jsonl", rs.jsonl_files()), ("data.parquet", rs.parquet_files())]


@pytest.mark.parametrize("name, files", TABLES, ids=[t[0] for t in TABLES])
def test_written_tables_read_back_row_for_row(name: str, files: st.SearchStrategy[rs.Written]) -> None:
    @BOUNDED
    @given(files, st.booleans())
    def check(written: rs.Written, bom: bool) -> None:
        data = written.data
        if bom and not name.endswith(".parquet"):
            data = b"\xef\xbb\xbf" + data  # a byte-order mark changes nothing
        with folder() as directory:
            assert_rows(classification(write(directory, name, data), sorted(set(written.labels))), written)

    check()


@FEW
@given(rs.csv_files())
def test_compressed_csv_reads_back_row_for_row(written: rs.Written) -> None:
    with folder() as directory:
        path = write(directory, "data.csv.gz", gzip.compress(written.data))
        assert_rows(classification(path, sorted(set(written.labels))), written)


@BOUNDED
@given(rs.conll_files())
def test_written_conll_reads_back_sentence_for_sentence(written: rs.Sentences) -> None:
    with folder() as directory:
        data = task("token-classification")(write(directory, "train.conll", written.data))
    assert [e["tokens"] for e in data.examples] == written.tokens
    assert [e["tags"] for e in data.examples] == written.tags
    assert [e["where"] for e in data.examples] == written.where


@pytest.mark.parametrize("name, files", [("squad.json", rs.squad_files()), ("qa.jsonl", rs.qa_record_files()),
                                         ("qa.parquet", rs.qa_record_files(parquet=True))])
def test_written_questions_read_back_one_for_one(name: str, files: st.SearchStrategy[rs.Questions]) -> None:
    @BOUNDED
    @given(files)
    def check(written: rs.Questions) -> None:
        with folder() as directory:
            data = squad_like(write(directory, name, written.data))
        found = [(e["id"], e["question"], e["context"], e["answers"]) for e in data.examples]
        assert found == written.examples
        assert [e["where"] for e in data.examples] == written.where

    check()


@BOUNDED
@given(rs.parallel_files())
def test_written_parallel_text_reads_back_pair_for_pair(written: rs.Parallel) -> None:
    with folder() as directory:
        write(directory, "train.de", written.target)
        path = write(directory, "train.en", written.source)
        pairs = task("seq2seq")(path)
        instructions = task("causal-lm")(path)
    assert [(e["source"], e["target"]) for e in pairs.examples] == written.pairs
    assert [e["where"] for e in pairs.examples] == written.where
    assert [e["response"] for e in instructions.examples] == [t for _, t in written.pairs]
    assert [e["where"] for e in instructions.examples] == written.where


@BOUNDED
@given(rs.instruction_files())
def test_written_instructions_read_back_one_for_one(written: rs.Instructions) -> None:
    with folder() as directory:
        data = task("causal-lm")(write(directory, f"train{written.suffix}", written.data))
    assert [(e["messages"], e["response"]) for e in data.examples] == written.examples
    assert [e["where"] for e in data.examples] == written.where


@FEW
@given(rs.csv_files())
def test_read_texts_gives_every_row(written: rs.Written) -> None:
    with folder() as directory:
        assert read_texts(write(directory, "inputs.csv", written.data)) == written.texts


# ---- (c) malformed structures: a DataError at the right place ------------------------------------

@st.composite
def csv_with_bad_row(draw: st.DrawFn) -> tuple[bytes, str, int]:
    """Well-formed rows (multi-line fields and all) with one row of one field too many or too few."""
    written = draw(rs.csv_files())
    rows = list(zip(written.texts, written.labels))
    at = draw(st.integers(0, len(rows)))
    extra = draw(st.booleans())
    bad = [draw(rs.texts()), draw(rs.LABELS), draw(rs.texts())] if extra else [draw(rs.texts())]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    for row in [*rows[:at], None, *rows[at:]]:
        if row is None:
            start = buffer.tell()
        writer.writerow(bad if row is None else row)
    content = buffer.getvalue()
    return content.encode(), f"line {rs.start_line(content, start)}", len(bad)


@BOUNDED
@given(csv_with_bad_row())
def test_a_ragged_csv_row_names_its_line_and_the_field_counts(case: tuple[bytes, str, int]) -> None:
    data, where, found = case
    with folder() as directory:
        raises_at(classification, write(directory, "data.csv", data), where, "expected 2", f"found {found}")


@BOUNDED
@given(rs.csv_files(), st.data())
def test_an_unclosed_quote_names_the_line_its_record_starts_on(written: rs.Written, data: st.DataObject) -> None:
    text = written.data.decode()
    # Open a quote at the start of a later record whose rest of file has no quote to close it.
    plain = rs.texts(rs.no_chars('"\r\n'))
    tail = data.draw(st.lists(st.tuples(plain, plain), max_size=3))
    broken = text + '"' + data.draw(plain) + ",x\n" + "".join(f"{a},{b}\n" for a, b in tail)
    where = f"line {rs.start_line(broken, len(text))}"
    with folder() as directory:
        raises_at(classification, write(directory, "data.csv", broken.encode()), where, "closing double quote")


@BOUNDED
@given(rs.csv_files(), st.data())
def test_a_byte_that_is_not_utf8_names_its_line(written: rs.Written, data: st.DataObject) -> None:
    raw = written.data
    at = data.draw(st.integers(0, len(raw)))
    while at < len(raw) and 0x80 <= raw[at] < 0xC0:
        at += 1  # not inside a multi-byte character
    broken = raw[:at] + b"\xff" + raw[at:]
    before = raw[:at].decode()
    where = f"line {rs.start_line(before, len(before))}"
    with folder() as directory:
        raises_at(classification, write(directory, "data.csv", broken), where, "UTF-8", f"byte offset {at}")


@pytest.mark.parametrize("name", ["data.csv", "data.tsv", "data.json", "data.jsonl", "data.parquet",
                                  "train.conll", "squad.json", "train.jsonl"])
@pytest.mark.parametrize("content", [b"", b" \n\r\n\t"])
def test_an_empty_file_is_a_data_error(name: str, content: bytes) -> None:
    load = {"squad.json": squad_like, "train.conll": task("token-classification"),
            "train.jsonl": task("causal-lm")}.get(name, classification)
    with folder() as directory:
        error = raises_at(load, write(directory, name, content), None)
    assert "empty" in str(error) or (name.endswith(".parquet") and content), str(error)


# What a record may be instead of {"text": ..., "label": ...}, and the words its error must have.
BAD_RECORDS = st.sampled_from([
    (["a", "b"], "expected a JSON object"),
    ("just text", "expected a JSON object"),
    ({"text": "no label"}, "missing label"),
    ({"label": "a"}, "missing value in column 'text'"),
    ({"text": "t", "label": ["a", "b"]}, "expected a label"),
    ({"text": "t", "label": {"name": "a"}}, "expected a label"),
    ({"text": "t", "label": 0.5}, "expected a label"),
    ({"text": ["t"], "label": "a"}, "expected text"),
    ({"text": 3, "label": "a"}, "expected text"),
    ({"text": "   ", "label": "a"}, "empty text"),
])


@BOUNDED
@given(rs.ROWS, BAD_RECORDS, st.data())
def test_a_bad_json_lines_record_names_its_line(rows: list[tuple[str, str]], bad: tuple[Any, str],
                                                data: st.DataObject) -> None:
    lines = [json.dumps({"text": t, "label": "a"}) for t, _ in rows]
    lines = [line for i, line in enumerate(lines) for line in ([""] if i % 2 else []) + [line]]  # blank lines
    at = data.draw(st.integers(0, len(lines)))
    lines.insert(at, json.dumps(bad[0]))
    with folder() as directory:
        path = write(directory, "data.jsonl", ("\n".join(lines) + "\n").encode())
        raises_at(lambda p: classification(p, ["a", "b"]), path, f"line {at + 1}", bad[1])


@BOUNDED
@given(rs.ROWS, BAD_RECORDS, st.data())
def test_a_bad_json_record_names_its_record_number(rows: list[tuple[str, str]], bad: tuple[Any, str],
                                                   data: st.DataObject) -> None:
    records: list[Any] = [{"text": t, "label": "a"} for t, _ in rows]
    at = data.draw(st.integers(0, len(records)))
    records.insert(at, bad[0])
    with folder() as directory:
        path = write(directory, "data.json", json.dumps(records).encode())
        raises_at(lambda p: classification(p, ["a", "b"]), path, f"record {at + 1}", bad[1])


@FEW
@given(rs.ROWS, st.data())
def test_a_broken_json_document_names_its_line(rows: list[tuple[str, str]], data: st.DataObject) -> None:
    text = json.dumps([{"text": t, "label": label} for t, label in rows], indent=1)
    cut = data.draw(st.integers(1, len(text) - 1))
    broken = text[:cut]  # a truncated file: the error is at its very end
    with folder() as directory:
        raises_at(classification, write(directory, "data.json", broken.encode()),
                  f"line {rs.start_line(broken, len(broken))}", "invalid JSON")


@FEW
@given(rs.ROWS, st.sampled_from(["list labels", "float labels", "missing label", "missing text", "bytes texts"]),
       st.data())
def test_a_bad_parquet_value_names_its_record(rows: list[tuple[str, str]], damage: str,
                                              data: st.DataObject) -> None:
    texts: list[Any] = [t for t, _ in rows]
    labels: list[Any] = ["a"] * len(rows)
    at = data.draw(st.integers(0, len(rows) - 1))
    if damage == "list labels":  # a whole column of the wrong type: the first record is wrong
        labels, at, words = [["a"]] * len(rows), 0, "expected a label"
    elif damage == "float labels":
        labels[at], labels, words = 0.5, [1.0] * len(rows), "expected a label"
        labels[at] = 0.5
    elif damage == "missing label":
        labels[at], words = None, "missing label"
    elif damage == "missing text":
        texts[at], words = None, "missing value"
    else:
        texts, at, words = [t.encode() for t in texts], 0, "expected text"
    buffer = io.BytesIO()
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(buffer)
    with folder() as directory:
        path = write(directory, "data.parquet", buffer.getvalue())
        raises_at(lambda p: classification(p, ["a", "b", "1"]), path, f"record {at + 1}", words)


@BOUNDED
@given(rs.conll_files(), st.sampled_from([("lonely", "token and its tag"), ("word X-PER", "PREFIX-TYPE"),
                                          ("word b-per", "PREFIX-TYPE")]), st.data())
def test_a_bad_conll_line_names_its_line(written: rs.Sentences, bad: tuple[str, str], data: st.DataObject) -> None:
    lines = written.data.decode().replace("\r\n", "\n").split("\n")[:-1]
    at = data.draw(st.integers(0, len(lines)))
    lines.insert(at, bad[0])
    with folder() as directory:
        path = write(directory, "train.conll", ("\n".join(lines) + "\n").encode())
        raises_at(task("token-classification"), path, f"line {at + 1}", bad[1])


# A broken question replacing a good one, and the words its error must have.
BAD_QUESTIONS = st.sampled_from([
    (lambda qa: {**qa, "answers": [{"text": "\x00not in the context", "answer_start": 0}]}, "expected the answer"),
    (lambda qa: {**qa, "answers": [{"text": "x", "answer_start": -1}]}, "non-negative integer"),
    (lambda qa: {**qa, "answers": [{"text": "x", "answer_start": "0"}]}, "non-negative integer"),
    (lambda qa: {**qa, "answers": "x"}, "'answers' to be a list"),
    (lambda qa: {**qa, "answers": ["x"]}, "expected an object with text and answer_start"),
    (lambda qa: {k: v for k, v in qa.items() if k != "question"}, "question to be a non-empty string"),
    (lambda qa: {**qa, "id": ["a"]}, "question id"),
    (lambda qa: [qa], "expected a question object"),
])


@BOUNDED
@given(rs.squad_files(), BAD_QUESTIONS, st.data())
def test_a_bad_squad_question_names_its_json_path(written: rs.Questions, bad: tuple[Callable, str],
                                                  data: st.DataObject) -> None:
    squad = json.loads(written.data)
    places = [(a, p, q) for a, article in enumerate(squad["data"])
              for p, paragraph in enumerate(article["paragraphs"]) for q in range(len(paragraph["qas"]))]
    a, p, q = data.draw(st.sampled_from(places))
    qas = squad["data"][a]["paragraphs"][p]["qas"]
    qas[q] = bad[0](qas[q])
    with folder() as directory:
        error = raises_at(squad_like, write(directory, "squad.json", json.dumps(squad).encode()), None, bad[1])
    assert error.where is not None and error.where.startswith(f"data[{a}].paragraphs[{p}].qas[{q}]")


@FEW
@given(rs.squad_files(), st.sampled_from([[], "x", {"paragraphs": "x"}, {"title": "no paragraphs"}]), st.data())
def test_a_bad_squad_article_names_its_index(written: rs.Questions, bad: Any, data: st.DataObject) -> None:
    squad = json.loads(written.data)
    at = data.draw(st.integers(0, len(squad["data"])))
    squad["data"].insert(at, bad)
    with folder() as directory:
        raises_at(squad_like, write(directory, "squad.json", json.dumps(squad).encode()), f"data[{at}]",
                  "'paragraphs' list")


@BOUNDED
@given(rs.parallel_files(), st.sampled_from(["drop", "blank", "latin1"]), st.data())
def test_misaligned_parallel_text_is_a_data_error(written: rs.Parallel, damage: str, data: st.DataObject) -> None:
    lines = written.target.decode().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    full = [i for i, line in enumerate(lines) if line.strip()]
    at = data.draw(st.sampled_from(full) if damage != "latin1" else st.integers(0, len(lines) - 1))
    if damage == "drop":
        del lines[at]
    elif damage == "blank":
        lines[at] = ""
        if at == full[-1]:
            damage = "drop"  # a blank last line does not count: the files now differ in length
    target = "\n".join(lines).encode()
    if damage == "latin1":
        target = "\n".join([*lines[:at], lines[at] + "\udcff", *lines[at + 1:]]).encode("utf-8", "surrogateescape")
    with folder() as directory:
        other = write(directory, "train.de", target)
        path = write(directory, "train.en", written.source)
        with pytest.raises(DataError) as info:
            task("seq2seq")(path)
    check_error(info.value, path, None, other)
    message = str(info.value)
    if damage == "blank":
        assert info.value.where == f"line {at + 1}" and "blank line in train.de" in message, message
    elif damage == "latin1":
        assert info.value.where == f"line {at + 1}" and "UTF-8" in message, message
    else:  # one line fewer: misaligned, or nothing left at all
        assert "parallel files must align" in message or "train.de: expected data, found an empty" in message


BAD_INSTRUCTIONS = st.sampled_from([
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role in"),
    ({"messages": [{"role": "user", "content": 5}]}, "text content"),
    ({"messages": "hello"}, "non-empty list"),
    ({"messages": []}, "non-empty list"),
    ([{"role": "user", "content": "hi"}], "expected a JSON object"),
    ({"other": "x"}, "missing value"),
])


@BOUNDED
@given(rs.instruction_files(layouts=("chat",), suffixes=(".jsonl",)), BAD_INSTRUCTIONS, st.data())
def test_a_bad_chat_record_names_its_line(written: rs.Instructions, bad: tuple[Any, str],
                                          data: st.DataObject) -> None:
    lines = written.data.decode().split("\n")[:-1]
    at = data.draw(st.integers(0, len(lines)))
    lines.insert(at, json.dumps(bad[0]))
    with folder() as directory:
        path = write(directory, "chat.jsonl", ("\n".join(lines) + "\n").encode())
        raises_at(task("causal-lm"), path, f"line {at + 1}", bad[1])


@FEW
@given(st.lists(rs.texts(), min_size=2, max_size=5), st.data())
def test_a_prompt_missing_its_response_names_its_line(prompts: list[str], data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(prompts) - 1))
    records = [{"prompt": p, "response": "r"} if i != at else {"prompt": p} for i, p in enumerate(prompts)]
    with folder() as directory:
        path = write(directory, "train.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
        raises_at(task("causal-lm"), path, f"line {at + 1}", "expected a response")


def test_a_missing_file_says_it_does_not_exist(tmp_path: Path) -> None:
    for load in (classification, task("token-classification"), task("question-answering"), task("seq2seq"),
                 task("causal-lm"), read_table, read_texts):
        raises_at(load, tmp_path / "absent.csv", None, "does not exist")
    raises_at(classification, tmp_path, None, "folder")


def test_a_parquet_string_that_is_not_utf8_is_a_data_error(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow checks nothing when a string array is built from raw buffers, nor does the writer.
    offsets = pa.py_buffer(np.array([0, 2, 3], dtype=np.int32).tobytes())
    texts = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff")])
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": texts, "label": pa.array(["a", "b"])}), path)
    raises_at(classification, path, None, "UTF8")


def test_a_field_longer_than_the_csv_module_default_reads_whole(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    long = "word, " * 30_000  # 180,000 characters: over the csv module's 131,072
    path.write_text(f'text,label\n"{long}",a\nshort,b\n')
    data = classification(path)
    assert [len(e["text"]) for e in data.examples] == [len(long), 5]
    assert csv.field_size_limit() == 131_072  # the process-wide limit is put back
