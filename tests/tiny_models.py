"""Tiny, randomly initialised models of each supported family, built from configs.

Each builder returns ``(model, inputs)``: the model in eval mode (seeded, so
two calls give identical weights) and a small batch of keyword inputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64


def _ids(batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # second example is padded
    return {"input_ids": ids, "attention_mask": mask}


def bert() -> tuple[torch.nn.Module, dict]:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(config), _ids()


def gpt2() -> tuple[torch.nn.Module, dict]:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config), _ids()


def llama() -> tuple[torch.nn.Module, dict]:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config), _ids()


def t5() -> tuple[torch.nn.Module, dict]:
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    inputs = _ids()
    inputs["decoder_input_ids"] = _ids(length=5, seed=2)["input_ids"]
    return T5ForConditionalGeneration(config), inputs


def bart() -> tuple[torch.nn.Module, dict]:
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    inputs = _ids()
    inputs["decoder_input_ids"] = _ids(length=5, seed=2)["input_ids"]
    return BartForConditionalGeneration(config), inputs


TINY_BUILDERS: dict[str, Callable[[], tuple[torch.nn.Module, dict]]] = {
    "bert": bert, "gpt2": gpt2, "llama": llama, "t5": t5, "bart": bart,
}


def build_tiny(kind: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A seeded tiny model of family ``kind`` in eval mode, with example inputs, on the test device."""
    from tests.devices import test_device

    torch.manual_seed(seed)
    model, inputs = TINY_BUILDERS[kind]()
    device = test_device()
    return model.to(device).eval(), {k: v.to(device) for k, v in inputs.items()}


def output_tensor(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The logits of a forward pass, with gradients off."""
    with torch.no_grad():
        return model(**inputs).logits


def perturb(model: torch.nn.Module, name: str, seed: int = 0, scale: float = 0.3) -> None:
    """Move adapter ``name``'s own weights (not its head) away from their initial values."""
    import adapterkit as ak

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name, include_head=False).values():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
