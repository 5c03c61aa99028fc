"""Tiny generative models and data for the causal-lm and seq2seq tests: a word-level
tokenizer built in the test (optionally with a ChatML chat template), Llama / GPT-2 /
T5 / BART models from configs saved like hub checkouts, and toy instruction and
translation sets."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
COLORS = ["red", "blue", "green", "black", "white", "pink"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
GERMAN = ["rot", "blau", "gruen", "schwarz", "weiss", "rosa"]
WORDS = (["###", "Instruction", "Response", ":", "system", "user", "assistant", "say", "twice", "what",
          "is", "plus", "translate", "Translate", "English", "to", "German", "the", "answer", "####", "STOP",
          "hello", ".", "?", ","] + COLORS + NUMBERS + GERMAN)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (thread hand-offs dominate on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer(folder: Path | None = None, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS`` (``<s>`` / ``</s>`` / ``<pad>``), saved in ``folder``."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tokenizer.chat_template = CHATML
        tokenizer.eos_token = "<|im_end|>"
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(folder)
    return tokenizer


def _ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, **_ids(tokenizer))
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(tokenizer: PreTrainedTokenizerFast, seed: int = 0, attn: str = "sdpa") -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **_ids(tokenizer))
    config._attn_implementation = attn
    return GPT2LMHeadModel(config).eval()


def tiny_t5(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=tokenizer.pad_token_id,
                      **_ids(tokenizer))
    return T5ForConditionalGeneration(config).eval()


def tiny_bart(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=128, decoder_start_token_id=tokenizer.eos_token_id,
                        forced_eos_token_id=None, **_ids(tokenizer))
    return BartForConditionalGeneration(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bart": tiny_bart}


def tiny_model_folder(folder: Path, kind: str, chat_template: bool = False) -> Path:
    """A tiny model of family ``kind`` and its tokenizer, saved like a hub checkout."""
    tokenizer = tiny_tokenizer(folder, chat_template=chat_template)
    BUILDERS[kind](tokenizer).save_pretrained(folder)
    return folder


def toy_instructions(n: int, seed: int = 0) -> list[dict]:
    """``{"instruction", "output"}`` rows: "say red twice" -> "red red"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color = rng.choice(COLORS)
        rows.append({"instruction": f"say {color} twice", "output": f"{color} {color}"})
    return rows


def toy_arithmetic(n: int, seed: int = 0) -> list[dict]:
    """GSM8K-like ``{"question", "answer"}`` rows whose answers end with ``#### N``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        rows.append({"question": f"what is {a} plus {b} ?", "answer": f"the answer is {a + b} . #### {a + b}"})
    return rows


def toy_translation(n: int, seed: int = 0, words: int = 4) -> tuple[list[str], list[str]]:
    """English colour phrases and their "German": one colour repeated ``words`` times
    (learnable in a few dozen steps, and long enough for 4-gram BLEU)."""
    rng = random.Random(seed)
    english, german = [], []
    for _ in range(n):
        i = rng.randrange(len(COLORS))
        english.append(" ".join([COLORS[i]] * words))
        german.append(" ".join([GERMAN[i]] * words))
    return english, german
