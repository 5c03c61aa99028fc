"""Instruction data (causal-lm) and source/target data (seq2seq): layouts, built-in chatterbot, parallel files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterkit.data import DataError, load_data
from adapterkit.data.builtin import BUILTIN_DATASETS
from adapterkit.data.instructions import final_answer_of
from adapterkit.models.aliases import package_dir


def test_alpaca_rows_join_instruction_and_input(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                {"instruction": "Say hi", "input": "", "output": "hi"}]))
    data = load_data(path, task="causal-lm")
    assert data[0]["messages"] == [{"role": "user", "content": "Add\n\n2 and 3"}]
    assert data[1]["messages"] == [{"role": "user", "content": "Say hi"}]
    assert [e["response"] for e in data.examples] == ["5", "hi"]
    assert data[0]["answer"] is None and data[0]["reference"] is None


def test_chat_messages_split_into_prompt_turns_and_the_last_reply(tmp_path: Path) -> None:
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name?"},
                    {"role": "assistant", "content": "Bob"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"messages": conversation[:2]}) + "\n")
    data = load_data(path, task="causal-lm")
    assert data[0]["messages"] == conversation[:-1] and data[0]["response"] == "Bob"
    assert data[1]["messages"] == conversation[:2] and data[1]["response"] is None


def test_bad_chat_turn_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="line 2.*role"):
        load_data(path, task="causal-lm")


def test_gsm8k_answers_are_the_number_after_the_marker(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "How much?", "answer": "It costs\n#### 1,250"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(path, task="causal-lm")
    assert [e["answer"] for e in data.examples] == ["7", "1250"]
    assert data[0]["response"] == rows[0]["answer"]
    assert final_answer_of("no marker here") is None


def test_named_columns_and_a_system_prompt() -> None:
    rows = [{"q": "2+2?", "a": "4", "short": "4"}]
    data = load_data(rows, task="causal-lm", prompt_column="q", response_column="a", answer_column="short",
                     system_prompt="You add.")
    assert data[0]["messages"] == [{"role": "system", "content": "You add."}, {"role": "user", "content": "2+2?"}]
    assert data[0]["answer"] == "4"
    with pytest.raises(DataError, match="missing column"):
        load_data(rows, task="causal-lm", prompt_column="question")


def test_parallel_files_become_translation_instructions(tmp_path: Path) -> None:
    (tmp_path / "val.en").write_text("A dog runs.\nTwo cats.\n")
    (tmp_path / "val.de").write_text("Ein Hund rennt.\nZwei Katzen.\n")
    data = load_data(tmp_path / "val.en", task="causal-lm")
    assert data[0]["messages"] == [{"role": "user", "content": "Translate English to German: A dog runs."}]
    assert data[0]["response"] == data[0]["reference"] == "Ein Hund rennt."
    (tmp_path / "val.fr").write_text("Un chien court.\n")
    with pytest.raises(DataError, match="target_language"):
        load_data(tmp_path / "val.en", task="causal-lm")
    with pytest.raises(DataError, match="2 lines, but val.fr has 1"):
        load_data(tmp_path / "val.en", task="seq2seq", target_language="fr")
    assert load_data(tmp_path / "val.en", task="seq2seq", target_language="de")[1]["target"] == "Zwei Katzen."


def test_seq2seq_table_columns_and_prefix() -> None:
    rows = [{"en": "red", "de": "rot"}, {"en": "blue", "de": "blau"}]
    data = load_data(rows, task="seq2seq", source_prefix="translate English to German: ")
    assert data[0] == {"source": "translate English to German: red", "target": "rot", "where": "record 1"}
    with pytest.raises(DataError, match="source_column"):
        load_data([{"x": "a"}], task="seq2seq")


@pytest.mark.skipif(package_dir("chatterbot_corpus") is None, reason="chatterbot-corpus is not installed")
def test_builtin_chatterbot_has_2306_pairs_in_a_fixed_split() -> None:
    assert BUILTIN_DATASETS["chatterbot"].task == "causal-lm"
    splits = {name: load_data("chatterbot", task="causal-lm", split=name) for name in ("train", "validation", "test")}
    assert sum(len(d) for d in splits.values()) == 2306
    assert [len(d) for d in splits.values()] == [1845, 231, 230]
    again = load_data("chatterbot", task="causal-lm", split="test")
    assert again.examples == splits["test"].examples
    assert all(e["response"] and e["messages"][0]["role"] == "user" for e in splits["train"].examples)
