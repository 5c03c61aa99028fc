"""The end-to-end run behind ``adapterkit train``: resolve a config, load the
model and data, add the adapter, train, test, and leave everything in a run folder.

``RunConfig()`` with no arguments is the built-in default: LoRA on MiniLM
with Rotten Tomatoes, tested on its test split (5-7 minutes on 2 CPU cores).
It has no defaults of its own: the method's config class, ``TrainConfig``,
the method's ``default_lr`` and the task's ``default_lengths`` give them,
exactly as for ``ak.train`` from Python.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapterkit.core.atomic import write_text_atomically
from adapterkit.data import TaskData, holdout, load_data
from adapterkit.data.builtin import BUILTIN_DATASETS
from adapterkit.evaluate import evaluate
from adapterkit.models import load_model
from adapterkit.runtime.distributed import whole_parameters
from adapterkit.runtime.runtime import resolve_runtime
from adapterkit.train.config import TrainConfig, TrainConfigError, resolve_defaults
from adapterkit.train.fingerprint import RESUMABLE_CHANGES, check_same_run
from adapterkit.train.loop import resolve_train_config, seed_everything, train
from adapterkit.train.records import scalar_metrics
from adapterkit.train.result import TrainResult, save_run_adapter
from adapterkit.train.run_folder import RunFolder

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
        quantize: store the frozen base's linear layers as ``int8``, ``nf4`` or ``fp4``
            (``models/quantize.py``); ``None``: float.
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
    quantize: str | None = None
    output: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, config_file: str | os.PathLike | None = None, **overrides: Any) -> "RunConfig":
        """Defaults, then the YAML file, then ``overrides`` (``None`` values are ignored).

        An override whose name is a ``TrainConfig`` field (``epochs``, ``lr``...)
        goes into ``train``.
        """
        data = read_run_file(config_file) if config_file is not None else {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"{config_file}: unknown key(s) {unknown}; known: {sorted(known)}")
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for key in ("adapter", "train"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise TrainConfigError(f"{config_file}: {key!r} must be a mapping of options "
                                       f"(e.g. {key}: {{name: value}}), got {data[key]!r}")
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
        """The method's config object: its class's defaults, then ``adapter``."""
        from adapterkit.core import get_method
        from adapterkit.core.config import ConfigError

        try:
            method = get_method(self.method)
        except KeyError as err:
            raise TrainConfigError(f"method: {err.args[0]}") from None
        try:
            return method.config_class.from_dict(self.adapter)
        except ConfigError as err:
            raise ConfigError(f"adapter options for method {self.method!r}: {err}") from None

    def train_config(self, output_dir: str | None) -> TrainConfig:
        """The ``TrainConfig`` of ``train`` options, with the method's learning rate where it is
        not set. Lengths left unset are the task's to choose once data and model are loaded
        (``resolve_train_config``)."""
        from adapterkit.core import get_method

        config = TrainConfig.from_dict({**self.train, "output_dir": output_dir})
        return resolve_defaults(config, get_method(self.method).default_lr, {})

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share, shaped like the training loop's fingerprint."""
        plain = dataclasses.replace(self, train={**self.train, "resume": False, "overwrite": False})
        train = plain.train_config(None).to_dict()
        return {
            "model": self.model, "task": self.task, "data": self.data, "eval_data": self.eval_data,
            "quantize": self.quantize,
            "columns": {"text": self.text_column, "label": self.label_column, "text_pair": self.text_pair_column},
            "adapters": {self.adapter_name: self.adapter_config().to_dict()},
            "train": {k: v for k, v in train.items() if k not in RESUMABLE_CHANGES},
        }

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


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML run file; syntax errors name the file, line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TrainConfigError(f"--config {path}: cannot read it ({err})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise TrainConfigError(f"--config {path}{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"--config {path}: expected a mapping of run options (model: ..., "
                               f"train: {{...}}), found a {type(data).__name__}")
    return data


def _check_resume(config: RunConfig, folder: RunFolder) -> None:
    """Refuse a resume whose settings differ from the run in ``folder`` (its ``config.yaml``)."""
    saved_file = folder.final / "config.yaml"
    if not saved_file.is_file():
        return  # a run killed before it wrote its config; the loop's own check still applies
    from adapterkit.core import get_method

    saved = RunConfig.resolve(saved_file)
    old_method, new_method = get_method(saved.method).name, get_method(config.method).name
    if old_method != new_method:  # one line, not every option of both methods
        check_same_run({"method": old_method}, {"method": new_method}, str(folder.final))
    old, new = saved.fingerprint(), config.fingerprint()
    for key in ("max_length", "max_target_length"):  # unset: the task chooses from the data, as it did
        if new["train"].get(key) is None:
            new["train"][key] = old["train"].get(key)
    for key in ("model", "data", "eval_data"):
        a, b = old.get(key), new.get(key)
        if a is not None and b is not None and a != b and Path(a).resolve() == Path(b).resolve():
            new[key] = a  # the same file named another way
    check_same_run(old, new, str(folder.final))


def run(config: RunConfig) -> RunResult:
    """Train an adapter as ``config`` says and test it; everything lands in the run folder.

    The folder gets ``config.yaml`` (the resolved config), ``train_config.yaml``,
    ``metrics.jsonl``, ``tensorboard/``, ``training_curve.png``,
    ``checkpoints/``, ``adapter/`` and, with test data, ``test/metrics.json``
    and ``test/confusion_matrix.png``. A folder that holds a run is refused
    unless ``train.resume`` (same settings) or ``train.overwrite`` is set;
    both, and the folder being writable, are checked before anything loads.
    """
    from adapterkit.core import add_adapter, trainable_summary

    started = time.perf_counter()
    output_dir = _output_dir(config)
    config = dataclasses.replace(config, output=output_dir)
    train_config = config.train_config(output_dir)
    runtime = resolve_runtime(train_config.device, train_config.precision, train_config.strategy)
    # only the main process prepares and writes the folder; the others read nothing from it
    folder = (RunFolder.prepare(output_dir, resume=train_config.resume, overwrite=train_config.overwrite)
              if runtime.is_main else None)
    if folder is not None and folder.resume:
        _check_resume(config, folder)
    adapter_config = config.adapter_config()
    try:
        train_data, eval_data, test_data = load_run_data(config)
        # Seed before the new head and the adapter are initialised, so that the
        # same config gives the same weights in every process.
        seed_everything(train_config.seed)
        model, tokenizer = load_model(config.model, task=config.task, labels=train_data.labels,
                                      quantize=config.quantize)
        add_adapter(model, config.adapter_name, adapter_config)
        train_config = resolve_train_config(model, tokenizer, train_data, train_config)
        trainable = trainable_summary(model)
        resolved = {**config.to_dict(), "adapter": adapter_config.to_dict(), "train": train_config.to_dict()}
        if folder is not None:
            write_text_atomically(folder.path / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    except BaseException:
        if folder is not None:
            folder.discard()
        raise

    result = train(model, tokenizer, train_data, eval_data, train_config, run_folder=folder, runtime=runtime)
    test_metrics: dict[str, Any] = {}
    # Under DDP the main process tests alone; under FSDP every forward is a collective, so all take part.
    if test_data is not None and (runtime.is_main or runtime.strategy == "fsdp"):
        test_metrics = evaluate(model, tokenizer, test_data, max_length=train_config.max_length,
                                batch_size=train_config.eval_batch_size, precision=runtime.precision,
                                output_dir=folder.path / "test" if folder is not None else None)
        with whole_parameters(model):
            if folder is not None:
                result.adapter_dir = save_run_adapter(
                    model, folder.path / "adapter", train_data, train_config, result,
                    extra={"metrics": {"test": scalar_metrics(test_metrics)}})
    final = str(folder.final) if folder is not None else output_dir
    return RunResult(final, result.adapter_dir, result, test_metrics, trainable,
                     time.perf_counter() - started)
