"""``TrainConfig``: the knobs of the training loop, validated, named like PyTorch's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from adapterkit.errors import UserError

SchedulerName = Literal["linear", "cosine", "constant"]
SCHEDULERS = ("linear", "cosine", "constant")


class TrainConfigError(UserError, ValueError):
    """A ``TrainConfig`` field holds a value the loop cannot use."""


@dataclass
class TrainConfig:
    """How to train. Defaults suit LoRA on a small encoder on a CPU.

    Attributes:
        output_dir: the run folder (checkpoints, metrics, plots, ``adapter/``);
            ``None`` trains in memory and writes nothing.
        epochs: passes over the training data (ignored when ``max_steps`` is set).
        max_steps: optimizer steps to run; overrides ``epochs``.
        batch_size: examples per forward pass.
        grad_accum_steps: forward passes per optimizer step.
        lr: peak learning rate of the adapter parameters.
        head_lr: peak learning rate of the task head (``None``: same as ``lr``).
        weight_decay: AdamW decoupled weight decay.
        scheduler: ``"linear"`` or ``"cosine"`` decay after warmup, or ``"constant"``.
        warmup_ratio: fraction of the steps spent warming up linearly from 0.
        warmup_steps: warmup length in steps; overrides ``warmup_ratio``.
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        max_length: longest tokenized input; longer ones are truncated.
        packing: pack several short training examples into each row of up to
            ``max_length`` tokens, without attention across them (tasks that
            support it: ``causal-lm``).
        eval_every: evaluate (and checkpoint) every N optimizer steps; ``None``:
            once per epoch. The run always evaluates at the end.
        eval_batch_size: examples per forward pass when evaluating.
        metric: the evaluation metric that picks the best checkpoint (default:
            the task's, e.g. accuracy); ``loss``/``perplexity`` are minimised.
        early_stopping_patience: stop after this many evaluations without
            improvement (``None``: never stop early).
        load_best: end with the best checkpoint's weights rather than the last.
        seed: seeds Python, numpy and torch, and the data order.
        group_by_length: batch examples of similar length (less padding).
        bf16: run forward passes under bfloat16 autocast on the CPU.
        num_threads: torch intra-op threads (``None``: the CPU cores available).
        log_every: log the training loss every N optimizer steps.
        progress: show a progress bar.
        resume: continue from the run folder's last checkpoint.
    """

    output_dir: str | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.01
    scheduler: SchedulerName = "linear"
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None
    max_grad_norm: float | None = 1.0
    max_length: int = 128
    packing: bool = False
    eval_every: int | None = None
    eval_batch_size: int = 64
    metric: str | None = None
    early_stopping_patience: int | None = None
    load_best: bool = True
    seed: int = 42
    group_by_length: bool = True
    bf16: bool = False
    num_threads: int | None = None
    log_every: int = 10
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        positive = ["epochs", "batch_size", "grad_accum_steps", "max_length",
                    "eval_batch_size", "log_every"]
        for name in positive + ["max_steps", "eval_every", "early_stopping_patience", "num_threads"]:
            value = getattr(self, name)
            if value is None and name not in positive:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.scheduler not in SCHEDULERS:
            raise TrainConfigError(f"TrainConfig.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise TrainConfigError(f"TrainConfig.{name} must be a positive number, got {value!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainConfigError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise TrainConfigError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise TrainConfigError(f"TrainConfig.max_grad_norm must be positive, got {self.max_grad_norm!r}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.resume and self.output_dir is None:
            raise TrainConfigError("TrainConfig.resume needs output_dir: the run folder to resume from")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from plain data, rejecting unknown keys with the known ones listed."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
