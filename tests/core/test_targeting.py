"""Targets: names, suffixes, regexes, all-linear, table defaults, and errors."""

from __future__ import annotations

import re

import pytest
import torch.nn as nn

import adapterkit as ak
from adapterkit.core.layers import AdapterLayer
from tests.tiny_models import build_tiny


def _wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and m.method == "lora"]


# LoRA with no targets: every attention projection and FFN layer of each block
# (N stands for the block number), and nothing else: no pooler, no head.
DEFAULT_LORA_PATHS = {
    "bert": {f"bert.encoder.layer.N.{leaf}" for leaf in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense")},
    "gpt2": {f"transformer.h.N.{leaf}" for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
    "llama": {f"model.layers.N.{leaf}" for leaf in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
}


@pytest.mark.parametrize("arch", sorted(DEFAULT_LORA_PATHS))
def test_defaults_come_from_the_architecture_table(arch: str) -> None:
    model, _ = build_tiny(arch)
    ak.add_adapter(model, "a", ak.LoraConfig())
    wrapped = _wrapped(model)
    assert {re.sub(r"\.\d+\.", ".N.", p) for p in wrapped} == DEFAULT_LORA_PATHS[arch]
    blocks = {re.search(r"\.(\d+)\.", p).group(1) for p in wrapped}
    assert len(wrapped) == len(blocks) * len(DEFAULT_LORA_PATHS[arch]) and len(blocks) >= 2


def test_suffix_list_and_regex() -> None:
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "a", ak.LoraConfig(targets=["output.dense"]))
    assert len(_wrapped(model)) == 4  # attention.output.dense and output.dense in 2 layers
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "a", ak.LoraConfig(targets=r"bert\.encoder\.layer\.1\..*\.key"))
    assert _wrapped(model) == ["bert.encoder.layer.1.attention.self.key"]


def test_all_linear_skips_the_heads() -> None:
    model, _ = build_tiny("gpt2")
    ak.add_adapter(model, "a", ak.LoraConfig(targets="all-linear"))
    wrapped = _wrapped(model)
    assert "lm_head" not in wrapped and len(wrapped) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "a", ak.LoraConfig(targets="all-linear"))
    assert not any(n.startswith("classifier") for n in _wrapped(model))
    assert len(_wrapped(model)) == 2 * 6 + 1  # q k v attn-out ffn-in ffn-out per layer, pooler


def test_no_match_lists_candidates() -> None:
    model, _ = build_tiny("bert")
    with pytest.raises(ak.TargetError, match=r"match no module.*query.*value"):
        ak.add_adapter(model, "a", ak.LoraConfig(targets=["q_proj"]))
    assert ak.list_adapters(model) == []  # a failed add leaves nothing behind
    assert not _wrapped(model)


def test_unsupported_module_type_is_refused() -> None:
    model, _ = build_tiny("bert")
    with pytest.raises(ak.TargetError, match="LayerNorm"):
        ak.add_adapter(model, "a", ak.LoraConfig(targets=["attention.output.LayerNorm"]))


def test_unknown_architecture_needs_explicit_targets() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ak.TargetError, match="pass targets"):
        ak.add_adapter(model, "a", ak.LoraConfig())
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2, targets=["0", "2"]))
    assert len(_wrapped(model)) == 2


def test_invalid_configs_say_what_was_expected() -> None:
    with pytest.raises(ak.ConfigError, match="rank must be a positive integer, got 0"):
        ak.LoraConfig(rank=0)
    with pytest.raises(ak.ConfigError, match="dropout"):
        ak.LoraConfig(dropout=1.5)
    with pytest.raises(ak.ConfigError, match="targets"):
        ak.LoraConfig(targets=[1, 2])
