"""Turning a method's ``targets`` into the module paths it wraps.

Targets follow PEFT's conventions so configs carry over: a list of names
matches a module whose path equals a name or ends with ``"." + name``; a
string is a regular expression that must match the whole path; ``"all-linear"``
takes every linear layer except the output head.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch.nn as nn

from adapterkit.core.architectures import (
    ArchSpec,
    arch_spec,
    model_type,
    modules_in_role,
)
from adapterkit.core.layers import candidate_modules, innermost
from adapterkit.errors import UserError

try:  # GPT-2 style linear layer with its weight stored as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())

# Layer types whose output autograd does not keep for the backward: nothing else holds a fresh
# output, so an adapter may add to it or scale it in place. Other layer types (a quantised
# layer's) join through register_fresh_output once their forward is known to allow it.
_FRESH_OUTPUT: set[type] = set(LINEAR_TYPES)


def register_fresh_output(module_type: type) -> None:
    """Declare that ``module_type``'s forward returns a tensor nothing else keeps (in-place updates are safe)."""
    _FRESH_OUTPUT.add(module_type)


def has_fresh_output(module: nn.Module) -> bool:
    """True when ``module``'s exact type returns an output that may be updated in place."""
    return type(module) in _FRESH_OUTPUT


class TargetError(UserError, ValueError):
    """The requested targets match nothing usable in the model."""


def name_matches(path: str, targets: Sequence[str] | str) -> bool:
    """PEFT-style match of one module path against a target list or regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def head_paths(model: nn.Module, spec: ArchSpec | None = None) -> list[str]:
    """Top-level task heads (classifier, score, ...) and the output embedding path."""
    spec = spec or arch_spec(model)
    heads = spec.heads if spec else ArchSpec(roles={}).heads
    found = [name for name, _ in model.named_children() if name in heads]
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        for name, module in model.named_modules():
            if module is out:
                found.append(name)
    return found


def _candidates_listing(model: nn.Module, types: tuple[type, ...]) -> str:
    leaf_names: list[str] = []
    for path, module in candidate_modules(model):
        if isinstance(innermost(module), types):
            leaf = path.rsplit(".", 1)[-1]
            if leaf not in leaf_names:
                leaf_names.append(leaf)
    return ", ".join(leaf_names[:40]) or "(none of a supported type)"


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str] | str | None,
    types: tuple[type, ...],
    default_roles: Sequence[str] = (),
    default_names: Sequence[str] = (),
    method: str = "adapter",
) -> list[str]:
    """Module paths to wrap, in model order.

    ``targets=None`` uses the architecture table: ``default_names`` (PEFT-style
    names) when given, else the union of ``default_roles``.
    """
    spec = arch_spec(model)
    excluded = set(head_paths(model, spec))
    if targets is None:
        if spec is None:
            raise TargetError(
                f"{method}: model_type {model_type(model)!r} is not in adapterkit's architecture "
                f"table, so there are no default targets; pass targets=[...] explicitly. "
                f"Module names that could be targeted: {_candidates_listing(model, types)}"
            )
        if default_names:
            matched = [p for p, _ in candidate_modules(model) if name_matches(p, list(default_names))]
        else:
            wanted = {p for role in default_roles for p in modules_in_role(model, role, spec)}
            matched = [p for p, _ in candidate_modules(model) if p in wanted]
    elif targets == "all-linear":
        matched = [
            p for p, m in candidate_modules(model)
            if isinstance(innermost(m), LINEAR_TYPES) and p not in excluded
        ]
    else:
        matched = [p for p, _ in candidate_modules(model) if name_matches(p, targets)]
    matched = [p for p in matched if p not in excluded or targets not in (None, "all-linear")]
    if not matched:
        raise TargetError(
            f"{method}: targets {targets!r} match no module of {type(model).__name__}. "
            f"Candidate module names: {_candidates_listing(model, types)}"
        )
    wrong = [p for p in matched if not isinstance(innermost(model.get_submodule(p)), types)]
    if wrong:
        kinds = sorted({type(innermost(model.get_submodule(p))).__name__ for p in wrong})
        allowed = sorted(t.__name__ for t in types)
        raise TargetError(
            f"{method}: targets {targets!r} matched {wrong[:5]} of type {kinds}, but {method} "
            f"supports only {allowed}. Candidate module names: {_candidates_listing(model, types)}"
        )
    return matched


def block_list(model: nn.Module, path: str) -> tuple[nn.ModuleList, int] | None:
    """The first ``nn.ModuleList`` on ``path`` and the index ``path`` takes in it."""
    module: nn.Module = model
    for part in path.split("."):
        child = module._modules.get(part)
        if child is None:
            return None
        if isinstance(module, nn.ModuleList) and part.isdigit():
            return module, int(part)
        module = child
    return None


def block_index(model: nn.Module, path: str) -> int | None:
    """The index of the repeated block that holds module ``path``: the number that follows the
    first ``nn.ModuleList`` on the path (``bert.encoder.layer.3.attention`` -> 3), or ``None``."""
    found = block_list(model, path)
    return None if found is None else found[1]


def block_count(model: nn.Module, paths: Sequence[str]) -> int:
    """How many blocks the lists holding ``paths`` have (the longest, for an encoder-decoder)."""
    return max([len(found[0]) for found in map(lambda p: block_list(model, p), paths) if found] or [0])


def keep_layers(model: nn.Module, paths: list[str], layers: Sequence[int] | None, method: str) -> list[str]:
    """``paths`` restricted to the blocks numbered in ``layers`` (PEFT's ``layers_to_transform``); all for None.

    A path outside every block list (a head, the embeddings) is dropped once
    layers are chosen, as in PEFT.
    """
    if layers is None:
        return paths
    count = block_count(model, paths)
    outside = sorted(i for i in layers if not 0 <= i < count)
    if outside:
        raise TargetError(f"{method}: layers {outside} do not exist; the model's blocks are numbered 0-{count - 1}")
    wanted = set(layers)
    kept = [p for p in paths if block_index(model, p) in wanted]
    if not kept:
        raise TargetError(f"{method}: none of the targeted modules is in layers {sorted(wanted)}")
    return kept


def parse_layer_choice(choice: str, count: int) -> list[int]:
    """The block indices of ``"top:K"`` (the last K of ``count``), ``"bottom:K"`` or ``"3,4,5"``."""
    kind, _, amount = choice.partition(":")
    if kind in ("top", "bottom") and amount.isdigit() and 0 < int(amount) <= count:
        k = int(amount)
        return list(range(count - k, count)) if kind == "top" else list(range(k))
    if not amount and all(p.strip().isdigit() for p in choice.split(",")):
        return sorted({int(p) for p in choice.split(",")})
    raise TargetError(f"adapter layers {choice!r}: expected top:K or bottom:K with 1 <= K <= {count}, "
                      "or a comma-separated list of layer numbers")
