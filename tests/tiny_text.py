"""Tiny text models and data for workflow tests: a word-level BERT tokenizer
written to disk, a 2-layer BERT built from a config, and a toy sentiment set
that such a model learns in a few dozen steps."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great"]
NEGATIVE = ["bad", "dull"]
FILLER = ["the", "a", "film", "movie", "plot", "was", "is", "very", "quite", "and", "story", "acting", "scene", "actor", "ending", "music"]
WORDS = POSITIVE + NEGATIVE + FILLER


def tiny_tokenizer(folder: Path) -> BertTokenizer:
    """A lower-casing word-level BERT tokenizer over ``WORDS``, saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_bert_folder(folder: Path, num_labels: int = 2, seed: int = 0, dropout: float = 0.1,
                     with_head: bool = True) -> Path:
    """A randomly initialised 2-layer BERT classifier and its tokenizer, saved like a hub checkout.

    The large ``initializer_range`` keeps word identity visible at the [CLS]
    position of a random model, so LoRA can learn the toy task in few steps.
    ``with_head=False`` saves the bare encoder (like MiniLM), so loading it for
    classification initialises a new head.
    """
    tokenizer = tiny_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        num_labels=num_labels, initializer_range=0.2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    (model if with_head else model.bert).save_pretrained(folder)
    return folder


def toy_sentiment(n: int, seed: int = 0, labels: tuple[str, str] = ("neg", "pos")) -> list[dict]:
    """``n`` rows ``{"text", "label"}``: the label is the polarity of the one sentiment word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, rng.randint(0, 2)) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": labels[1] if positive else labels[0]})
    return rows


def tiny_lora_classifier(folder: Path, labels: list[str], rank: int = 4, dropout: float = 0.1, seed: int = 0):
    """``(model, tokenizer)``: the tiny BERT in ``folder`` with a seeded LoRA adapter "toy" on query/value."""
    from adapterkit.core import add_adapter
    from adapterkit.methods import LoraConfig
    from adapterkit.models import load_model

    from tests.devices import test_device

    model, tokenizer = load_model(folder, labels=labels, device=str(test_device()))
    torch.manual_seed(seed)
    add_adapter(model, "toy", LoraConfig(rank=rank, alpha=2 * rank, dropout=dropout, targets=["query", "value"]))
    return model, tokenizer
