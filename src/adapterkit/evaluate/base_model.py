"""Evaluating a base model with no adapter: the "before" figure of a fine-tuning run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from adapterkit.data import TaskData, load_data
from adapterkit.evaluate.api import evaluate
from adapterkit.models import load_model
from adapterkit.models.loading import LABELLED_TASKS
from adapterkit.tasks.generation import GenerationOptions

HEAD_SEED = 0  # seeds the fresh head of labelled tasks, so the figure is repeatable


def evaluate_base_model(
    model_name: str | os.PathLike,
    task: str,
    data: TaskData | str | os.PathLike | Any,
    *,
    split: str = "test",
    batch_size: int = 64,
    max_length: int | None = None,
    generation: GenerationOptions | Mapping[str, Any] | None = None,
    generate: bool = True,
    device: str | None = None,
    precision: str = "fp32",
    **columns: str | None,
) -> dict[str, Any]:
    """Metrics of ``model_name`` itself on ``data`` for ``task``, with no adapter.

    Generative tasks (``causal-lm``, ``seq2seq``) use the pretrained model as
    it is. Tasks with a head the base model lacks (classification, NER, QA)
    get a freshly initialised head, seeded with ``HEAD_SEED``, sized from the
    data's labels: the chance-level figure an adapter starts from.
    ``generation`` and ``generate`` are ``evaluate``'s (generative tasks only);
    ``device`` is ``load_model``'s and ``precision`` ``evaluate``'s.
    """
    if not isinstance(data, TaskData):
        data = load_data(data, task=task, split=split, **columns)
    labels = data.labels if task in LABELLED_TASKS else None
    torch.manual_seed(HEAD_SEED)
    model, tokenizer = load_model(model_name, task=task, labels=labels, device=device)
    model.eval()
    return evaluate(model, tokenizer, data, batch_size=batch_size, max_length=max_length,
                    generation=generation, generate=generate, precision=precision)
