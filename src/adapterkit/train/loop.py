"""``train``: the training loop, readable top to bottom, on any device and any number of processes.

Order of events per optimizer step: ``grad_accum_steps`` micro-batches
forward/backward (in each process; ``steps.py``), clip, AdamW step, schedule
step; then, when due, log, evaluate, keep the best weights, checkpoint, and
maybe stop early (``checkpointing.py``). Where it computes (device,
precision, rank, DDP or FSDP2) is one :class:`~adapterkit.runtime.Runtime`,
resolved once; only its main process writes files.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.core.lifecycle import active_adapters, place_in_layers
from adapterkit.data.examples import TaskData
from adapterkit.evaluate.plots import plot_confusion_matrix
from adapterkit.runtime.allocator import apply_cpu_allocator
from adapterkit.runtime.cpu_matmul import resolve_cpu_matmul, use_onednn_linear
from adapterkit.runtime.distributed import whole_parameters, wrap_model
from adapterkit.runtime.gated_mlp import use_fused_gated_mlp
from adapterkit.runtime.hashed_dropout import use_hashed_dropout
from adapterkit.runtime.precision import grad_scaler, native_bf16
from adapterkit.runtime.runtime import Runtime, resolve_runtime
from adapterkit.tasks import Task, get_task
from adapterkit.train.checkpoint import LoopState, load_trainable_state, write_text_atomically
from adapterkit.train.checkpointing import Restored, Trainer, evaluate_and_checkpoint, restore
from adapterkit.train.config import TrainConfig, TrainConfigError, resolve_defaults
from adapterkit.train.fingerprint import run_fingerprint
from adapterkit.train.memory import enable_gradient_checkpointing, peak_memory
from adapterkit.train.optim import build_optimizer, build_scheduler, trainable_parameters
from adapterkit.train.plots import plot_training_curve
from adapterkit.train.prefix_cache import PrefixCache
from adapterkit.train.records import MetricsLog
from adapterkit.train.result import TrainResult, save_run_adapter
from adapterkit.train.run_folder import RunFolder
from adapterkit.train.sampler import epoch_batches
from adapterkit.train.steps import Prepared, log_window, new_window, optimizer_step, prepare


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_train_config(model: nn.Module, tokenizer: PreTrainedTokenizerBase, train_data: TaskData,
                         config: TrainConfig) -> TrainConfig:
    """``config`` with the method's default learning rate and the task's default lengths
    (measured on ``train_data`` where the task measures) filled in."""
    from adapterkit.core import active_adapters, get_adapter_config, get_method

    names = active_adapters(model)
    method_lr = get_method(get_adapter_config(model, names[0])).default_lr if names else 1e-3
    task = get_task(train_data.task)
    needs_lengths = config.max_length is None or (
        config.max_target_length is None and "max_target_length" in task.encode_options(config))
    task_lengths = task.default_lengths(train_data, tokenizer, model) if needs_lengths else {}
    return resolve_defaults(config, method_lr, task_lengths)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: TaskData,
    eval_data: TaskData | None = None,
    config: TrainConfig | None = None,
    *,
    run_folder: RunFolder | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train the model's trainable parameters (its active adapter and head) on ``train_data``.

    Evaluates on ``eval_data`` every ``config.eval_every`` steps and at the
    end, keeps the best weights by ``config.metric``, and with
    ``config.output_dir`` writes checkpoints, ``metrics.jsonl``, TensorBoard
    events, ``training_curve.png`` and the adapter (``adapter/``).

    A folder that already holds a run is refused unless ``config.resume``
    (continue it; every setting that changes the result must be the same) or
    ``config.overwrite`` (replace it once the new run has its first checkpoint).
    ``run_folder``: a folder already prepared by the caller (``adapterkit train``).
    ``runtime``: where and how to compute; by default resolved from
    ``config.device``, ``config.precision`` and ``config.strategy`` (and, under
    ``torchrun``, its environment). The model is moved to the runtime's device.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the last good
            checkpoint is left as it was.
        RunFolderError / ResumeError: the folder cannot be used as asked.
    """
    started = time.perf_counter()
    task = get_task(train_data.task)
    config = resolve_train_config(model, tokenizer, train_data, config or TrainConfig())
    runtime = runtime or resolve_runtime(config.device, config.precision, config.strategy)
    if not runtime.is_main:
        run_folder = None  # only the main process writes
    elif run_folder is None and config.output_dir:
        run_folder = RunFolder.prepare(config.output_dir, resume=config.resume, overwrite=config.overwrite)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    if config.cpu_allocator != "default" and runtime.device.type == "cpu" and not apply_cpu_allocator(
            config.cpu_allocator):
        warnings.warn(f"cpu_allocator={config.cpu_allocator!r} needs glibc (Linux); this C library keeps its "
                      "own behaviour and the run goes on unchanged", stacklevel=2)
    _onednn_products(config, runtime)  # an impossible cpu_matmul is refused before any work
    seed_everything(config.seed + runtime.rank)  # each process its own dropout masks; one process as before
    if eval_data is not None:
        eval_data = task.relabel(eval_data, train_data.labels)
    if runtime.precision == "bf16" and not native_bf16(runtime.device):
        warnings.warn(f"bf16: {runtime.device} has no native bfloat16 instructions (a CPU needs avx512_bf16 or "
                      "amx_bf16); autocast still works but is emulated and usually slower than float32",
                      stacklevel=2)
    try:
        return _train(model, tokenizer, task, train_data, eval_data, config, run_folder, runtime, started)
    except BaseException:
        if run_folder is not None:
            run_folder.discard()  # a staged --overwrite run that never checkpointed; the earlier run stays
        raise


def _train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, train_data: TaskData,
           eval_data: TaskData | None, config: TrainConfig, folder: RunFolder | None, runtime: Runtime,
           started: float) -> TrainResult:
    """The loop itself: prepare, restore, then steps with evaluations and checkpoints."""
    prepared = prepare(tokenizer, task, train_data, eval_data, config, runtime)
    if config.adapter_layers is not None:
        for name in active_adapters(model):
            place_in_layers(model, name, config.adapter_layers)
    fingerprint = run_fingerprint(model, task.name, config, prepared.features, prepared.eval_features, runtime)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.cache_frozen_prefix:
        if runtime.strategy == "fsdp":
            raise TrainConfigError("cache_frozen_prefix and FSDP do not combine (the blocks are sharded); use DDP")
        prepared.prefix_cache = PrefixCache(model, config.prefix_cache_mb * 2**20)
    wrapped = wrap_model(model, runtime)  # FSDP2 turns the parameters into shards: the optimizer comes after
    if config.compile:
        if config.cache_frozen_prefix:
            raise TrainConfigError("compile and cache_frozen_prefix do not combine yet: the cache swaps the lower "
                                   "blocks' forward between batches, which would recompile; choose one")
        wrapped = torch.compile(wrapped, dynamic=True)  # forward calls only; the model itself stays as it is
    optimizer = build_optimizer(model, config)
    trainer = Trainer(model, optimizer, build_scheduler(optimizer, config, prepared.total_steps),
                      grad_scaler(runtime.precision, runtime.device), runtime, fingerprint)
    restored = restore(folder, trainer) if config.resume else Restored(LoopState())
    state = restored.state
    if folder:
        write_text_atomically(folder.path / "train_config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    log = MetricsLog(folder.path if folder else None, resume_step=state.step if folder and folder.resume else None)
    bar = tqdm(total=prepared.total_steps, initial=state.step, disable=not (config.progress and runtime.is_main),
               unit="step", dynamic_ncols=True, desc="train")
    if config.progress and runtime.is_main:
        bar.write(f"global batch {config.batch_size} x {config.grad_accum_steps} accumulation x "
                  f"{runtime.world_size} process(es) = "
                  f"{config.batch_size * prepared.micro_batches_per_step} examples per step; {runtime.describe()}")
    try:
        with contextlib.ExitStack() as scope:
            if config.trim_last_block:
                scope.enter_context(task.narrowed(model))
            if config.hashed_dropout and not config.compile:
                scope.enter_context(use_hashed_dropout(model))
            scope.enter_context(use_onednn_linear(model, _onednn_products(config, runtime)))
            if not config.compile:  # bit-identical results, one activation fewer per gated MLP
                scope.enter_context(use_fused_gated_mlp(model))
            _steps(model, wrapped, tokenizer, prepared, eval_data, config, state, restored, trainer, folder, log,
                   bar)
        # what the run cost, beside its metrics (not in the adapter's files, which stay reproducible)
        log.log("run", state.step, {"wall_time_s": time.perf_counter() - started, **peak_memory()})
    finally:
        bar.close()
        log.close()
        if prepared.prefix_cache is not None:
            prepared.prefix_cache.close()
    return _finish(model, train_data, config, prepared, state, restored, folder, log, runtime, started)


def _onednn_products(config: TrainConfig, runtime: Runtime) -> bool:
    """Whether the frozen float32 products go through oneDNN (``TrainConfig.cpu_matmul``, ``runtime/cpu_matmul.py``).

    Not under ``compile`` (the graph has its own kernels) nor FSDP (sharded weights).
    """
    wanted = resolve_cpu_matmul(config.cpu_matmul)
    return wanted and runtime.device.type == "cpu" and runtime.strategy != "fsdp" and not config.compile


def _steps(model: PreTrainedModel, wrapped: nn.Module, tokenizer: PreTrainedTokenizerBase, prepared: Prepared,
           eval_data: TaskData | None, config: TrainConfig, state: LoopState, restored: Restored,
           trainer: Trainer, folder: RunFolder | None, log: MetricsLog, bar: tqdm) -> None:
    """Optimizer steps until the last one (or an early stop), epoch by epoch, from ``state``."""
    params = trainable_parameters(model)
    window = new_window()
    wrapped.train()
    while state.step < prepared.total_steps and not state.stopped_early:
        epoch_started = time.perf_counter()
        batches = epoch_batches(prepared.lengths, config.batch_size, config.seed, state.epoch,
                                config.group_by_length)
        while state.batch_in_epoch < len(batches) and state.step < prepared.total_steps:
            group = batches[state.batch_in_epoch : state.batch_in_epoch + prepared.micro_batches_per_step]
            optimizer_step(wrapped, tokenizer, prepared, group, trainer.optimizer, trainer.scheduler, params,
                           config, state, folder, window, trainer.runtime, trainer.scaler)
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == prepared.total_steps:
                window = log_window(log, bar, state, trainer.scheduler, window, len(batches), trainer.runtime)
            if state.step % prepared.eval_every == 0 or state.step == prepared.total_steps:
                evaluate_and_checkpoint(tokenizer, prepared, eval_data, config, state, restored, trainer,
                                        folder, log, bar)
                if state.stopped_early:
                    return
        if state.batch_in_epoch >= len(batches):
            cache = prepared.prefix_cache
            log.log("epoch", state.step, {"epoch": state.epoch + 1, "wall_time_s": time.perf_counter() - epoch_started,
                                          **({"prefix_cache_mib": cache.bytes / 2**20, "prefix_cache_hits": cache.hits}
                                             if cache is not None else {})})
            state.epoch += 1
            state.batch_in_epoch = 0


def _finish(model: PreTrainedModel, train_data: TaskData, config: TrainConfig, prepared: Prepared,
            state: LoopState, restored: Restored, folder: RunFolder | None, log: MetricsLog,
            runtime: Runtime, started: float) -> TrainResult:
    """The result, with the best weights loaded back; the plots and the adapter in the run folder."""
    if config.load_best and restored.best_weights is not None:
        load_trainable_state(model, restored.best_weights, "best checkpoint")
    result = TrainResult(
        step=state.step,
        epochs=state.epoch + state.batch_in_epoch / prepared.batches_per_epoch,
        metrics=restored.best_metrics if (config.load_best and restored.best_metrics) else
        (state.history[-1] if state.history else {}),
        best_metric=state.best_metric,
        best_step=state.best_step,
        metric=prepared.metric,
        history=state.history,
        stopped_early=state.stopped_early,
        wall_time_s=time.perf_counter() - started,
        output_dir=str(folder.final) if folder else (config.output_dir if config.output_dir else None),
    )
    with whole_parameters(model):  # under FSDP every process gathers; the main one writes
        if folder:
            folder.commit()
            run_dir = folder.path
            plot_training_curve(log.records, prepared.metric, run_dir / "training_curve.png")
            if result.metrics.get("confusion_matrix"):  # of the final weights on the evaluation data
                plot_confusion_matrix(result.metrics["confusion_matrix"], result.metrics["labels"],
                                      run_dir / "confusion_matrix.png")
            result.adapter_dir = save_run_adapter(model, run_dir / "adapter", train_data, config, result)
    return result
