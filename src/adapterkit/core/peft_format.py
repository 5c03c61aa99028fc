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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# PEFT task_type -> the adapterkit task (see adapterkit.tasks) whose model class PEFT wraps so.
PEFT_TASKS: dict[str, str] = {
    "SEQ_CLS": "classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "CAUSAL_LM": "causal-lm",
    "SEQ_2_SEQ_LM": "seq2seq",
}


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``'s class, or None when no wrapper fits."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if cls.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return task_type_for_class_name(cls)


def task_type_for_class_name(class_name: str) -> str | None:
    """PEFT's ``task_type`` for a model class known only by name (e.g. a saved fingerprint's
    ``architecture``); None where the name does not tell (``...ForConditionalGeneration``
    is seq2seq only for encoder-decoder models)."""
    return next((task for suffix, task in _TASK_TYPES if class_name.endswith(suffix)), None)


def task_for_task_type(task_type: object) -> str | None:
    """The adapterkit task for PEFT's ``task_type`` (``"SEQ_CLS"`` -> ``"classification"``), or None."""
    return PEFT_TASKS.get(task_type) if isinstance(task_type, str) else None


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


class SavedConfigError(ConfigError):
    """A config in a file holds what no adapterkit config can (a wrong type, an unknown method).

    ``file`` names the file (``adapter_config.json`` or ``adapterkit.json``).
    Settings that are well-formed but that adapterkit does not support raise
    a plain :class:`ConfigError` instead.
    """

    def __init__(self, message: str, file: str = "adapter_config.json") -> None:
        super().__init__(message)
        self.file = file


def config_from_files(adapter_config: dict[str, Any], kit: dict[str, Any] | None) -> tuple[Method, AdapterConfig, bool]:
    """(method, our config, whether the files are in PEFT's schema) for a saved adapter.

    ``adapterkit.json``'s full config is preferred when present: it keeps
    what PEFT's schema cannot (e.g. ``targets=None`` meaning "the default").
    Raises :class:`SavedConfigError` for a file that names no method, or
    holds a field of the wrong type, and :class:`ConfigError` for a method
    or settings adapterkit cannot honour; messages do not name the folder
    (the caller adds it). That the two files agree is :func:`disagreements`'
    business.
    """
    problem = field_type_problem(adapter_config)
    if problem:
        raise SavedConfigError(problem)
    if OUR_METHOD_KEY in adapter_config:
        method = _registered(adapter_config[OUR_METHOD_KEY])
        fields = {k: v for k, v in adapter_config.items() if k != OUR_METHOD_KEY}
        return method, _config_from_dict(method, fields, "adapter_config.json"), False
    peft_type = adapter_config.get("peft_type")
    if not isinstance(peft_type, str):
        raise SavedConfigError(
            "adapter_config.json names no method: expected a PEFT 'peft_type' (e.g. \"LORA\") or "
            f"adapterkit's {OUR_METHOD_KEY!r}; found keys {sorted(adapter_config)[:10]}"
        )
    try:
        method = method_for_peft_type(peft_type)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    if kit and kit.get("method") == method.name and isinstance(kit.get("config"), dict):
        return method, _config_from_dict(method, kit["config"], "adapterkit.json"), True
    try:
        return method, method.config_from_peft(adapter_config), True
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise SavedConfigError(f"PEFT {peft_type} config holds a value adapterkit cannot read: {err}") from err


def _registered(name: object) -> Method:
    """The method adapterkit's own ``adapter_config.json`` names."""
    if not isinstance(name, str):
        raise SavedConfigError(f"{OUR_METHOD_KEY!r} should be a method name, found {name!r}")
    try:
        return get_method(name)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None


def _config_from_dict(method: Method, fields: dict[str, Any], file: str) -> AdapterConfig:
    """``method``'s config from the saved ``fields`` of ``file``.

    ``validate`` may meet a wrong type first as a TypeError or ValueError
    (``float("x")``); both come from the file's values here.
    """
    where = "its 'config'" if file == "adapterkit.json" else f"its {method.name} settings"
    try:
        return method.config_class.from_dict(fields)
    except ConfigError as err:
        raise SavedConfigError(f"{where}: {err}", file) from None
    except (TypeError, ValueError) as err:
        raise SavedConfigError(f"{where}: a setting has a value of the wrong type ({err}); "
                               f"found {fields}", file) from err


# --- field types ---------------------------------------------------------------------
# PEFT fields that adapterkit reads -> (test, words for the message)
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_name_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_names(v: Any) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


PEFT_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string such as \"LORA\""),
    "task_type": (lambda v: v is None or isinstance(v, str), "a string such as \"SEQ_CLS\", or null"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "modules_to_save": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                        "a list of module names, or null"),
    "r": (_is_int, "an integer"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (_is_number, "a number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (_is_names, "a list of module names, a regex string, or null"),
    "feedforward_modules": (_is_names, "a list of module names, a regex string, or null"),
    "num_virtual_tokens": (_is_int, "an integer"),
}


def field_type_problem(adapter_config: Mapping[str, Any]) -> str | None:
    """What is wrong with the type of a PEFT field adapterkit reads, or None when all fit."""
    for field, (test, expected) in PEFT_FIELD_TYPES.items():
        if field in adapter_config and not test(adapter_config[field]):
            value = adapter_config[field]
            return f"field {field!r} should be {expected}, found {value!r} ({_json_kind(value)})"
    return None


def _json_kind(value: Any) -> str:
    """The JSON word for ``value``'s type."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "a list"), (dict, "an object"), (type(None), "null"))
    return next((word for kind, word in kinds if isinstance(value, kind)), type(value).__name__)


# --- what both files state ------------------------------------------------------------
# method -> (PEFT adapter_config.json field, adapterkit config field) pairs that mean the same
SHARED_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "lora": (("r", "rank"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
             ("use_rslora", "use_rslora"), ("use_dora", "use_dora"), ("target_modules", "targets")),
    "ia3": (("target_modules", "targets"), ("feedforward_modules", "feedforward")),
    "prompt_tuning": (("num_virtual_tokens", "num_virtual_tokens"),),
    "prefix_tuning": (("num_virtual_tokens", "num_virtual_tokens"),),
}
# our fields whose None / "all-linear" PEFT's file spells out as resolved names: not comparable then
_RESOLVED_FIELDS = frozenset({"targets", "feedforward"})


@dataclass(frozen=True)
class Disagreement:
    """One value that ``adapter_config.json`` and ``adapterkit.json`` both state, differently."""

    config_field: str  # as named in adapter_config.json
    config_value: Any
    kit_field: str  # as named in adapterkit.json ("config.rank", "method", "task")
    kit_value: Any


def disagreements(adapter_config: Mapping[str, Any], kit: Mapping[str, Any] | None) -> list[Disagreement]:
    """Values stated by both files that differ: method, config fields, and task.

    For a PEFT-schema file the compared fields are :data:`SHARED_FIELDS`; for
    adapterkit's own schema every field both hold. Targets that adapterkit
    keeps as "the default" or ``"all-linear"`` are written out as resolved
    names for PEFT, so they are compared only when given explicitly.
    """
    if not kit:
        return []
    found: list[Disagreement] = []
    kit_method, kit_config = kit.get("method"), kit.get("config")
    if OUR_METHOD_KEY in adapter_config:
        method_name = adapter_config[OUR_METHOD_KEY]
        pairs = tuple((k, k) for k in adapter_config if k != OUR_METHOD_KEY)
        method_field = OUR_METHOD_KEY
    else:
        peft_type = adapter_config.get("peft_type")
        try:
            method_name = method_for_peft_type(peft_type).name if isinstance(peft_type, str) else None
        except KeyError:
            method_name = None
        pairs = SHARED_FIELDS.get(method_name or "", ())
        method_field = "peft_type"
    if isinstance(kit_method, str) and method_name is not None and kit_method != method_name:
        stated = adapter_config.get(method_field)
        return [Disagreement(method_field, stated, "method", kit_method)]  # the fields mean other things
    if isinstance(kit_config, dict):
        if isinstance(kit_config.get("method"), str) and method_name and kit_config["method"] != method_name:
            found.append(Disagreement(method_field, adapter_config.get(method_field), "config.method",
                                      kit_config["method"]))
        for peft_field, our_field in pairs:
            if peft_field not in adapter_config or our_field not in kit_config:
                continue
            ours = kit_config[our_field]
            if our_field in _RESOLVED_FIELDS and method_field == "peft_type" and ours in (None, "all-linear"):
                continue
            if not _same(adapter_config[peft_field], ours):
                found.append(Disagreement(peft_field, adapter_config[peft_field], f"config.{our_field}", ours))
    task, task_type = kit.get("task"), adapter_config.get("task_type")
    if task in PEFT_TASKS.values() and task_type in PEFT_TASKS and PEFT_TASKS[task_type] != task:
        found.append(Disagreement("task_type", task_type, "task", task))
    return found


def _same(a: Any, b: Any) -> bool:
    """Equal as saved values; lists of names compare as sets (PEFT may write a set in any order)."""
    if _is_name_list(a) and _is_name_list(b):
        return set(a) == set(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


# --- what the tensors say ---------------------------------------------------------------
@dataclass(frozen=True)
class TensorEvidence:
    """A tensor whose shape contradicts a config field of the same folder."""

    field: str  # our config field, e.g. "rank"
    stated: Any  # the field's value in the config
    tensor: str  # the tensor's name in the file
    shape: tuple[int, ...]
    found: str  # what the shape means, e.g. "rank 8"


def tensor_evidence(config: AdapterConfig, shapes: Mapping[str, Sequence[int]]) -> TensorEvidence | None:
    """The first tensor (by name) whose shape disagrees with ``config``, or None.

    Checked: LoRA's rank (rows of ``lora_A`` / ``lora_embedding_A``, columns
    of ``lora_B`` / ``lora_embedding_B``), the bottleneck width that
    ``reduction_factor`` gives, and the number of virtual tokens of prompt and
    prefix tuning (rows of ``prompt_embeddings``; PEFT's encoder-decoder
    prompt files hold twice as many). ``shapes`` uses the file's tensor names.
    """
    method = config.method
    fields = config.to_dict()
    plain = {plain_name(k): (k, tuple(int(d) for d in v)) for k, v in shapes.items()}
    for key in sorted(plain):
        name, shape = plain[key]
        if len(shape) != 2:
            continue
        if method == "lora":
            rank = lora_rank(key, shape)
            if rank is not None and rank != fields["rank"]:
                return TensorEvidence("rank", fields["rank"], name, shape, f"rank {rank}")
        elif method == "bottleneck" and key.endswith("adapter_down.weight"):
            up = plain.get(key.removesuffix("adapter_down.weight") + "adapter_up.weight")
            if up is None or len(up[1]) != 2:
                continue
            factor = fields["reduction_factor"]
            width = max(1, up[1][0] // factor)
            if shape[0] != width:
                return TensorEvidence("reduction_factor", factor, name, shape,
                                      f"a bottleneck {shape[0]} wide after a layer {up[1][0]} wide, where "
                                      f"reduction_factor {factor} gives {width}")
        elif method in ("prompt_tuning", "prefix_tuning") and key == "prompt_embeddings":
            count = fields["num_virtual_tokens"]
            allowed = (count, 2 * count) if method == "prompt_tuning" else (count,)
            if shape[0] not in allowed:
                return TensorEvidence("num_virtual_tokens", count, name, shape, f"{shape[0]} virtual tokens")
    return None


def tensor_value(field: str, shapes: Mapping[str, Sequence[int]]) -> tuple[int, str, tuple[int, ...]] | None:
    """(value, tensor, shape): what the tensors show for config ``field``, where one tensor tells.

    Known: ``rank`` (LoRA) and ``num_virtual_tokens`` (prompt and prefix
    tuning; the rows of ``prompt_embeddings``). None for other fields.
    """
    for key in sorted(shapes):
        shape = tuple(int(d) for d in shapes[key])
        plain = plain_name(key)
        rank = lora_rank(plain, shape) if field == "rank" else None
        if rank is not None:
            return rank, key, shape
        if field == "num_virtual_tokens" and plain == "prompt_embeddings" and len(shape) == 2:
            return shape[0], key, shape
    return None


def lora_rank(key: str, shape: Sequence[int]) -> int | None:
    """The rank a LoRA tensor's shape shows (``lora_A``: rows, ``lora_B``: columns), or None."""
    if len(shape) != 2:
        return None
    if key.endswith(("lora_A.weight", "lora_embedding_A")):
        return int(shape[0])
    if key.endswith(("lora_B.weight", "lora_embedding_B")):
        return int(shape[1])
    return None


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
    return {plain_name(key): value for key, value in tensors.items()}


def plain_name(key: str) -> str:
    """A tensor name of the file without PEFT's prefix (see :func:`from_peft_names`)."""
    for prefix in (PEFT_PREFIX, PROMPT_LEARNING_PREFIX):
        if key.startswith(prefix):
            key = key.removeprefix(prefix)
            break
    if key.endswith("lora_magnitude_vector.weight"):
        key = key.removesuffix(".weight")
    return key
