"""``evaluate`` and ``predict``: a model (with its adapter) against data or texts."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.data import TaskData, load_data
from adapterkit.errors import UsageError
from adapterkit.evaluate.compare import compare_with_base
from adapterkit.evaluate.plots import plot_confusion_matrix
from adapterkit.runtime.device import model_device
from adapterkit.runtime.inference import run_inference
from adapterkit.runtime.precision import resolve_precision
from adapterkit.tasks import chat_format, get_task, task_name_for_model
from adapterkit.tasks.base import Task
from adapterkit.tasks.generation import GenerationOptions, generation_settings
from adapterkit.tasks.lengths import report_truncation

DEFAULT_MAX_LENGTH = 512
SETTINGS_KEY = "settings"  # where ``evaluate`` records the settings it ran with, in its metrics


def model_labels(model: PreTrainedModel) -> list[str] | None:
    """The label names of the model's head, in index order (``None`` without a label head)."""
    id2label = getattr(model.config, "id2label", None)
    if not id2label or model.config.num_labels is None:
        return None
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(model.config.num_labels)]


def _max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    limit = getattr(tokenizer, "model_max_length", None) or DEFAULT_MAX_LENGTH
    return min(int(limit), DEFAULT_MAX_LENGTH)


def is_generative(task: Task) -> bool:
    """Whether the task generates text when it evaluates (``causal-lm``, ``seq2seq``)."""
    return isinstance(getattr(task, "generation", None), GenerationOptions)


def configure_generation(task: Task, generation: GenerationOptions | Mapping[str, Any] | None = None,
                         generate: bool = True) -> None:
    """Give a generative task its decoding settings, or switch its generation off.

    Raises ``UsageError`` when settings are given to a task that generates nothing.
    """
    if not is_generative(task):
        if generation is not None or not generate:
            raise UsageError(f"{task.name} does not generate text: generation settings "
                             "(max_new_tokens, temperature, stop, no-generate...) apply to causal-lm and seq2seq")
        return
    if isinstance(generation, Mapping):
        fields = sorted(GenerationOptions.__dataclass_fields__)
        unknown = sorted(set(generation) - set(fields))
        if unknown:
            raise UsageError(f"unknown generation settings {unknown}; known: {fields}")
        generation = GenerationOptions(**generation)
    if generation is not None:
        task.generation = generation
    task.generate = generate


def evaluation_settings(task: Task, tokenizer: PreTrainedTokenizerBase,
                        max_length: int | None = None) -> dict[str, Any]:
    """The settings an evaluation ran with, as ``evaluate`` records them under ``metrics["settings"]``.

    One entry per setting or group of settings: ``"max_length"``, the prompt
    ``"template"`` (causal-lm) and ``"generation"`` for the generative tasks
    (see ``generation_settings``). Settings that shape every
    task's figures belong here too, so that one dict tells what a figure
    was measured with. Empty for a task with nothing to record.
    """
    settings: dict[str, Any] = {}
    if max_length is not None:
        settings["max_length"] = max_length
    if task.scored_units and "response tokens" in task.scored_units:  # prompts go through a template
        settings["template"] = "chat template" if chat_format.uses_chat_template(tokenizer) else "plain instruction"
    if is_generative(task):
        settings["generation"] = generation_settings(task.generation_options(tokenizer), task.generate)
    return settings


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData | str | os.PathLike | Any,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    output_dir: str | os.PathLike | None = None,
    split: str = "test",
    generation: GenerationOptions | Mapping[str, Any] | None = None,
    generate: bool = True,
    compare_base: bool = False,
    precision: str = "fp32",
    **columns: str | None,
) -> dict[str, Any]:
    """Metrics of the model on labelled ``data``.

    With ``compare_base``, the model is evaluated twice on the same examples
    with the same settings, with its adapters and without them, and the result
    is ``{"adapter": metrics, "base": metrics, "change": ..., "settings": ...}``
    (see ``evaluate/compare.py``).

    Args:
        data: a ``TaskData``, or anything ``load_data`` reads (a file, a built-in
            name, a ``datasets.Dataset``...); labels are matched to the model's.
        batch_size / max_length: inference batching and input length (default: the
            task's default for this data and model, e.g. the length that fits 99% of
            the examples for classification, the context up to 1024 for causal-lm).
        output_dir: when given, writes ``metrics.json`` and, for labelled
            tasks, ``confusion_matrix.png`` there.
        split: the split of a built-in data set.
        generation: causal-lm and seq2seq: how the generated metrics (exact
            match, BLEU/chrF) generate, as ``GenerationOptions`` or a dict of
            its fields (``max_new_tokens``, ``temperature``, ``top_p``,
            ``stop``, ``seed``, ``batch_size``); default greedy, with
            ``max_new_tokens`` from each reference's length.
        generate: causal-lm and seq2seq: ``False`` scores perplexity alone,
            generating nothing.
        precision: ``fp32``, ``bf16``, ``fp16`` (autocast) or ``auto``
            (``runtime.precision.AUTO_PRECISION_RULE``) on the model's device.
        **columns: column names for reading ``data`` (``text_column=...``).

    Returns:
        For classification: ``accuracy``, ``macro_precision``, ``macro_recall``,
        ``macro_f1``, ``loss``, ``per_class`` (label -> precision/recall/f1/support),
        ``confusion_matrix`` (rows true, columns predicted), ``labels``, ``count``.
        For causal-lm and seq2seq also ``settings`` (see ``evaluation_settings``):
        ``{"generation": {"generate", "max_new_tokens", "temperature", "top_p",
        "stop", "seed", "batch_size"}}``.
    """
    task = get_task(data.task if isinstance(data, TaskData) else task_name_for_model(model))
    configure_generation(task, generation, generate)
    labels = model_labels(model)
    if not isinstance(data, TaskData):
        data = load_data(data, task=task.name, split=split, labels=labels, **columns)
    data = task.relabel(data, labels)
    length = max_length or task.default_lengths(data, tokenizer, model)["max_length"]
    report_truncation(task.truncation(data, tokenizer, length), f"evaluation data {data.source}", task.scored_units)

    resolved = resolve_precision(precision, model_device(model))

    def run() -> dict[str, Any]:
        predictions, outputs = run_inference(model, tokenizer, task, data, length, batch_size, precision=resolved)
        scored = task.score(data, predictions, outputs)
        scored[SETTINGS_KEY] = evaluation_settings(task, tokenizer, length)
        return scored

    metrics = compare_with_base(model, run) if compare_base else run()
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if "confusion_matrix" in metrics:
            plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"], folder / "confusion_matrix.png")
    return metrics


def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    adapter_names: Sequence[str | None] | None = None,
    precision: str = "fp32",
) -> list[Any]:
    """One prediction per text; for classification a ``(label, score)`` named tuple.

    ``adapter_names`` gives one adapter per text (``None``: the base model);
    texts for different adapters still share batches (see ``adapterkit.route``).
    Runs on the model's device; ``precision`` as for :func:`evaluate`.
    """
    task = get_task(task_name_for_model(model))
    if isinstance(texts, str):
        texts = [texts]
    data = task.from_texts(texts, model_labels(model))
    predictions, _ = run_inference(model, tokenizer, task, data, _max_length(tokenizer, max_length), batch_size,
                                   adapter_names=adapter_names,
                                   precision=resolve_precision(precision, model_device(model)))
    return predictions
