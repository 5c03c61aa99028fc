"""``train``: the training loop, readable top to bottom.

Order of events per optimizer step: ``grad_accum_steps`` micro-batches
forward/backward, clip, AdamW step, schedule step; then, when due, log,
evaluate, keep the best weights, checkpoint, and maybe stop early.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.examples import TaskData
from adapterkit.evaluate.plots import plot_confusion_matrix
from adapterkit.evaluate.runner import autocast, cpu_has_native_bf16, run_inference
from adapterkit.tasks import LOWER_IS_BETTER, Task, get_task
from adapterkit.train.checkpoint import (
    LoopState,
    find_checkpoint,
    load_checkpoint,
    load_trainable_state,
    rng_state,
    save_checkpoint,
    trainable_state,
    write_atomically,
)
from adapterkit.train.config import TrainConfig
from adapterkit.train.optim import build_optimizer, build_scheduler, trainable_parameters
from adapterkit.train.plots import plot_training_curve
from adapterkit.train.records import MetricsLog, scalar_metrics
from adapterkit.train.result import NonFiniteLossError, TrainResult, save_run_adapter
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
        raise KeyError(f"metric {metric!r} is not one of {sorted(scalar_metrics(metrics))}")
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


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: TaskData,
    eval_data: TaskData | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train the model's trainable parameters (its active adapter and head) on ``train_data``.

    Evaluates on ``eval_data`` every ``config.eval_every`` steps and at the
    end, keeps the best weights by ``config.metric``, and with
    ``config.output_dir`` writes checkpoints, ``metrics.jsonl``, TensorBoard
    events, ``training_curve.png`` and the adapter (``adapter/``).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the last good
            checkpoint is left as it was.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    set_threads(config.num_threads)
    seed_everything(config.seed)
    task = get_task(train_data.task)
    metric = config.metric or task.default_metric
    run_dir = Path(config.output_dir) if config.output_dir else None
    checkpoints = run_dir / "checkpoints" if run_dir else None
    if eval_data is not None:
        eval_data = task.relabel(eval_data, train_data.labels)
    if config.bf16 and not cpu_has_native_bf16():
        warnings.warn("bf16: this CPU has no native bfloat16 instructions (avx512_bf16/amx_bf16); "
                      "autocast still works but is emulated and usually slower than float32", stacklevel=2)

    # Tokenize once; batches are padded per batch (dynamic padding).
    features = task.encode(train_data, tokenizer, config.max_length)
    if config.packing:  # several short examples per row, attention kept within each
        features = task.pack(features, config.max_length)
    eval_features = task.encode(eval_data, tokenizer, config.max_length) if eval_data is not None else None
    lengths = [task.length(f) for f in features]
    batches_per_epoch = math.ceil(len(features) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch

    params = trainable_parameters(model)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    # Settings a resumed run must share with the interrupted one.
    fingerprint = {"examples": len(features), "batch_size": config.batch_size, "seed": config.seed,
                   "grad_accum_steps": config.grad_accum_steps, "total_steps": total_steps,
                   "group_by_length": config.group_by_length, "trainable": sorted(params)}

    state = LoopState()
    best_weights: dict[str, torch.Tensor] | None = None
    best_metrics: dict | None = None
    if config.resume:
        found = find_checkpoint(checkpoints / "last")
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {checkpoints}; start without --resume")
        state = load_checkpoint(found, model, optimizer, scheduler, fingerprint)
        if find_checkpoint(checkpoints / "best"):
            best_weights = load_file(str(checkpoints / "best" / "trainable.safetensors"))
            best_metrics = json.loads((checkpoints / "best" / "metrics.json").read_text())
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    log = MetricsLog(run_dir, resume_step=state.step if config.resume else None)
    bar = tqdm(total=total_steps, initial=state.step, disable=not config.progress, unit="step",
               dynamic_ncols=True, desc="train")
    window = {"loss": 0.0, "examples": 0, "tokens": 0, "since": time.perf_counter()}

    model.train()
    try:
        while state.step < total_steps and not state.stopped_early:
            batches = epoch_batches(lengths, config.batch_size, config.seed, state.epoch,
                                    config.group_by_length)
            while state.batch_in_epoch < len(batches) and state.step < total_steps:
                # One optimizer step over up to grad_accum_steps micro-batches;
                # each micro-batch loss is a mean, weighted by its share of examples.
                group = batches[state.batch_in_epoch : state.batch_in_epoch + config.grad_accum_steps]
                group_size = sum(len(b) for b in group)
                for indices in group:
                    batch = task.collate([features[i] for i in indices], tokenizer)
                    with autocast(config.bf16):
                        loss = task.loss(model, batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError.at(loss.item(), state, checkpoints)
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
                bar.update(1)

                if state.step % config.log_every == 0 or state.step == total_steps:
                    seconds = max(time.perf_counter() - window["since"], 1e-9)
                    train_loss = window["loss"] / max(window["examples"], 1)
                    speed = window["examples"] / seconds
                    log.log("train", state.step, {"loss": train_loss, "lr": scheduler.get_last_lr()[0],
                                                  "epoch": state.epoch + state.batch_in_epoch / len(batches),
                                                  "examples_per_s": speed,
                                                  "tokens_per_s": window["tokens"] / seconds})
                    bar.set_postfix(loss=f"{train_loss:.4f}", ex_s=f"{speed:.1f}")
                    window = {"loss": 0.0, "examples": 0, "tokens": 0, "since": time.perf_counter()}

                if state.step % eval_every == 0 or state.step == total_steps:
                    # RNG state as of the end of this step: evaluation draws no
                    # random numbers, but the checkpoint must not depend on that.
                    rng = rng_state()
                    if eval_data is not None:
                        metrics = _evaluate(model, tokenizer, task, eval_data, eval_features, config)
                        log.log("eval", state.step, metrics)
                        if _track_best(state, metrics, metric, config.early_stopping_patience):
                            best_weights, best_metrics = trainable_state(model), metrics
                            if checkpoints:
                                write_atomically(checkpoints / "best", {
                                    "trainable.safetensors": best_weights, "metrics.json": metrics,
                                    "state.json": {"step": state.step}})
                        if config.progress:
                            bar.write(f"step {state.step}: eval {metric} {metrics[metric]:.4f} "
                                      f"(best {state.best_metric:.4f} at step {state.best_step})")
                    if checkpoints:
                        save_checkpoint(checkpoints / "last", model, optimizer, scheduler, state, rng, fingerprint)
                    if state.stopped_early:
                        if config.progress:
                            bar.write(f"early stop: no better eval {metric} for "
                                      f"{state.evals_without_improvement} evaluations")
                        break
            if state.batch_in_epoch >= len(batches):
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        bar.close()
        log.close()

    if config.load_best and best_weights is not None:
        load_trainable_state(model, best_weights, "best checkpoint")
    result = TrainResult(
        step=state.step,
        epochs=state.epoch + state.batch_in_epoch / batches_per_epoch,
        metrics=best_metrics if (config.load_best and best_metrics) else
        (state.history[-1] if state.history else {}),
        best_metric=state.best_metric,
        best_step=state.best_step,
        metric=metric,
        history=state.history,
        stopped_early=state.stopped_early,
        wall_time_s=time.perf_counter() - started,
        output_dir=str(run_dir) if run_dir else None,
    )
    if run_dir:
        plot_training_curve(log.records, metric, run_dir / "training_curve.png")
        if result.metrics.get("confusion_matrix"):  # of the final weights on the evaluation data
            plot_confusion_matrix(result.metrics["confusion_matrix"], result.metrics["labels"],
                                  run_dir / "confusion_matrix.png")
        result.adapter_dir = save_run_adapter(model, run_dir / "adapter", train_data, config, result)
    return result
