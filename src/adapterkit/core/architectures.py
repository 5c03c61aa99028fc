"""Where things live inside each supported architecture.

One row per ``config.model_type``. Each role maps to a regular expression that
is searched in a module's full dotted path (anchored at a dot or the start).
Methods ask for roles ("key", "ffn_out", ...) and never name modules
themselves, so a new architecture is one new row here.

Roles:
    query, key, value, attn_out  -- attention projections (GPT-2 fuses q/k/v in c_attn)
    ffn_in                       -- first FFN projection(s); its input is the FFN input
    ffn_out                      -- last FFN projection
    embeddings                   -- input token embeddings

``first_token_cut`` (BERT family only): ``(blocks, module)``, the path of the
backbone's block list (from ``model.base_model``) and, inside each block, the
module after which everything is computed position by position and whose two
inputs (the attention's output and its residual) can be cut to the first
position when a sequence classifier reads only that one (``tasks/head_reads.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch.nn as nn


@dataclass(frozen=True)
class ArchSpec:
    """Module roles of one architecture family, and the names of its task heads."""

    roles: dict[str, str]
    heads: tuple[str, ...] = ("classifier", "score", "qa_outputs", "pre_classifier",
                              "classification_head")
    extra: dict[str, str] = field(default_factory=dict)
    first_token_cut: tuple[str, str] | None = None


_BERT = ArchSpec(
    roles={
        "query": r"attention\.self\.query",
        "key": r"attention\.self\.key",
        "value": r"attention\.self\.value",
        "attn_out": r"attention\.output\.dense",
        "ffn_in": r"intermediate\.dense",
        "ffn_out": r"layer\.\d+\.output\.dense",
        "embeddings": r"embeddings\.word_embeddings",
    },
    first_token_cut=("encoder.layer", "attention.output"),  # BertSelfOutput(hidden, residual)
)

_DISTILBERT = ArchSpec(
    roles={
        "query": r"attention\.q_lin",
        "key": r"attention\.k_lin",
        "value": r"attention\.v_lin",
        "attn_out": r"attention\.out_lin",
        "ffn_in": r"ffn\.lin1",
        "ffn_out": r"ffn\.lin2",
        "embeddings": r"embeddings\.word_embeddings",
    },
)

_GPT2 = ArchSpec(
    roles={
        "query": r"attn\.c_attn",
        "key": r"attn\.c_attn",
        "value": r"attn\.c_attn",
        "attn_out": r"attn\.c_proj",
        "ffn_in": r"mlp\.c_fc",
        "ffn_out": r"mlp\.c_proj",
        "embeddings": r"wte",
    },
)

_LLAMA = ArchSpec(
    roles={
        "query": r"self_attn\.q_proj",
        "key": r"self_attn\.k_proj",
        "value": r"self_attn\.v_proj",
        "attn_out": r"self_attn\.o_proj",
        "ffn_in": r"mlp\.(gate_proj|up_proj)",
        "ffn_out": r"mlp\.down_proj",
        "embeddings": r"embed_tokens",
    },
)

_T5 = ArchSpec(
    roles={
        "query": r"(SelfAttention|EncDecAttention)\.q",
        "key": r"(SelfAttention|EncDecAttention)\.k",
        "value": r"(SelfAttention|EncDecAttention)\.v",
        "attn_out": r"(SelfAttention|EncDecAttention)\.o",
        "ffn_in": r"DenseReluDense\.(wi|wi_0|wi_1)",
        "ffn_out": r"DenseReluDense\.wo",
        "embeddings": r"shared",
    },
)

_BART = ArchSpec(
    roles={
        "query": r"(self_attn|encoder_attn)\.q_proj",
        "key": r"(self_attn|encoder_attn)\.k_proj",
        "value": r"(self_attn|encoder_attn)\.v_proj",
        "attn_out": r"(self_attn|encoder_attn)\.out_proj",
        "ffn_in": r"layers\.\d+\.fc1",
        "ffn_out": r"layers\.\d+\.fc2",
        "embeddings": r"shared",
    },
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "mistral": _LLAMA,
    "t5": _T5,
    "mt5": _T5,
    "bart": _BART,
    "mbart": _BART,
    "marian": _BART,
}


def roles_regex(spec: ArchSpec, roles: Sequence[str]) -> str:
    """One regular expression, for PEFT's ``target_modules`` (which it full-matches
    against module paths), that selects the same modules as our matching of ``roles``."""
    patterns = dict.fromkeys(spec.roles[r] for r in roles if r in spec.roles)
    return r"(.*\.)?(" + "|".join(f"({p})" for p in patterns) + ")"


def model_type(model: nn.Module) -> str | None:
    """The Hugging Face ``config.model_type`` of ``model``, or None for plain modules."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def arch_spec(model: nn.Module) -> ArchSpec | None:
    """The table row for ``model``'s architecture, or None when it is not in the table."""
    kind = model_type(model)
    return ARCHITECTURES.get(kind) if kind else None


def role_pattern(role: str) -> str:
    """Wrap a role expression so it matches whole path components at the path's end."""
    return rf"(^|\.)({role})$"


def modules_in_role(model: nn.Module, role: str, spec: ArchSpec | None = None) -> list[str]:
    """Full paths of the modules that play ``role`` in ``model`` (empty if unknown)."""
    spec = spec or arch_spec(model)
    if spec is None or role not in spec.roles:
        return []
    pattern = re.compile(role_pattern(spec.roles[role]))
    from adapterkit.core.layers import candidate_modules

    return [name for name, _ in candidate_modules(model) if pattern.search(name)]
