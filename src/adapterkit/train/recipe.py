"""The end-to-end run behind ``adapterkit train``: resolve a config, load the
model and data, add the adapter, train, test, and leave everything in a run folder.

``RunConfig()`` with no arguments is the built-in default: LoRA on MiniLM
with Rotten Tomatoes, tested on its test split (5-7 minutes on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapterkit.data import TaskData, holdout, load_data
from adapterkit.data.builtin import BUILTIN_DATASETS
from adapterkit.evaluate import evaluate
from adapterkit.models import load_model
from adapterkit.train.config import TrainConfig, TrainConfigError
from adapterkit.train.loop import seed_everything, train
from adapterkit.train.records import scalar_metrics
from adapterkit.train.result import TrainResult, save_run_adapter

# Short method names of the command line -> names in the method registry.
METHOD_NAMES: dict[str, str] = {"prefix": "prefix_tuning", "prompt": "prompt_tuning"}
# Default options of each method's config when the run gives none; methods
# not listed use their config class's own defaults.
DEFAULT_ADAPTER_OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "targets": ["query", "key", "value", "dense"]},
}
# Per-task changes to those defaults: generative models (Llama, GPT-2, T5, BART)
# take their architecture's default LoRA targets (e.g. q_proj/v_proj), as the
# BERT module names above do not exist in them.
TASK_ADAPTER_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "causal-lm": {"lora": {"targets": None}},
    "seq2seq": {"lora": {"targets": None}},
}
# Peak learning rates that work for each method when the run sets none:
# input-side methods (prompt, prefix) need much larger steps than LoRA.
DEFAULT_LR: dict[str, float] = {
    "lora": 1e-3, "bottleneck": 1e-3, "ia3": 5e-3, "bitfit": 2e-3, "prefix": 1e-2, "prompt": 3e-2,
}
# Training defaults of the built-in run, measured on 2 CPU cores: one epoch of
# rotten_tomatoes (321 steps) reaches 0.82 test accuracy in about 430 CPU-seconds;
# a second epoch adds about one point for twice the time, past the 10-minute budget.
DEFAULT_TRAIN: dict[str, Any] = {
    "epochs": 1, "batch_size": 32, "max_length": 64, "head_lr": 2e-3, "eval_every": 200,
}
RUNS_DIR = "runs"


@dataclass
class RunConfig:
    """Everything one ``adapterkit train`` run needs; the YAML file has these keys.

    Attributes:
        model: a model alias or local folder.
        task: the task name.
        data: training data: a built-in name or a file.
        eval_data: validation data; default: the built-in ``validation`` split,
            or 10% of a training file held out with a fixed seed.
        test_data: data to test the final adapter on; default: the built-in
            ``test`` split (files: none).
        text_column / label_column / text_pair_column: column names in the files.
        method: the adapter method (``lora``, ``bottleneck``, ``ia3``, ``prefix``, ``prompt``, ``bitfit``).
        adapter: options of the method's config, e.g. ``{"rank": 8, "targets": ["query", "value"]}``.
        adapter_name: the adapter's name on the model.
        output: the run folder; default ``runs/<date-time>``.
        train: ``TrainConfig`` options (its ``output_dir`` is ``output``).
    """

    model: str = "minilm"
    task: str = "classification"
    data: str = "rotten_tomatoes"
    eval_data: str | None = None
    test_data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    text_pair_column: str | None = None
    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)
    adapter_name: str = "default"
    output: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, config_file: str | os.PathLike | None = None, **overrides: Any) -> "RunConfig":
        """Defaults, then the YAML file, then ``overrides`` (``None`` values are ignored).

        An override whose name is a ``TrainConfig`` field (``epochs``, ``lr``...)
        goes into ``train``.
        """
        data: dict[str, Any] = {}
        if config_file is not None:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
            if not isinstance(data, dict):
                raise TrainConfigError(f"{config_file}: expected a mapping of run options")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"{config_file}: unknown key(s) {unknown}; known: {sorted(known)}")
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        data = {**data, "adapter": dict(data.get("adapter") or {}), "train": dict(data.get("train") or {})}
        for key, value in overrides.items():
            if value is None:
                continue
            if key in known:
                data[key] = value
            elif key in train_fields:
                data["train"][key] = value
            else:
                raise TrainConfigError(f"unknown run option {key!r}")
        return cls(**data)

    def adapter_config(self) -> Any:
        """The method's config object, built from the defaults and ``adapter``."""
        from adapterkit.core import get_config_class

        options = {**DEFAULT_ADAPTER_OPTIONS.get(self.method, {}),
                   **TASK_ADAPTER_OPTIONS.get(self.task, {}).get(self.method, {}), **self.adapter}
        return get_config_class(METHOD_NAMES.get(self.method, self.method))(**options)

    def train_config(self, output_dir: str) -> TrainConfig:
        """The ``TrainConfig``: built-in defaults, the method's learning rate, then ``train``."""
        options = {**DEFAULT_TRAIN, "lr": DEFAULT_LR.get(self.method, 1e-3), **self.train}
        return TrainConfig.from_dict({**options, "output_dir": output_dir})

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``config.yaml`` (re-usable with ``--config``)."""
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    """What a run produced."""

    output_dir: str
    adapter_dir: str | None
    train: TrainResult
    test_metrics: dict[str, Any]
    trainable: dict[str, float | int]
    wall_time_s: float


def _columns(config: RunConfig) -> dict[str, str | None]:
    return {"text_column": config.text_column, "label_column": config.label_column,
            "text_pair_column": config.text_pair_column}


def load_run_data(config: RunConfig) -> tuple[TaskData, TaskData, TaskData | None]:
    """``(train, validation, test)``: built-in splits, or files (holding out validation if needed)."""
    columns = _columns(config)
    builtin = config.data in BUILTIN_DATASETS
    train_data = load_data(config.data, config.task, split="train", **columns)
    labels = train_data.labels
    if config.eval_data:
        eval_data = load_data(config.eval_data, config.task, split="validation", labels=labels, **columns)
    elif builtin:
        eval_data = load_data(config.data, config.task, split="validation", labels=labels, **columns)
    else:
        train_data, eval_data = holdout(train_data)
    test_source = config.test_data or (config.data if builtin else None)
    test_data = (load_data(test_source, config.task, split="test", labels=labels, **columns)
                 if test_source else None)
    return train_data, eval_data, test_data


def _output_dir(config: RunConfig) -> str:
    if config.output:
        return config.output
    if config.train.get("resume"):
        raise TrainConfigError("--resume needs --output: the folder of the run to resume")
    return str(Path(RUNS_DIR) / time.strftime("%Y%m%d-%H%M%S"))


def run(config: RunConfig) -> RunResult:
    """Train an adapter as ``config`` says and test it; everything lands in the run folder.

    The folder gets ``config.yaml`` (the resolved config), ``train_config.yaml``,
    ``metrics.jsonl``, ``tensorboard/``, ``training_curve.png``,
    ``checkpoints/``, ``adapter/`` and, with test data, ``test/metrics.json``
    and ``test/confusion_matrix.png``.
    """
    from adapterkit.core import add_adapter, trainable_summary

    started = time.perf_counter()
    output_dir = _output_dir(config)
    config = dataclasses.replace(config, output=output_dir)
    train_config = config.train_config(output_dir)
    adapter_config = config.adapter_config()
    train_data, eval_data, test_data = load_run_data(config)
    # Seed before the new head and the adapter are initialised, so that the
    # same config gives the same weights in every process.
    seed_everything(train_config.seed)
    model, tokenizer = load_model(config.model, task=config.task, labels=train_data.labels)
    add_adapter(model, config.adapter_name, adapter_config)
    trainable = trainable_summary(model)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    resolved = {**config.to_dict(), "adapter": adapter_config.to_dict(), "train": train_config.to_dict()}
    (Path(output_dir) / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    result = train(model, tokenizer, train_data, eval_data, train_config)
    test_metrics: dict[str, Any] = {}
    if test_data is not None:
        test_metrics = evaluate(model, tokenizer, test_data, max_length=train_config.max_length,
                                batch_size=train_config.eval_batch_size,
                                output_dir=Path(output_dir) / "test")
        result.adapter_dir = save_run_adapter(
            model, Path(output_dir) / "adapter", train_data, train_config, result,
            extra={"metrics": {"test": scalar_metrics(test_metrics)}})
    return RunResult(output_dir, result.adapter_dir, result, test_metrics, trainable,
                     time.perf_counter() - started)
