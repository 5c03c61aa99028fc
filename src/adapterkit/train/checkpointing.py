"""The loop's second and fourth steps: restore a run, and evaluate-and-checkpoint.

In a run of several processes every process takes part (gathering FSDP
shards and evaluation outputs are collectives), but only the main one
writes; on resume the main process reads the checkpoint and sends it to
the others, so they need not see the run folder.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data.examples import TaskData
from adapterkit.errors import UnknownNameError
from adapterkit.runtime.distributed import (
    broadcast_object,
    full_optimizer_state,
    full_trainable_state,
    gather_objects,
    load_full_optimizer_state,
)
from adapterkit.runtime.inference import infer_outputs
from adapterkit.runtime.runtime import Runtime
from adapterkit.tasks import LOWER_IS_BETTER
from adapterkit.train.checkpoint import (
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointData,
    LoopState,
    find_checkpoint,
    load_trainable_state,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_atomically,
)
from adapterkit.train.config import TrainConfig
from adapterkit.train.records import MetricsLog, scalar_metrics
from adapterkit.train.run_folder import RunFolder
from adapterkit.train.steps import Prepared


@dataclass
class Restored:
    """Where the loop starts (step 2: restore)."""

    state: LoopState
    best_weights: dict[str, torch.Tensor] | None = None
    best_metrics: dict | None = None


@dataclass
class Trainer:
    """The objects one run trains with, handed to the checkpointing steps together."""

    model: PreTrainedModel  # the model itself (adapter bookkeeping, parameters by name)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    runtime: Runtime
    fingerprint: dict[str, Any]


def restore(folder: RunFolder | None, trainer: Trainer) -> Restored:
    """The last checkpoint's weights, optimizer, schedule, RNGs and best so far (every process).

    A run folder whose run wrote no complete checkpoint yet (killed early, or
    during its first save) starts from the beginning, which is exactly where
    its run was.
    """
    runtime = trainer.runtime
    data = None
    if runtime.is_main:
        found = find_checkpoint(folder.path / "checkpoints" / "last") if folder else None
        if found is None:  # killed before its first checkpoint was complete
            warnings.warn(f"--resume: {folder.path if folder else 'the run'} has no complete checkpoint yet; "
                          "the run starts from step 0", stacklevel=4)
        else:
            data = read_checkpoint(found, trainer.fingerprint)
    data = broadcast_object(data, runtime)
    if data is None:
        return Restored(LoopState())
    load_trainable_state(trainer.model, data.weights, "the run's last checkpoint")
    load_full_optimizer_state(trainer.model, trainer.optimizer, data.optimizer)
    trainer.scheduler.load_state_dict(data.scheduler)
    if trainer.scaler is not None and data.scaler is not None:
        trainer.scaler.load_state_dict(data.scaler)
    ranks = data.rng_ranks
    set_rng_state(ranks[runtime.rank] if ranks and runtime.rank < len(ranks) else data.rng)
    restored = Restored(LoopState(**data.loop))
    if data.best is not None:
        restored.best_weights, restored.best_metrics = data.best
    return restored


def evaluate_features(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prepared: Prepared, data: TaskData,
                      config: TrainConfig, runtime: Runtime) -> dict:
    """The task's metrics on the evaluation data (features tokenized once), the same in every process.

    Under DDP each process infers every ``world_size``-th feature and the
    outputs are gathered; under FSDP every process runs every batch (each
    forward is a collective over the shards).
    """
    task, features = prepared.task, prepared.eval_features
    share = runtime.strategy == "ddp" and runtime.world_size > 1
    mine = features[runtime.rank::runtime.world_size] if share else features
    outputs = infer_outputs(model, tokenizer, task, mine, config.eval_batch_size, runtime.precision)
    if share:
        parts = gather_objects(outputs, runtime)
        outputs = [None] * len(features)
        for rank, part in enumerate(parts):
            outputs[rank::runtime.world_size] = part
    predictions = task.decode(data, features, outputs)
    return task.score(data, predictions, outputs)


def track_best(state: LoopState, metrics: dict, metric: str, patience: int | None) -> bool:
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


def evaluate_and_checkpoint(tokenizer: PreTrainedTokenizerBase, prepared: Prepared, eval_data: TaskData | None,
                            config: TrainConfig, state: LoopState, restored: Restored, trainer: Trainer,
                            folder: RunFolder | None, log: MetricsLog, bar: tqdm) -> None:
    """Evaluate, keep the best weights, write the checkpoints (step 4; every process, the main one writes)."""
    runtime, model = trainer.runtime, trainer.model
    # RNG state as of the end of this step: evaluation draws no random
    # numbers, but the checkpoint must not depend on that.
    rngs = gather_objects(rng_state(), runtime)
    checkpoints = folder.path / "checkpoints" if folder else None
    metric = prepared.metric
    improved = False
    if eval_data is not None:
        metrics = evaluate_features(model, tokenizer, prepared, eval_data, config, runtime)
        log.log("eval", state.step, metrics)
        improved = track_best(state, metrics, metric, config.early_stopping_patience)
        if config.progress and runtime.is_main:
            bar.write(f"step {state.step}: eval {metric} {metrics[metric]:.4f} "
                      f"(best {state.best_metric:.4f} at step {state.best_step})")
    # one whole copy of the trainable weights (a gather under FSDP) serves the best and the last checkpoint
    weights = full_trainable_state(model) if folder or runtime.distributed or improved else None
    if improved:
        restored.best_weights, restored.best_metrics = weights, metrics
        if checkpoints:
            write_atomically(checkpoints / "best", {
                WEIGHTS_FILE: restored.best_weights, "metrics.json": metrics, STATE_FILE: {"step": state.step}})
    optimizer = full_optimizer_state(model, trainer.optimizer) if folder or runtime.distributed else None
    if folder:
        best = (restored.best_weights, restored.best_metrics) if restored.best_weights is not None else None
        data = CheckpointData(weights=weights, optimizer=optimizer, scheduler=trainer.scheduler.state_dict(),
                              loop=asdict(state), rng=rngs[0], rng_ranks=rngs if runtime.world_size > 1 else None,
                              scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None, best=best)
        save_checkpoint(checkpoints / "last", data, trainer.fingerprint)
        folder.commit()  # an --overwrite run replaces the earlier one from its first checkpoint on
        log.relocate(folder.path)
    if state.stopped_early and config.progress and runtime.is_main:
        bar.write(f"early stop: no better eval {metric} for {state.evals_without_improvement} evaluations")
