"""``train``: the training loop, readable top to bottom.

Order of events per optimizer step: ``grad_accum_steps`` micro-batches
forward/backward, clip, AdamW step, schedule step; then, when due, log,
evaluate, keep the best weights, checkpoint, and maybe stop early.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.examples import TaskData
from adapterkit.errors import ResumeError, UnknownNameError
from adapterkit.evaluate.plots import plot_confusion_matrix
from adapterkit.evaluate.runner import autocast, cpu_has_native_bf16, run_inference
from adapterkit.tasks import LOWER_IS_BETTER, Task, get_task
from adapterkit.tasks.lengths import report_truncation
from adapterkit.train.checkpoint import (
    STATE_FILE,
    WEIGHTS_FILE,
    LoopState,
    find_checkpoint,
    load_checkpoint,
    load_trainable_state,
    read_best,
    rng_state,
    save_checkpoint,
    trainable_state,
    write_atomically,
    write_text_atomically,
)
from adapterkit.train.config import TrainConfig, resolve_defaults
from adapterkit.train.fingerprint import run_fingerprint
from adapterkit.train.optim import (
    build_optimizer,
    build_scheduler,
    trainable_parameters,
)
from adapterkit.train.plots import plot_training_curve
from adapterkit.train.records import MetricsLog, scalar_metrics
from adapterkit.train.result import NonFiniteLossError, TrainResult, save_run_adapter
from adapterkit.train.run_folder import RunFolder
from adapterkit.train.sampler import epoch_batches


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(num_threads: int | None) -> int:
    """Use ``num_threads`` torch threads; by default one per core this process may use.

    On a machine already busier than its cores (1-minute load average above
    the core count) the default is one thread: threads that wait on each
    other while other processes hold the cores make each step many times slower.
    """
    if num_threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores
        num_threads = 1 if busy else min(torch.get_num_threads(), cores)
    torch.set_num_threads(num_threads)
    return num_threads


def _evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, data: TaskData,
              features: list, config: TrainConfig) -> dict:
    """The task's metrics on the evaluation data (features already tokenized)."""
    predictions, outputs = run_inference(model, tokenizer, task, data, config.max_length,
                                         config.eval_batch_size, features, config.bf16)
    return task.score(data, predictions, outputs)


def _track_best(state: LoopState, metrics: dict, metric: str, patience: int | None) -> bool:
    """Record an evaluation; True when it is the best so far. Sets ``stopped_early``."""
    if metric not in metrics:
        raise UnknownNameError(f"metric {metric!r} is not one of {sorted(scalar_metrics(metrics))}")
    state.history.append({"step": state.step, **scalar_metrics(metrics)})
    value = float(metrics[metric])
    best = state.best_metric
    if best is None or (value < best if metric in LOWER_IS_BETTER else value > best):
        state.best_metric, state.best_step = value, state.step
        state.evals_without_improvement = 0
        return True
    state.evals_without_improvement += 1
    state.stopped_early = patience is not None and state.evals_without_improvement >= patience
    return False


@dataclass
class _Prepared:
    """Everything the loop needs that follows from the data and the config (step 1: prepare)."""

    task: Task
    metric: str
    features: list
    eval_features: list | None
    lengths: list[int]
    batches_per_epoch: int
    total_steps: int
    eval_every: int


def _prepare(tokenizer: PreTrainedTokenizerBase, task: Task, train_data: TaskData,
             eval_data: TaskData | None, config: TrainConfig) -> _Prepared:
    """Tokenize once (batches are padded per batch later) and work out the step counts.

    Says first what truncation at ``max_length`` cuts from the training and
    validation data, if anything.
    """
    options = task.encode_options(config)
    for name, data in (("training data", train_data), ("validation data", eval_data)):
        if data is not None:
            report_truncation(task.truncation(data, tokenizer, config.max_length, **options),
                              f"{name} {data.source}", task.scored_units, show=config.progress)
    features = task.encode(train_data, tokenizer, config.max_length, **options)
    if config.packing:  # several short examples per row, attention kept within each
        features = task.pack(features, config.max_length)
    eval_features = (task.encode(eval_data, tokenizer, config.max_length, **options)
                     if eval_data is not None else None)
    batches_per_epoch = math.ceil(len(features) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
    return _Prepared(task=task, metric=config.metric or task.default_metric, features=features,
                     eval_features=eval_features, lengths=[task.length(f) for f in features],
                     batches_per_epoch=batches_per_epoch,
                     total_steps=config.max_steps or steps_per_epoch * config.epochs,
                     eval_every=config.eval_every or steps_per_epoch)


@dataclass
class _Restored:
    """Where the loop starts (step 2: restore)."""

    state: LoopState
    best_weights: dict[str, torch.Tensor] | None = None
    best_metrics: dict | None = None


def _restore(folder: RunFolder, model: PreTrainedModel, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, fingerprint: dict) -> _Restored:
    """The last checkpoint's weights, optimizer, schedule, RNGs and best so far.

    A run folder whose run wrote no complete checkpoint yet (killed early, or
    during its first save) starts from the beginning, which is exactly where
    its run was.
    """
    checkpoints = folder.path / "checkpoints"
    found = find_checkpoint(checkpoints / "last")
    if found is None:  # killed before its first checkpoint was complete
        warnings.warn(f"--resume: {folder.path} has no complete checkpoint yet; the run starts from step 0",
                      stacklevel=3)
        return _Restored(LoopState())
    restored = _Restored(load_checkpoint(found, model, optimizer, scheduler, fingerprint))
    best = read_best(found)
    if best is not None:
        restored.best_weights, restored.best_metrics = best
    return restored


def _optimizer_step(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prepared: _Prepared,
                    group: list[list[int]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, params: dict, config: TrainConfig,
                    state: LoopState, folder: RunFolder | None, window: dict) -> None:
    """One optimizer step over ``group`` (up to ``grad_accum_steps`` micro-batches; step 3).

    Each micro-batch loss is a mean, weighted by its share of the group's examples.
    """
    task, features = prepared.task, prepared.features
    group_size = sum(len(b) for b in group)
    for indices in group:
        batch = task.collate([features[i] for i in indices], tokenizer)
        with autocast(config.bf16):
            loss = task.loss(model, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError.at(loss.item(), state, folder)
        (loss * (len(indices) / group_size)).backward()
        window["loss"] += loss.item() * len(indices)
        window["examples"] += len(indices)
        window["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.batch_in_epoch += len(group)


def _evaluate_and_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                             prepared: _Prepared, eval_data: TaskData | None, config: TrainConfig,
                             state: LoopState, restored: _Restored, optimizer: torch.optim.Optimizer,
                             scheduler: torch.optim.lr_scheduler.LRScheduler, fingerprint: dict,
                             folder: RunFolder | None, log: MetricsLog, bar: tqdm) -> None:
    """Evaluate, keep the best weights, write the checkpoints (step 4)."""
    # RNG state as of the end of this step: evaluation draws no random
    # numbers, but the checkpoint must not depend on that.
    rng = rng_state()
    checkpoints = folder.path / "checkpoints" if folder else None
    metric = prepared.metric
    if eval_data is not None:
        metrics = _evaluate(model, tokenizer, prepared.task, eval_data, prepared.eval_features, config)
        log.log("eval", state.step, metrics)
        if _track_best(state, metrics, metric, config.early_stopping_patience):
            restored.best_weights, restored.best_metrics = trainable_state(model), metrics
            if checkpoints:
                write_atomically(checkpoints / "best", {
                    WEIGHTS_FILE: restored.best_weights, "metrics.json": metrics,
                    STATE_FILE: {"step": state.step}})
        if config.progress:
            bar.write(f"step {state.step}: eval {metric} {metrics[metric]:.4f} "
                      f"(best {state.best_metric:.4f} at step {state.best_step})")
    if folder:
        best = (restored.best_weights, restored.best_metrics) if restored.best_weights is not None else None
        save_checkpoint(checkpoints / "last", model, optimizer, scheduler, state, rng, fingerprint, best)
        folder.commit()  # an --overwrite run replaces the earlier one from its first checkpoint on
        log.relocate(folder.path)
    if state.stopped_early and config.progress:
        bar.write(f"early stop: no better eval {metric} for {state.evals_without_improvement} evaluations")


def _log_window(log: MetricsLog, bar: tqdm, state: LoopState, scheduler, window: dict,
                batches_in_epoch: int) -> dict:
    """Log the training loss and speed since the last log; returns a fresh window."""
    seconds = max(time.perf_counter() - window["since"], 1e-9)
    train_loss = window["loss"] / max(window["examples"], 1)
    speed = window["examples"] / seconds
    log.log("train", state.step, {"loss": train_loss, "lr": scheduler.get_last_lr()[0],
                                  "epoch": state.epoch + state.batch_in_epoch / batches_in_epoch,
                                  "examples_per_s": speed, "tokens_per_s": window["tokens"] / seconds})
    bar.set_postfix(loss=f"{train_loss:.4f}", ex_s=f"{speed:.1f}")
    return _new_window()


def _new_window() -> dict:
    return {"loss": 0.0, "examples": 0, "tokens": 0, "since": time.perf_counter()}


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

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the last good
            checkpoint is left as it was.
        RunFolderError / ResumeError: the folder cannot be used as asked.
    """
    started = time.perf_counter()
    task = get_task(train_data.task)
    config = resolve_train_config(model, tokenizer, train_data, config or TrainConfig())
    if run_folder is None and config.output_dir:
        run_folder = RunFolder.prepare(config.output_dir, resume=config.resume, overwrite=config.overwrite)
    set_threads(config.num_threads)
    seed_everything(config.seed)
    if eval_data is not None:
        eval_data = task.relabel(eval_data, train_data.labels)
    if config.bf16 and not cpu_has_native_bf16():
        warnings.warn("bf16: this CPU has no native bfloat16 instructions (avx512_bf16/amx_bf16); "
                      "autocast still works but is emulated and usually slower than float32", stacklevel=2)
    try:
        return _train(model, tokenizer, task, train_data, eval_data, config, run_folder, started)
    except BaseException:
        if run_folder is not None:
            run_folder.discard()  # a staged --overwrite run that never checkpointed; the earlier run stays
        raise


def _train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, train_data: TaskData,
           eval_data: TaskData | None, config: TrainConfig, folder: RunFolder | None,
           started: float) -> TrainResult:
    """The loop itself: prepare, restore, then steps with evaluations and checkpoints."""
    prepared = _prepare(tokenizer, task, train_data, eval_data, config)
    params = trainable_parameters(model)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, prepared.total_steps)
    fingerprint = run_fingerprint(model, task.name, config, prepared.features, prepared.eval_features)
    restored = (_restore(folder, model, optimizer, scheduler, fingerprint) if folder and folder.resume
                else _Restored(LoopState()))
    state = restored.state
    if folder:
        write_text_atomically(folder.path / "train_config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    log = MetricsLog(folder.path if folder else None, resume_step=state.step if folder and folder.resume else None)
    bar = tqdm(total=prepared.total_steps, initial=state.step, disable=not config.progress, unit="step",
               dynamic_ncols=True, desc="train")
    window = _new_window()

    model.train()
    try:
        while state.step < prepared.total_steps and not state.stopped_early:
            batches = epoch_batches(prepared.lengths, config.batch_size, config.seed, state.epoch,
                                    config.group_by_length)
            while state.batch_in_epoch < len(batches) and state.step < prepared.total_steps:
                group = batches[state.batch_in_epoch : state.batch_in_epoch + config.grad_accum_steps]
                _optimizer_step(model, tokenizer, prepared, group, optimizer, scheduler, params, config,
                                state, folder, window)
                bar.update(1)
                if state.step % config.log_every == 0 or state.step == prepared.total_steps:
                    window = _log_window(log, bar, state, scheduler, window, len(batches))
                if state.step % prepared.eval_every == 0 or state.step == prepared.total_steps:
                    _evaluate_and_checkpoint(model, tokenizer, prepared, eval_data, config, state, restored,
                                             optimizer, scheduler, fingerprint, folder, log, bar)
                    if state.stopped_early:
                        break
            if state.batch_in_epoch >= len(batches):
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        bar.close()
        log.close()
    return _finish(model, train_data, config, prepared, state, restored, folder, log, started)


def _finish(model: PreTrainedModel, train_data: TaskData, config: TrainConfig, prepared: _Prepared,
            state: LoopState, restored: _Restored, folder: RunFolder | None, log: MetricsLog,
            started: float) -> TrainResult:
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
        output_dir=str(folder.final) if folder else None,
    )
    if folder:
        folder.commit()
        run_dir = folder.path
        plot_training_curve(log.records, prepared.metric, run_dir / "training_curve.png")
        if result.metrics.get("confusion_matrix"):  # of the final weights on the evaluation data
            plot_confusion_matrix(result.metrics["confusion_matrix"], result.metrics["labels"],
                                  run_dir / "confusion_matrix.png")
        result.adapter_dir = save_run_adapter(model, run_dir / "adapter", train_data, config, result)
    return result
