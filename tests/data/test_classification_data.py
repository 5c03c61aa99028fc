"""Reading classification data from every supported source, and the errors for bad input."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pandas as pd
import pytest

from adapterkit.data import DataError, holdout, load_data, read_table, read_texts

ROWS = [
    {"text": "a good film", "label": "pos"},
    {"text": "NA", "label": "neg"},  # literal "NA" is text, not a missing value
    {"text": "dull, dull, dull", "label": "neg"},
    {"text": 'said "wow"', "label": "pos"},
]
EXPECTED_TEXTS = [r["text"] for r in ROWS]
EXPECTED_LABELS = [1, 0, 0, 1]  # labels sort alphabetically: neg=0, pos=1


def _write(tmp_path: Path, fmt: str) -> Path:
    frame = pd.DataFrame(ROWS)
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "csv.bz2":
        path.write_bytes(bz2.compress(frame.to_csv(index=False).encode()))
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet", "csv.bz2"])
def test_every_file_format_gives_the_same_examples(tmp_path, fmt):
    data = load_data(_write(tmp_path, fmt))
    assert data.labels == ["neg", "pos"]
    assert [e["text"] for e in data.examples] == EXPECTED_TEXTS
    assert [e["label"] for e in data.examples] == EXPECTED_LABELS


def test_in_memory_sources(tmp_path):
    from_frame = load_data(pd.DataFrame(ROWS))
    from_list = load_data(ROWS)
    assert [e["label"] for e in from_frame.examples] == EXPECTED_LABELS
    assert [e["text"] for e in from_list.examples] == EXPECTED_TEXTS


def test_datasets_dataset_with_class_label_names():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    ds = datasets.Dataset.from_dict({"sentence": ["great", "awful", "fine"], "label": [1, 0, 1]},
                                    features=features)
    data = load_data(ds, text_column="sentence")
    assert data.labels == ["negative", "positive"]
    assert [e["label"] for e in data.examples] == [1, 0, 1]


def test_json_wrapped_in_a_data_key(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": ROWS}))
    assert [e["label"] for e in load_data(path).examples] == EXPECTED_LABELS


def test_integer_labels_sort_numerically(tmp_path):
    path = tmp_path / "ints.csv"
    path.write_text("text,label\na,10\nb,2\nc,1\nd,2\n")
    data = load_data(path)
    assert data.labels == ["1", "2", "10"]
    assert [e["label"] for e in data.examples] == [2, 1, 0, 1]


def test_text_pair_column(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"premise": "a", "hypothesis": "b", "y": "entail"}\n'
                    '{"premise": "c", "hypothesis": "d", "y": "contradict"}\n')
    data = load_data(path, text_column="premise", text_pair_column="hypothesis", label_column="y")
    assert [(e["text"], e["text_pair"], e["label"]) for e in data.examples] == [("a", "b", 1), ("c", "d", 0)]


def test_missing_column_lists_the_columns_found(tmp_path):
    path = _write(tmp_path, "csv")
    with pytest.raises(DataError) as err:
        load_data(path, text_column="sentence")
    message = str(err.value)
    assert str(path) in message and "'sentence'" in message and "['text', 'label']" in message


@pytest.mark.parametrize("content", [b"", b"   \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty"):
        load_data(path)


def test_header_without_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="no data rows"):
        load_data(path)


def test_non_utf8_bytes_name_line_and_offset(tmp_path):
    path = tmp_path / "latin1.csv"
    raw = "text,label\ngood,pos\n".encode() + "café,neg\n".encode("latin-1")
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(DataError) as err:
        load_data(path)
    assert err.value.where == "line 3"
    assert f"byte offset {offset}" in str(err.value) and str(path) in str(err.value)


def test_label_never_seen_in_training_names_the_row(tmp_path):
    train = load_data(_write(tmp_path, "csv"))
    path = tmp_path / "eval.csv"
    path.write_text("text,label\nfine,pos\nmeh,neutral\n")
    with pytest.raises(DataError) as err:
        load_data(path, labels=train.labels)
    assert err.value.where == "line 3" and "'neutral'" in str(err.value) and "['neg', 'pos']" in str(err.value)


def test_evaluation_labels_use_the_training_order(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text("text,label\nx,pos\ny,pos\n")  # on its own: labels == ["pos"]
    data = load_data(path, labels=["neg", "pos"])
    assert data.labels == ["neg", "pos"] and [e["label"] for e in data.examples] == [1, 1]


def test_missing_label_and_empty_text_are_errors(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "no label", "label": null}\n')
    with pytest.raises(DataError, match="missing label") as err:
        load_data(path)
    assert err.value.where == "line 2"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "  ", "label": "b"}\n')
    with pytest.raises(DataError, match="empty text"):
        load_data(path)


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="invalid JSON") as err:
        read_table(path)
    assert err.value.where == "line 2"


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_data(tmp_path / "data.xlsx")
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "absent.csv")


def test_holdout_is_stratified_and_deterministic():
    rows = [{"text": f"t{i}", "label": "a" if i % 4 else "b"} for i in range(200)]  # 150 a, 50 b
    train, validation = holdout(load_data(rows))
    again, _ = holdout(load_data(rows))
    assert len(validation) == 20 and len(train) == 180
    assert sum(e["label"] == 1 for e in validation.examples) == 5  # 10% of the 50 "b"
    assert [e["text"] for e in train.examples] == [e["text"] for e in again.examples]
    assert not {e["text"] for e in train.examples} & {e["text"] for e in validation.examples}


def test_read_texts_from_lines_and_tables(tmp_path):
    lines = tmp_path / "inputs.txt"
    lines.write_text("first text\n\nsecond text\n")
    assert read_texts(lines) == ["first text", "second text"]
    assert read_texts(_write(tmp_path, "jsonl")) == EXPECTED_TEXTS


def test_duplicate_column_names_are_errors(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("text,label,label\na,b,c\n")
    with pytest.raises(DataError, match="'label' as column 2 and column 3") as err:
        load_data(path)
    assert err.value.where == "line 1"
    with pytest.raises(DataError, match=r"\['label'\] more than once"):
        load_data(pd.DataFrame([["a", "b", "c"]], columns=["text", "label", "label"]))


def test_an_unnamed_index_column_is_named_as_pandas_names_it(tmp_path):
    path = tmp_path / "indexed.csv"
    pd.DataFrame(ROWS).to_csv(path)  # with the index, under an empty header
    assert read_table(path).frame.columns.tolist() == ["Unnamed: 0", "text", "label"]
    assert [e["text"] for e in load_data(path).examples] == EXPECTED_TEXTS
