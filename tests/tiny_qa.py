"""Tiny extractive-QA models and data for tests: a word-level BERT tokenizer
written to disk, a 2-layer BERT QA model built from a config, and a toy task
("which colour does the context name?") that such a model learns in a few
dozen steps."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
QUESTION_WORDS = ["where", "is", "what", "which", "colour", "named", "?", ".", ","]
COLOURS = ["red", "green", "blue", "amber", "violet", "teal"]
FILLER = [f"w{i}" for i in range(60)]
WORDS = QUESTION_WORDS + COLOURS + FILLER
QUESTION = "which colour is named ?"


def tiny_qa_tokenizer(folder: Path) -> BertTokenizerFast:
    """A lower-casing word-level BERT tokenizer over ``WORDS``, saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores ``vocab_file`` here; the vocabulary must be passed as a dict
    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_qa_folder(folder: Path, seed: int = 0, max_positions: int = 64) -> Path:
    """A randomly initialised 2-layer BERT QA model and its tokenizer, saved like a hub checkout."""
    tokenizer = tiny_qa_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=max_positions)
    torch.manual_seed(seed)
    BertForQuestionAnswering(config).save_pretrained(folder)
    return folder


def toy_colours(n: int, seed: int = 0, min_words: int = 4, max_words: int = 14) -> list[dict[str, Any]]:
    """``n`` flat QA records: filler words with one colour among them; the colour is the answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, rng.randint(min_words, max_words))
        position = rng.randrange(len(words) + 1)
        colour = rng.choice(COLOURS)
        words.insert(position, colour)
        context = " ".join(words)
        start = len(" ".join(words[:position])) + (1 if position else 0)
        rows.append({"id": f"q{i}", "question": QUESTION, "context": context,
                     "answers": [{"text": colour, "answer_start": start}]})
    return rows


def squad_object(rows: list[dict[str, Any]], per_article: int = 5) -> dict[str, Any]:
    """Flat records grouped into a SQuAD-format object, ``per_article`` paragraphs per article."""
    articles = []
    for a in range(0, len(rows), per_article):
        paragraphs = [{"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                                         "answers": r["answers"]}]}
                      for r in rows[a : a + per_article]]
        articles.append({"title": f"article{a // per_article}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": articles}


def write_squad(path: Path, rows: list[dict[str, Any]], per_article: int = 5) -> Path:
    """Write ``rows`` as a SQuAD-format JSON file."""
    path.write_text(json.dumps(squad_object(rows, per_article)))
    return path
