"""The loop's first and third steps: prepare the features, and one optimizer step.

One optimizer step consumes ``grad_accum_steps × world_size`` micro-batches
of the epoch's batch order (``sampler.epoch_batches``, the same in every
process); process ``r`` takes micro-batches ``r, r + world, ...`` of them.
Each micro-batch loss is weighted by its share of the step's examples, so a
run of N processes computes the gradient one process computes over the same
global batch. Length grouping and exact resume carry over unchanged: the
order is one function of (seed, epoch) and the position is one counter.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from adapterkit.data.examples import TaskData
from adapterkit.runtime.distributed import accumulating, sum_across
from adapterkit.runtime.runtime import Runtime
from adapterkit.tasks import Task
from adapterkit.tasks.lengths import report_truncation
from adapterkit.train.checkpoint import LoopState
from adapterkit.train.config import TrainConfig
from adapterkit.train.records import MetricsLog
from adapterkit.train.result import NonFiniteLossError
from adapterkit.train.run_folder import RunFolder


@dataclass
class Prepared:
    """Everything the loop needs that follows from the data, the config and the world size (step 1)."""

    task: Task
    metric: str
    features: list
    eval_features: list | None
    lengths: list[int]
    batches_per_epoch: int
    micro_batches_per_step: int  # grad_accum_steps × world_size
    total_steps: int
    eval_every: int
    prefix_cache: Any = None  # a train.prefix_cache.PrefixCache when cache_frozen_prefix is on


def prepare(tokenizer: PreTrainedTokenizerBase, task: Task, train_data: TaskData, eval_data: TaskData | None,
            config: TrainConfig, runtime: Runtime) -> Prepared:
    """Tokenize once (batches are padded per batch later) and work out the step counts.

    Says first what truncation at ``max_length`` cuts from the training and
    validation data, if anything (in the main process).
    """
    options = task.encode_options(config)
    for name, data in (("training data", train_data), ("validation data", eval_data)):
        if data is not None:
            report_truncation(task.truncation(data, tokenizer, config.max_length, **options),
                              f"{name} {data.source}", task.scored_units, show=config.progress and runtime.is_main)
    features = task.encode(train_data, tokenizer, config.max_length, **options)
    if config.packing:  # several short examples per row, attention kept within each
        features = task.pack(features, config.max_length)
    eval_features = (task.encode(eval_data, tokenizer, config.max_length, **options)
                     if eval_data is not None else None)
    batches_per_epoch = math.ceil(len(features) / config.batch_size)
    per_step = config.grad_accum_steps * runtime.world_size
    steps_per_epoch = math.ceil(batches_per_epoch / per_step)
    return Prepared(task=task, metric=config.metric or task.default_metric, features=features,
                    eval_features=eval_features, lengths=[task.length(f) for f in features],
                    batches_per_epoch=batches_per_epoch, micro_batches_per_step=per_step,
                    total_steps=config.max_steps or steps_per_epoch * config.epochs,
                    eval_every=config.eval_every or steps_per_epoch)


def optimizer_step(wrapped: nn.Module, tokenizer: PreTrainedTokenizerBase, prepared: Prepared,
                   group: list[list[int]], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, params: dict, config: TrainConfig,
                   state: LoopState, folder: RunFolder | None, window: dict, runtime: Runtime,
                   scaler: torch.amp.GradScaler | None) -> None:
    """One optimizer step over ``group``, this process's share of it (step 3).

    ``wrapped`` is what forward calls go to (the model, or its DDP wrapper).
    A process whose share is empty (the last step of an epoch) runs one
    micro-batch with weight 0, so the collectives of every process line up.
    """
    task, features = prepared.task, prepared.features
    group_size = sum(len(b) for b in group)
    mine = group[runtime.rank::runtime.world_size]
    # DDP and FSDP average gradients over processes: scale by the world size to get the global sum
    weights = [len(b) / group_size * runtime.world_size for b in mine]
    if not mine:
        mine, weights = [group[0]], [0.0]
    bad = 0.0
    for i, (indices, weight) in enumerate(zip(mine, weights)):
        batch = runtime.move(task.collate([features[j] for j in indices], tokenizer))
        cached = (prepared.prefix_cache.batch(indices, batch.get("attention_mask"))
                  if prepared.prefix_cache is not None else contextlib.nullcontext())
        with accumulating(wrapped, last=i == len(mine) - 1):
            with runtime.autocast(), cached:
                loss = task.loss(wrapped, batch)
            if not torch.isfinite(loss):
                if not runtime.distributed:  # alone, stop before the backward; with others, after it
                    raise NonFiniteLossError.at(loss.item(), state, folder)
                bad = loss.item()
            scaled = loss * weight
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if weight:
            window["loss"] += loss.item() * len(indices)
            window["examples"] += len(indices)
            window["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    if runtime.distributed and sum_across([float(bad != 0.0)], runtime)[0]:
        raise NonFiniteLossError.at(bad if bad else float("nan"), state, folder)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.batch_in_epoch += len(group)


def new_window() -> dict:
    """A fresh tally of training loss, examples and tokens since the last log."""
    return {"loss": 0.0, "examples": 0, "tokens": 0, "since": time.perf_counter()}


def log_window(log: MetricsLog, bar: tqdm, state: LoopState, scheduler: torch.optim.lr_scheduler.LRScheduler,
               window: dict, batches_in_epoch: int, runtime: Runtime) -> dict:
    """Log the training loss and speed since the last log, summed over processes; returns a fresh window."""
    seconds = max(time.perf_counter() - window["since"], 1e-9)
    loss, examples, tokens = sum_across([window["loss"], window["examples"], window["tokens"]], runtime)
    train_loss = loss / max(examples, 1)
    speed = examples / seconds
    log.log("train", state.step, {"loss": train_loss, "lr": scheduler.get_last_lr()[0],
                                  "epoch": state.epoch + state.batch_in_epoch / batches_in_epoch,
                                  "examples_per_s": speed, "tokens_per_s": tokens / seconds})
    bar.set_postfix(loss=f"{train_loss:.4f}", ex_s=f"{speed:.1f}")
    return new_window()
