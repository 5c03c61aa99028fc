"""Shared plumbing of the methods that act on a model's inputs (prefix and prompt tuning).

Both methods hook the root model's ``forward`` (a pre-hook that rewrites the
keyword arguments) instead of wrapping a layer. This module holds what the two
hooks have in common: binding positional arguments to names, deciding whether
the hook applies to this call, and growing masks and id tensors by the number
of virtual tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from adapterkit.core.config import ConfigError
from adapterkit.core.context import PerThread, current_plan
from adapterkit.core.layers import get_store
from adapterkit.core.plan import Route, plan_names
from adapterkit.core.state import AdapterState
from adapterkit.errors import UnknownNameError, UsageError, WrongTypeError

# Marks an adapter as "works on the model's inputs" in ``state.extras``.
INPUT_ADAPTER = "input_adapter"

# Why a plan may not weight or fuse prefix/prompt adapters (shown by resolve_plan).
INPUT_SIDE_REFUSALS = {
    "average": "adds virtual tokens to the input; attention over them is not linear in them, so there is "
               "no output to weight. Average adapters that change weights or outputs (lora, ia3, bottleneck)",
}


def forward_parameters(model: nn.Module) -> list[str]:
    """Names of ``model.forward``'s parameters, in order (``self`` excluded)."""
    params = inspect.signature(model.forward).parameters
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def bind_arguments(names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All call arguments as keywords, so the hook can edit them by name."""
    if len(args) > len(names):
        raise WrongTypeError(f"forward got {len(args)} positional arguments; adapterkit can bind only {len(names)}")
    bound = dict(zip(names, args))
    overlap = sorted(set(bound) & set(kwargs))
    if overlap:
        raise WrongTypeError(f"forward got multiple values for argument(s) {overlap}")
    bound.update(kwargs)
    return bound


def hook_applies(state: AdapterState, name: str) -> bool:
    """Whether adapter ``name``'s input hook changes this forward call.

    It does when the current plan names the adapter (for a Route: the plan of
    the batch's rows, which ``resolve_plan`` made sure is one plan whenever a
    prefix or prompt adapter takes part).
    """
    plan = current_plan(state)
    if isinstance(plan, Route):
        plan = plan.entries[0]
        if plan is None:
            return False
    return name in plan_names(plan)


class PerThreadStack(PerThread):
    """A stack of per-call values kept by a pre-hook for its post-hook, one per thread."""

    def __init__(self) -> None:
        self.items: list[Any] = []


def install_hooks(
    model: nn.Module,
    name: str,
    state: AdapterState,
    pre: Callable[[nn.Module, tuple, dict], Any],
    post: Callable[[nn.Module, tuple, dict, Any], Any] | None = None,
    module: nn.Module | None = None,
) -> None:
    """Register ``pre`` (and ``post``) on ``module`` (default: the root); unload removes them."""
    target = model if module is None else module
    handles = [target.register_forward_pre_hook(pre, with_kwargs=True)]
    if post is not None:
        handles.append(target.register_forward_hook(post, with_kwargs=True, always_call=True))
    state.extras.setdefault(name, {})[INPUT_ADAPTER] = True
    state.cleanups.setdefault(name, []).extend(h.remove for h in handles)


def batch_size(kwargs: dict[str, Any]) -> int:
    """The batch size of a forward call, from whichever input is present."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        return encoder_outputs[0].shape[0]
    raise UsageError("cannot tell the batch size: pass input_ids or inputs_embeds")


def prepend(tensor: torch.Tensor | None, count: int, value: float) -> torch.Tensor | None:
    """``tensor`` (batch, seq, ...) with ``count`` columns of ``value`` in front; None stays None."""
    if tensor is None:
        return None
    if tensor.dim() != 2:
        raise UsageError(
            f"prefix/prompt tuning extends 2-D (batch, seq) masks and ids, got shape {tuple(tensor.shape)}; "
            "pass a 2-D attention mask"
        )
    pad = tensor.new_full((tensor.shape[0], count), value)
    return torch.cat([pad, tensor], dim=1)


def wants_cache(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether this call asked for a cache back (``use_cache``, defaulting to the model config)."""
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(getattr(model, "config", None), "use_cache", False)
    return bool(use_cache)


def without(output: Any, value: Any) -> Any:
    """``output`` (a ``ModelOutput`` or tuple) with the field holding ``value`` removed."""
    if isinstance(output, tuple):
        return tuple(item for item in output if item is not value)
    keys = [k for k, v in output.items() if v is value]
    if not keys:
        return output
    return type(output)(**{k: v for k, v in output.items() if k not in keys})


def cache_argument(names: list[str], accepts_kwargs: bool) -> str:
    """The keyword under which the model takes its KV cache (``cache`` in transformers 5)."""
    if "cache" in names:
        return "cache"
    if "past_key_values" in names:
        return "past_key_values"
    return "cache" if accepts_kwargs else "past_key_values"


def accepts_var_kwargs(model: nn.Module) -> bool:
    """True when ``model.forward`` takes ``**kwargs``."""
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind == p.VAR_KEYWORD for p in params)


def checkpointing(model: nn.Module) -> bool:
    """True when gradient (activation) checkpointing is on for a Hugging Face model."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def model_dtype(model: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The floating dtype the model computes in."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return fallback


# --- PEFT interchange -----------------------------------------------------------
def peft_common(peft_type: str, num_virtual_tokens: int) -> dict[str, Any]:
    """The ``adapter_config.json`` keys shared by PEFT's prompt-learning methods.

    ``task_type``, ``base_model_name_or_path`` and ``modules_to_save`` are left
    for the saver to fill in (it knows the heads and the model class).
    """
    return {"peft_type": peft_type, "task_type": None, "num_virtual_tokens": num_virtual_tokens,
            "inference_mode": True}


def check_peft_type(data: dict[str, Any], expected: str) -> None:
    """Raise when a PEFT config is of another method than ``expected``."""
    found = data.get("peft_type")
    if found != expected:
        raise ConfigError(f"expected a PEFT config with peft_type {expected!r}, got {found!r}")
    if not isinstance(data.get("num_virtual_tokens"), int):
        found = data.get("num_virtual_tokens")
        raise ConfigError(f"PEFT {expected} config lacks an integer num_virtual_tokens (got {found!r})")


def single_tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The one tensor ``prompt_embeddings`` that PEFT's prompt-learning files hold."""
    if set(tensors) != {"prompt_embeddings"}:
        raise UsageError(
            f"adapter {name!r}: expected exactly one tensor 'prompt_embeddings', got {sorted(tensors)[:5]}"
        )
    return tensors["prompt_embeddings"]


def stored(model: nn.Module, name: str, kind: type[nn.Module]) -> Any:
    """Adapter ``name``'s module of type ``kind`` in the model's adapter store."""
    store = get_store(model)
    module = store.adapters[name] if store is not None and name in store.adapters else None
    if not isinstance(module, kind):
        raise UnknownNameError(f"model has no {kind.__name__} adapter called {name!r}")
    return module


def strip_virtual(output: Any, count: int, length: int) -> Any:
    """``output`` without the first ``count`` positions of each field of sequence length ``length``.

    Fields with a sequence dimension are tensors of 3 or more dimensions (token
    logits, hidden states) and 2-D ``*_logits`` (start/end logits of QA); a
    sequence-level output such as classification logits is left alone.
    """
    def cut(key: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            sequence_like = value.dim() >= 3 or (value.dim() == 2 and key.endswith("_logits"))
            return value[:, count:] if sequence_like and value.shape[1] == length else value
        if isinstance(value, tuple) and key == "hidden_states":
            return tuple(cut(key, v) for v in value)
        return value

    if isinstance(output, tuple):
        return tuple(cut("", v) for v in output)
    for key in list(output.keys()):
        output[key] = cut(key, output[key])
    return output
