"""Which kind of server a base model makes: generative (completions, chat) or encoder (classify, tag, answer)."""

from __future__ import annotations

import json
from pathlib import Path

from adapterkit.errors import UsageError
from adapterkit.models.adapters import adapter_metadata, adapter_task
from adapterkit.models.aliases import resolve_model_path

GENERATIVE_TASKS = ("causal-lm", "seq2seq")
ENCODER_TASKS = ("classification", "token-classification", "question-answering")


def _architecture_task(model: str) -> str:
    """The task the model's own ``config.json`` implies: a generative head, else an encoder."""
    config_file = Path(resolve_model_path(model)) / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    architectures = " ".join(config.get("architectures") or [])
    if config.get("is_encoder_decoder") or "ForConditionalGeneration" in architectures:
        return "seq2seq"
    if "ForCausalLM" in architectures or "LMHeadModel" in architectures:
        return "causal-lm"
    return "encoder"


def server_task(model: str, adapters: dict[str, Path], task: str | None = None) -> str:
    """``causal-lm``, ``seq2seq`` or ``encoder``: from ``task``, else the adapters given, else the model's config.

    Adapters given at start must agree: one server generates or encodes, not both.
    """
    if task is not None:
        if task not in GENERATIVE_TASKS + ENCODER_TASKS + ("encoder",):
            raise UsageError(f"unknown task {task!r}; expected one of {list(GENERATIVE_TASKS + ENCODER_TASKS)}")
        return "encoder" if task in ENCODER_TASKS else task
    kinds = {}
    for name, folder in adapters.items():
        found = adapter_task(adapter_metadata(folder), folder)
        kinds[name] = "encoder" if found in ENCODER_TASKS else found
    if len(set(kinds.values())) > 1:
        raise UsageError(f"one server serves one kind of model; the adapters given are for {kinds}")
    if kinds:
        return next(iter(kinds.values()))
    return _architecture_task(model)
