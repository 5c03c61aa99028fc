"""SQuAD-format reading, flat QA records, and the split by article."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterkit.data import DataError, load_data
from adapterkit.data.squad import qa_from_pairs, read_squad, split_by_article, split_squad_file

CONTEXT_A = "Denver Broncos defeated the Carolina Panthers 24-10."
CONTEXT_B = "The game was played on February 7, 2016."


def squad(*articles: dict) -> dict:
    return {"version": "1.1", "data": list(articles)}


def article(title: str, *paragraphs: dict) -> dict:
    return {"title": title, "paragraphs": list(paragraphs)}


def paragraph(context: str, *qas: tuple[str, str, list[tuple[str, int]]]) -> dict:
    return {"context": context, "qas": [
        {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers]}
        for qid, question, answers in qas]}


def good_file(tmp_path: Path) -> Path:
    data = squad(
        article("Super_Bowl",
                paragraph(CONTEXT_A, ("q1", "Who won?", [("Denver Broncos", 0), ("Broncos", 7)]),
                          ("q2", "Who lost?", [("Carolina Panthers", 28)])),
                paragraph(CONTEXT_B, ("q3", "When?", [("February 7, 2016", 23)]))),
        article("Other", paragraph(CONTEXT_B, ("q4", "What was played?", [("game", 4)]))),
    )
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_reads_every_question_with_all_reference_answers(tmp_path: Path) -> None:
    data = read_squad(good_file(tmp_path))
    assert data.task == "question-answering" and data.labels is None
    assert [e["id"] for e in data.examples] == ["q1", "q2", "q3", "q4"]
    first = data.examples[0]
    assert first["question"] == "Who won?" and first["context"] == CONTEXT_A
    assert first["answers"] == [{"text": "Denver Broncos", "answer_start": 0},
                                {"text": "Broncos", "answer_start": 7}]
    assert first["title"] == "Super_Bowl" and first["where"] == "data[0].paragraphs[0].qas[0] (id q1)"
    assert data.examples[3]["title"] == "Other"


def test_load_data_dispatches_squad_json(tmp_path: Path) -> None:
    data = load_data(good_file(tmp_path), task="question-answering")
    assert len(data) == 4 and data.source.endswith("squad.json")


def test_misaligned_answer_start_names_file_entry_and_found_text(tmp_path: Path) -> None:
    data = squad(article("T", paragraph(CONTEXT_A, ("q1", "Who won?", [("Denver Broncos", 0), ("Broncos", 8)]))))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        read_squad(path)
    message = str(err.value)
    assert str(path) in message
    assert "data[0].paragraphs[0].qas[0] (id q1).answers[1]" in message
    assert "'Broncos'" in message and "'roncos '" in message  # what the context holds at offset 8


@pytest.mark.parametrize(
    "data, where, problem",
    [
        ({"data": [{"title": "x"}]}, "data[0]", "'paragraphs' list"),
        ([1, 2], "top level", "SQuAD object"),
        (squad(article("T", {"context": CONTEXT_A, "qas": [{"id": "z", "question": "", "answers": []}]})),
         "qas[0] (id z)", "question to be a non-empty string"),
        (squad(article("T", {"context": CONTEXT_A, "qas": [{"id": "z", "question": "Q?", "answers": [],
                                                           "is_impossible": True}]})),
         "qas[0] (id z)", "unanswerable"),
        (squad(article("T", {"context": CONTEXT_A, "qas": [
            {"id": "z", "question": "Q?", "answers": [{"text": "Denver", "answer_start": "0"}]}]})),
         "answers[0]", "non-negative integer"),
    ],
)
def test_structural_errors_say_where(tmp_path: Path, data: object, where: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=problem) as err:
        read_squad(path)
    assert where in str(err.value)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"data": [\n{"title": }\n]}')
    with pytest.raises(DataError, match="line 2"):
        read_squad(path)


def test_flat_records_in_datasets_layout(tmp_path: Path) -> None:
    rows = [{"id": "a", "question": "Who won?", "context": CONTEXT_A,
             "answers": {"text": ["Denver Broncos"], "answer_start": [0]}},
            {"id": "b", "question": "When?", "context": CONTEXT_B, "answers": {"text": [], "answer_start": []}}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(path, task="question-answering")
    assert data.examples[0]["answers"] == [{"text": "Denver Broncos", "answer_start": 0}]
    assert data.examples[1]["answers"] == []
    in_memory = load_data([{**rows[0], "answers": [{"text": "Broncos", "answer_start": 7}]}],
                          task="question-answering")
    assert in_memory.examples[0]["answers"] == [{"text": "Broncos", "answer_start": 7}]
    with pytest.raises(DataError, match="record 1"):
        load_data([{**rows[0], "answers": [{"text": "Broncos", "answer_start": 3}]}], task="question-answering")


def test_pairs_for_prediction() -> None:
    data = qa_from_pairs([("Who won?", CONTEXT_A)])
    assert data.examples[0]["question"] == "Who won?" and data.examples[0]["answers"] == []
    with pytest.raises(ValueError, match="pair"):
        qa_from_pairs(["just a question"])  # type: ignore[list-item]


def test_split_by_article_is_deterministic_disjoint_and_complete() -> None:
    data = squad(*[article(f"a{i}", paragraph(CONTEXT_B, (f"q{i}", "When?", [("February 7, 2016", 23)])))
                   for i in range(10)])
    train, valid = split_by_article(data, validation=3, seed=7)
    titles = lambda part: [a["title"] for a in part["data"]]  # noqa: E731
    assert len(valid["data"]) == 3 and len(train["data"]) == 7
    assert set(titles(train)).isdisjoint(titles(valid))
    assert sorted(titles(train) + titles(valid)) == sorted(titles(data))
    assert titles(train) == sorted(titles(train), key=lambda t: int(t[1:]))  # file order kept
    assert (train, valid) == split_by_article(data, validation=3, seed=7)
    assert len(split_by_article(data, validation=0.2)[1]["data"]) == 2
    assert any(split_by_article(data, 3, seed=s)[1] != valid for s in range(8, 12))
    with pytest.raises(ValueError, match="at least one"):
        split_by_article(data, validation=10)


def test_split_squad_file_writes_readable_parts(tmp_path: Path) -> None:
    train_path, valid_path = split_squad_file(good_file(tmp_path), tmp_path / "split", validation=1, seed=0)
    train, valid = read_squad(train_path), read_squad(valid_path)
    assert len(train) + len(valid) == 4
    assert {e["title"] for e in train.examples}.isdisjoint({e["title"] for e in valid.examples})
