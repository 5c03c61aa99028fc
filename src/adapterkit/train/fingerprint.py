"""A run's fingerprint: every setting that changes what the run computes.

A resumed run must compute exactly what the interrupted one would have, so
``--resume`` compares the fingerprint saved in the checkpoint with the new
one and refuses any difference, listing each one as ``old -> new``.

What may change on resume (it changes when things are reported, not what is
trained): ``RESUMABLE_CHANGES``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from adapterkit.errors import ResumeError
from adapterkit.runtime.runtime import Runtime
from adapterkit.train.config import TrainConfig

# TrainConfig fields a resume may change: evaluation and logging frequency,
# evaluation batch size, threads, progress display, the folder flags, the
# device (a run may move to a GPU), gradient checkpointing (it recomputes
# the same activations), the CPU allocator's mode (it returns memory, the
# numbers stay) and the CPU's matmul library (the same products, rounded in
# another order, as with another thread count). The precision is recorded as resolved, with the world size,
# under "runtime".
RESUMABLE_CHANGES = frozenset({"output_dir", "eval_every", "eval_batch_size", "log_every", "progress",
                               "num_threads", "resume", "overwrite", "device", "gradient_checkpointing",
                               "precision", "cpu_allocator", "cpu_matmul"})


def features_hash(features: Sequence[dict[str, Any]]) -> str:
    """A short hash of tokenized features: the data, its order, the tokenizer and ``max_length`` all show."""
    digest = hashlib.sha256()
    for feature in features:
        digest.update(json.dumps(feature, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def run_fingerprint(model: nn.Module, task: str, config: TrainConfig, features: Sequence[dict[str, Any]],
                    eval_features: Sequence[dict[str, Any]] | None,
                    runtime: Runtime | None = None) -> dict[str, Any]:
    """Plain data naming everything the training loop's result depends on.

    ``runtime``: the resolved precision and the world size (which with the
    batch settings makes the global batch) are part of it.
    """
    runtime = runtime or Runtime()
    from adapterkit.core import active_adapters, get_adapter_config
    from adapterkit.core.fingerprint import model_summary

    fingerprint = {
        "base_model": model_summary(model),
        "task": task,
        "adapters": {name: get_adapter_config(model, name).to_dict() for name in active_adapters(model)},
        "train": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES},
        "data": {"examples": len(features), "hash": features_hash(features)},
        "eval_data": None if eval_features is None else {
            "examples": len(eval_features), "hash": features_hash(eval_features)},
        "trainable": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
        "runtime": {"precision": runtime.precision, "world_size": runtime.world_size},
    }
    return json.loads(json.dumps(fingerprint, default=str))  # as it reads back from state.json


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each setting that differs.

    An adapter whose method changed is reported as that one change, not as
    every option of both methods; so are added and removed adapters, and the
    trainable parameters (whose names follow from the adapters) are left out
    when the adapters already differ.
    """
    lines: list[str] = []
    old = _current_names(old)
    old_adapters, new_adapters = old.get("adapters") or {}, new.get("adapters") or {}
    for name in sorted(set(old_adapters) | set(new_adapters)):
        a, b = old_adapters.get(name), new_adapters.get(name)
        if a is None or b is None:
            lines.append(f"adapter {name!r}: {'none' if a is None else a.get('method')} -> "
                         f"{'none' if b is None else b.get('method')}")
        elif a.get("method") != b.get("method"):
            lines.append(f"adapter {name!r} method: {a.get('method')} -> {b.get('method')}")
        else:
            flat_a, flat_b = _flatten(a), _flatten(b)
            for key in sorted(set(flat_a) | set(flat_b)):
                if flat_a.get(key) != flat_b.get(key):
                    lines.append(f"adapter {name!r} {key}: {flat_a.get(key)!r} -> {flat_b.get(key)!r}")
    skip = {"adapters"} | ({"trainable"} if lines else set())
    flat_old = {k: v for k, v in _flatten({k: v for k, v in old.items() if k not in skip}).items()}
    flat_new = {k: v for k, v in _flatten({k: v for k, v in new.items() if k not in skip}).items()}
    for key in sorted(set(flat_old) | set(flat_new)):
        if flat_old.get(key, "(not recorded)") != flat_new.get(key, "(not recorded)"):
            lines.append(f"{key}: {flat_old.get(key, '(not recorded)')!r} -> {flat_new.get(key, '(not recorded)')!r}")
    return lines


# settings added later, with the value that computes what a run saved before them computed
_BEFORE_THEY_EXISTED = {"trim_last_block": False, "hashed_dropout": False}


def _current_names(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint saved by an earlier version, in today's names (``train.bf16`` became ``runtime.precision``)."""
    train = fingerprint.get("train")
    if isinstance(train, dict) and not _BEFORE_THEY_EXISTED.keys() <= train.keys():
        fingerprint = {**fingerprint, "train": {**_BEFORE_THEY_EXISTED, **train}}
        train = fingerprint["train"]
    if not isinstance(train, dict) or "bf16" not in train:
        return fingerprint
    train = dict(train)
    bf16 = train.pop("bf16")
    runtime = {"precision": "bf16" if bf16 else "fp32", "world_size": 1, **(fingerprint.get("runtime") or {})}
    return {**fingerprint, "train": train, "runtime": runtime}


def check_same_run(old: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Refuse a resume whose settings differ from the interrupted run's.

    Raises:
        ResumeError: listing every difference as ``old -> new``.
    """
    lines = differences(old, new)
    if lines:
        listing = "; ".join(lines)
        raise ResumeError(
            f"cannot resume the run in {where}: these settings differ from the interrupted run "
            f"(old -> new): {listing}. Resume with the run's own settings (its config.yaml), or start a "
            "new run (another --output, or --overwrite). Only evaluation and logging frequency, "
            "threads and progress may change on resume"
        )
