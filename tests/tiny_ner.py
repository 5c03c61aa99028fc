"""Tiny NER fixtures: a WordPiece BERT tokenizer whose vocabulary splits some
words into several sub-tokens, a 2-layer BERT token classifier built from a
config, and a toy tagged corpus that such a model learns in a few dozen steps."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PEOPLE = ["john", "mary", "ahmed", "li", "olga"]
SURNAMES = ["smith", "khan", "wong"]
CITIES = ["paris", "lagos", "lima", "newyork"]  # "newyork" -> new ##york
ORGS = ["acme", "unicef", "megacorp"]  # "megacorp" -> mega ##co ##rp
FILLER = ["the", "a", "in", "at", "from", "works", "lives", "visited", "met", "today", "and", "with", "."]
PIECES = ["new", "##york", "mega", "##co", "##rp"]
VOCAB = SPECIALS + PEOPLE + SURNAMES + [c for c in CITIES if c != "newyork"] + \
    [o for o in ORGS if o != "megacorp"] + FILLER + PIECES


def tiny_ner_tokenizer(folder: Path) -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer over ``VOCAB``, saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    # transformers 5 takes the vocabulary itself (``vocab_file=`` is silently ignored).
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_ner_folder(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT encoder (no task head) and its tokenizer, saved like a hub checkout."""
    tokenizer = tiny_ner_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)  # no head, like a pretrained checkout
    return folder


def _entity(rng: random.Random) -> tuple[list[str], str]:
    kind = rng.choice(["PER", "LOC", "ORG"])
    if kind == "PER":
        words = [rng.choice(PEOPLE)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
    else:
        words = [rng.choice(CITIES if kind == "LOC" else ORGS)]
    return words, kind


def toy_ner(n: int, seed: int = 0) -> list[dict]:
    """``n`` sentences ``{"tokens", "tags"}`` (IOB2) mixing filler words and one or two entities."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens: list[str] = []
        tags: list[str] = []
        for _ in range(rng.randint(1, 2)):
            filler = rng.sample(FILLER, rng.randint(1, 3))
            tokens += filler
            tags += ["O"] * len(filler)
            words, kind = _entity(rng)
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def long_toy_ner(n: int, parts: int = 4, seed: int = 0) -> list[dict]:
    """``n`` sentences, each ``parts`` sentences of ``toy_ner`` run together: ``parts`` times
    as long (with 4 parts, up to about 40 sub-tokens, most longer than a 16-token window),
    with entities all along."""
    short = toy_ner(n * parts, seed=seed)
    rows = []
    for i in range(n):
        group = short[i * parts:(i + 1) * parts]
        rows.append({"tokens": [t for row in group for t in row["tokens"]],
                     "tags": [t for row in group for t in row["tags"]]})
    return rows
