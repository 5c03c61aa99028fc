"""``adapter_config.json`` and tensor names, in PEFT's schema where PEFT has the method.

Facts about PEFT's files (peft 0.21), found by saving its adapters:

- tensors are named ``base_model.model.<module path>.<param>`` without the
  adapter name: ``...query.lora_A.weight``, ``...lora_B.weight``,
  ``...wte.lora_embedding_A`` / ``lora_embedding_B`` (no ``.weight``), DoRA's
  ``...lora_magnitude_vector`` (no ``.weight``), IA3's ``...ia3_l``;
- a ``modules_to_save`` head is saved as the plain module's parameters,
  ``base_model.model.classifier.weight``; for prompt-learning methods (prompt,
  prefix tuning) the prefix is only ``base_model.`` (``base_model.classifier.weight``);
- prompt and prefix tuning save one tensor, ``prompt_embeddings``, unprefixed;
- ``adapter_config.json`` holds ``peft_type`` and the method's fields.

Methods PEFT does not have write ``{"adapterkit_method": <name>, <our fields>}``
and name tensors by the same rule, without the ``base_model.model.`` prefix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from adapterkit.core.config import AdapterConfig, ConfigError
from adapterkit.core.registry import Method, get_method, method_for_peft_type

PEFT_PREFIX = "base_model.model."
PROMPT_LEARNING_PREFIX = "base_model."
# PEFT types whose PeftModel holds the plain model as ``base_model`` (no tuner wrapper)
PROMPT_LEARNING_TYPES = frozenset({"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"})
OUR_METHOD_KEY = "adapterkit_method"

# Model class name ending -> PEFT task_type (PEFT picks its model wrapper by it).
_TASK_TYPES: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
)


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``'s class, or None when no wrapper fits."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if cls.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return next((task for suffix, task in _TASK_TYPES if cls.endswith(suffix)), None)


def peft_config_for(method: Method, config: AdapterConfig, model: nn.Module,
                    heads: list[str]) -> dict[str, Any] | None:
    """PEFT's ``adapter_config.json`` content, or None when the method has no PEFT form."""
    if method.peft_type is None:
        return None
    try:
        data = dict(method.peft_config(config, model))
    except NotImplementedError:
        return None
    data["peft_type"] = method.peft_type
    own_heads = list(data.get("modules_to_save") or [])
    data["modules_to_save"] = own_heads + [h for h in heads if h not in own_heads] or None
    if data.get("task_type") is None:
        data["task_type"] = infer_task_type(model)
    if not data.get("base_model_name_or_path"):
        data["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    data.setdefault("inference_mode", True)
    return data


def own_config_for(method: Method, config: AdapterConfig) -> dict[str, Any]:
    """Our ``adapter_config.json`` for a method PEFT does not have."""
    fields = {k: v for k, v in config.to_dict().items() if k != "method"}
    return {OUR_METHOD_KEY: method.name, **fields}


def config_from_files(adapter_config: dict[str, Any], kit: dict[str, Any] | None) -> tuple[Method, AdapterConfig, bool]:
    """(method, our config, whether the files are in PEFT's schema) for a saved adapter.

    ``adapterkit.json``'s full config is preferred when present: it keeps
    what PEFT's schema cannot (e.g. ``targets=None`` meaning "the default").
    """
    if OUR_METHOD_KEY in adapter_config:
        method = get_method(adapter_config[OUR_METHOD_KEY])
        fields = {k: v for k, v in adapter_config.items() if k != OUR_METHOD_KEY}
        return method, method.config_class.from_dict(fields), False
    peft_type = adapter_config.get("peft_type")
    if not isinstance(peft_type, str):
        raise ConfigError(
            "adapter_config.json names no method: expected a PEFT 'peft_type' (e.g. \"LORA\") or "
            f"adapterkit's {OUR_METHOD_KEY!r}; found keys {sorted(adapter_config)[:10]}"
        )
    method = method_for_peft_type(peft_type)
    if kit and kit.get("method") == method.name and isinstance(kit.get("config"), dict):
        return method, method.config_class.from_dict(kit["config"]), True
    return method, method.config_from_peft(adapter_config), True


def to_peft_names(model: nn.Module, tensors: dict[str, torch.Tensor], peft_type: str) -> dict[str, torch.Tensor]:
    """Prefix names of model parameters as PEFT does for ``peft_type``.

    Names that do not start at one of the model's top-level modules
    (``prompt_embeddings``) stay as they are.
    """
    prefix = PROMPT_LEARNING_PREFIX if peft_type in PROMPT_LEARNING_TYPES else PEFT_PREFIX
    children = {child for child, _ in model.named_children()}
    return {(prefix + k if k.split(".", 1)[0] in children else k): v for k, v in tensors.items()}


def from_peft_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`to_peft_names`; also accept older PEFT's ``lora_magnitude_vector.weight``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for prefix in (PEFT_PREFIX, PROMPT_LEARNING_PREFIX):
            if key.startswith(prefix):
                key = key.removeprefix(prefix)
                break
        if key.endswith("lora_magnitude_vector.weight"):
            key = key.removesuffix(".weight")
        out[key] = value
    return out
