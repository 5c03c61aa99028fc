"""Load a base model and its tokenizer for a task, from local files only."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapterkit.errors import UserError
from adapterkit.models.aliases import resolve_model_path

log = logging.getLogger(__name__)


class ModelArgumentError(UserError, ValueError):
    """``load_model`` was asked for a task, labels or head size it cannot give."""

# Which Hugging Face auto class builds the model for each task name.
TASK_MODEL_CLASSES: dict[str, type] = {
    "classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "causal-lm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
}

# Tasks whose head has one output per label, so ``num_labels``/``labels`` apply.
LABELLED_TASKS = frozenset({"classification", "token-classification"})

# Attribute on the loaded model that records where it came from; the adapter
# metadata and ``predict`` read it back.
SOURCE_ATTR = "adapterkit_source"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report and progress bar; a new task head is expected."""
    verbosity = transformers.logging.get_verbosity()
    bar_was_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar_was_on:
            transformers.utils.logging.enable_progress_bar()


def _label_kwargs(num_labels: int | None, labels: Sequence[str] | None) -> dict:
    if labels is None:
        return {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise ModelArgumentError(f"labels must be distinct, got {labels}")
    if num_labels is not None and num_labels != len(labels):
        raise ModelArgumentError(
            f"num_labels={num_labels} but {len(labels)} labels were given: {labels}"
        )
    return {
        # A folder with a head of another size (a model fine-tuned elsewhere)
        # gets a fresh head for these labels instead of a shape error.
        "ignore_mismatched_sizes": True,
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give GPT-2/Llama-like tokenizers a pad token so batches can be padded.

    The end-of-sequence token stands in for padding; the attention mask keeps
    it out of the computation. The model config learns the id too, which
    sequence-classification heads of decoder models need to find the last token.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelArgumentError(
                "the tokenizer has no pad, end-of-sequence or unknown token to pad with; "
                "give the model folder a tokenizer that has one"
            )
        tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model(
    name_or_path: str | os.PathLike,
    task: str = "classification",
    num_labels: int | None = None,
    labels: Sequence[str] | None = None,
    device: str | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model with the head for ``task``, and its tokenizer.

    Args:
        name_or_path: an alias such as ``"minilm"`` or a local Hugging Face folder.
        task: one of ``TASK_MODEL_CLASSES``.
        num_labels: size of the classification head (classification tasks).
        labels: label names; sets ``id2label``/``label2id`` and implies ``num_labels``.
        device: where to put the model (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; under
            ``torchrun`` ``auto`` and ``cuda`` take the local rank's GPU); ``None`` leaves it on the CPU.
        quantize: ``"int8"``, ``"nf4"`` or ``"fp4"`` stores the base's linear layers (not the
            embeddings, norms or head) quantised, after the move to ``device`` (see ``models/quantize.py``).

    Returns:
        ``(model, tokenizer)``. The model records its source in
        ``model.adapterkit_source`` (``{"name": ..., "path": ..., "task": ...}``).
    """
    if task not in TASK_MODEL_CLASSES:
        raise ModelArgumentError(
            f"unknown task {task!r}; expected one of {sorted(TASK_MODEL_CLASSES)}"
        )
    if (num_labels is not None or labels is not None) and task not in LABELLED_TASKS:
        raise ModelArgumentError(f"task {task!r} has no label head; drop num_labels/labels")
    path = resolve_model_path(name_or_path)
    kwargs = _label_kwargs(num_labels, labels)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = TASK_MODEL_CLASSES[task].from_pretrained(
            path, local_files_only=True, **kwargs
        )
    ensure_pad_token(tokenizer, model)
    if device is not None:
        from adapterkit.runtime.device import resolve_device
        from adapterkit.runtime.runtime import world_from_env

        model.to(resolve_device(device, world_from_env()[2]))
    if quantize is not None:
        from adapterkit.models.quantize import quantize_model

        quantize_model(model, quantize)
    source = {"name": str(name_or_path), "path": str(Path(path).resolve()), "task": task}
    setattr(model, SOURCE_ATTR, source)
    log.info("loaded %s (%s) for %s", name_or_path, path, task)
    return model, tokenizer


def model_source(model: PreTrainedModel) -> dict:
    """Where ``load_model`` found this model; empty when it was built otherwise."""
    return dict(getattr(model, SOURCE_ATTR, {}) or {})
