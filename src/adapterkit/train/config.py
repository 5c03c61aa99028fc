"""``TrainConfig``: the knobs of the training loop, validated, named like PyTorch's.

These are the only training defaults in adapterkit: ``ak.train`` and
``adapterkit train`` both start from them. Two are left to the run's parts:
``lr=None`` takes the adapter method's own ``default_lr`` and
``max_length=None`` the task's default length for the data and model
(``Task.default_lengths``; :func:`resolve_defaults`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from adapterkit.errors import UserError
from adapterkit.runtime.allocator import CPU_ALLOCATOR_CHOICES
from adapterkit.runtime.cpu_matmul import CPU_MATMUL_CHOICES
from adapterkit.runtime.device import DEVICE_CHOICES
from adapterkit.runtime.precision import PRECISION_CHOICES
from adapterkit.runtime.runtime import STRATEGY_CHOICES

SchedulerName = Literal["linear", "cosine", "constant"]
SCHEDULERS = ("linear", "cosine", "constant")


class TrainConfigError(UserError, ValueError):
    """A ``TrainConfig`` field holds a value the loop cannot use."""


def _label(name: str) -> str:
    """How a field is named in messages: the Python field, its flag and its YAML key."""
    return f"TrainConfig.{name} (--{name.replace('_', '-')}, or train.{name} in a --config file)"


# Integer fields where None means "not set" (see the attribute docs).
_OPTIONAL = frozenset({"max_length", "max_target_length", "max_steps", "eval_every", "early_stopping_patience",
                       "num_threads"})


def _check_number(name: str, value: Any, *, low: float, high: float | None = None,
                  low_ok: bool = False, optional: bool = False) -> None:
    """Refuse a field that is not a finite number in its range (NaN and infinity included)."""
    if value is None and optional:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= low if low_ok else value > low) and (high is None or value < high))
    if not ok:
        bounds = f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise TrainConfigError(f"{_label(name)} must be a finite number {bounds}, got {value!r}")


@dataclass
class TrainConfig:
    """How to train. Defaults suit an adapter on a small encoder on a CPU.

    Attributes:
        output_dir: the run folder (checkpoints, metrics, plots, ``adapter/``);
            ``None`` trains in memory and writes nothing.
        epochs: passes over the training data (ignored when ``max_steps`` is set).
        max_steps: optimizer steps to run; overrides ``epochs``.
        batch_size: examples per forward pass.
        grad_accum_steps: forward passes per optimizer step.
        lr: peak learning rate of the adapter parameters (``None``: the method's
            ``default_lr``, e.g. 1e-3 for LoRA, 3e-2 for prompt tuning).
        head_lr: peak learning rate of the task head (``None``: same as ``lr``).
        weight_decay: AdamW decoupled weight decay.
        scheduler: ``"linear"`` or ``"cosine"`` decay after warmup, or ``"constant"``.
        warmup_ratio: fraction of the steps spent warming up linearly from 0.
        warmup_steps: warmup length in steps; overrides ``warmup_ratio``.
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        max_length: longest tokenized input; longer ones are truncated, or
            windowed by tasks that window (NER, QA) (``None``: the task's
            default, see ``tasks/lengths.py``).
        max_target_length: seq2seq: longest target in tokens (``None``: the
            task's default, from the data).
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
        device: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``,
            ``cuda:N`` or ``mps``; under ``torchrun`` each process takes the
            GPU of its local rank.
        precision: ``fp32`` (the default: see ``runtime/precision.py`` for
            the measurement that kept it); ``bf16`` or ``fp16`` autocast of
            the forward (fp16 with a gradient scaler); ``auto``: bf16 where the
            hardware runs it natively, else fp32.
        adapter_layers: ``"top:K"`` places the trained adapters in the top K
            blocks only (``"bottom:K"`` or ``"3,4,5"`` also work): their weights
            in the other blocks are removed before training and the adapter's
            config records the blocks (``layers``, PEFT's
            ``layers_to_transform``). Below the lowest adapted block nothing
            needs a gradient, so the backward stops there.
        cache_frozen_prefix: with adapters only above the first blocks
            (``adapter_layers="top:K"``), keep each training example's input to
            the lowest adapted block after its first pass and start later
            passes there (``train/prefix_cache.py``); the blocks below run
            without dropout.
        prefix_cache_mb: the most memory that cache may hold; examples beyond
            it are recomputed.
        compile: run the training forward through ``torch.compile`` (dynamic
            shapes, so length-grouped batches do not recompile; the adapters'
            plan is read outside the graph). The first steps pay the compilation.
        trim_last_block: a BERT-family sequence classifier reads only the first
            position of the last block, so that block runs past its attention
            at position 0 only (``tasks/head_reads.py``): the same logits up to
            rounding, and 0.84-0.91x the time per step on MiniLM. ``False``
            computes every position, as the model itself does. Other models
            and tasks are not affected.
        hashed_dropout: every ``nn.Dropout`` of the model draws its mask from a
            counter hash seeded by PyTorch's generator instead of
            ``bernoulli_`` (``runtime/hashed_dropout.py``): the same
            distribution, 4x cheaper dropout, 0.91-0.96x the time per MiniLM
            step. Reproducible from the seed, through resumes and gradient
            checkpointing. ``False`` keeps PyTorch's masks; ``compile`` runs
            keep them too (the compiled graph draws its own).
        cpu_matmul: which library multiplies the frozen base's float32 linear
            layers on the CPU: ``auto`` (oneDNN on AMD CPUs, where MKL, PyTorch's
            own, runs a generic path at less than half oneDNN's rate; MKL on
            Intel's), ``onednn`` or ``default`` (PyTorch's own). Only rounding
            differs (``runtime/cpu_matmul.py``); 0.66-0.77x the time per MiniLM
            step on an AMD EPYC. Trainable layers, autocast and ``compile``
            keep PyTorch's path.
        gradient_checkpointing: recompute each block's activations in the
            backward instead of keeping them (less memory, ~30% more time);
            works with every method.
        cpu_allocator: ``default``, or ``lean``: glibc hands every freed block
            of 1 MiB or more back to the system at once, so a CPU run's
            resident memory follows its live tensors (0.5-0.8x the peak in
            ``docs/benchmarks.md`` section 6, for 1.15-1.3x the time per step;
            process-wide from then on; ``runtime/allocator.py``).
        strategy: ``auto`` (DDP under ``torchrun`` with several processes,
            else one process), ``none``, ``ddp``, or ``fsdp`` (FSDP2: the
            frozen base sharded per transformer block).
        num_threads: torch intra-op threads (``None``: leave torch's setting;
            the CLI sets one per core it may use).
        log_every: log the training loss every N optimizer steps.
        progress: show a progress bar.
        resume: continue from the run folder's last checkpoint.
        overwrite: replace a run already in ``output_dir``; the earlier run is
            kept until the new one has written its first checkpoint.
    """

    output_dir: str | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.01
    scheduler: SchedulerName = "linear"
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None
    max_grad_norm: float | None = 1.0
    max_length: int | None = None
    max_target_length: int | None = None
    packing: bool = False
    eval_every: int | None = None
    eval_batch_size: int = 64
    metric: str | None = None
    early_stopping_patience: int | None = None
    load_best: bool = True
    seed: int = 42
    group_by_length: bool = True
    device: str = "auto"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    cpu_allocator: str = "default"
    adapter_layers: str | None = None
    cache_frozen_prefix: bool = False
    prefix_cache_mb: int = 2048
    compile: bool = False
    trim_last_block: bool = True
    hashed_dropout: bool = True
    cpu_matmul: str = "auto"
    strategy: str = "auto"
    num_threads: int | None = None
    log_every: int = 10
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum_steps", "eval_batch_size", "log_every", "prefix_cache_mb",
                     *sorted(_OPTIONAL)):
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainConfigError(f"{_label(name)} must be a positive integer, got {value!r}")
        if self.scheduler not in SCHEDULERS:
            raise TrainConfigError(f"{_label('scheduler')} must be one of {SCHEDULERS}, got {self.scheduler!r}")
        _check_number("lr", self.lr, low=0.0, optional=True)
        _check_number("head_lr", self.head_lr, low=0.0, optional=True)
        _check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, low_ok=True)
        _check_number("max_grad_norm", self.max_grad_norm, low=0.0, optional=True)
        _check_number("weight_decay", self.weight_decay, low=0.0, low_ok=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise TrainConfigError(f"{_label('seed')} must be an integer from 0 to 2**32 - 1, got {self.seed!r}")
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool)
                                              or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise TrainConfigError(f"{_label('warmup_steps')} must be an integer >= 0, got {self.warmup_steps!r}")
        for name, choices in (("precision", PRECISION_CHOICES), ("strategy", STRATEGY_CHOICES),
                              ("cpu_allocator", CPU_ALLOCATOR_CHOICES), ("cpu_matmul", CPU_MATMUL_CHOICES)):
            if getattr(self, name) not in choices:
                raise TrainConfigError(f"{_label(name)} must be one of {list(choices)}, got {getattr(self, name)!r}")
        kind = self.device.split(":")[0] if isinstance(self.device, str) else None
        if kind not in DEVICE_CHOICES or (kind != self.device and (kind != "cuda" or not self.device[5:].isdigit())):
            raise TrainConfigError(f"{_label('device')} must be one of {list(DEVICE_CHOICES)} or cuda:N, "
                                   f"got {self.device!r}")
        if self.adapter_layers is not None and not isinstance(self.adapter_layers, str):
            raise TrainConfigError(f"{_label('adapter_layers')} must be a string such as 'top:4', "
                                   f"got {self.adapter_layers!r}")
        if self.resume and self.output_dir is None:
            raise TrainConfigError("TrainConfig.resume needs output_dir: the run folder to resume from")
        if self.resume and self.overwrite:
            raise TrainConfigError("TrainConfig.resume continues the run in output_dir and overwrite "
                                   "replaces it; set one")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from plain data, rejecting unknown keys with the known ones listed."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = legacy_options(data)
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def legacy_options(data: dict[str, Any]) -> dict[str, Any]:
    """Options as earlier versions wrote them, in today's names (``bf16: true`` is ``precision: bf16``)."""
    if "bf16" not in data:
        return data
    data = dict(data)
    bf16 = data.pop("bf16")
    data.setdefault("precision", "bf16" if bf16 else "fp32")
    return data


def resolve_defaults(config: TrainConfig, method_lr: float, task_lengths: dict[str, int]) -> TrainConfig:
    """``config`` with ``lr`` from the method and unset lengths from the task's defaults."""
    lengths = {k: v for k, v in task_lengths.items() if getattr(config, k) is None}
    return dataclasses.replace(config, lr=config.lr if config.lr is not None else method_lr, **lengths)
