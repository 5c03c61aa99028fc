"""Encoder tasks for ``adapterkit serve``: classification, tagging (NER) and extractive QA adapters on one base.

:class:`EncoderHost` keeps one *task model* per (task, head size): the base
encoder loaded with that task's head class (``load_model``). The first task
model's encoder parameters and buffers form a pool; every later task model
has its encoder's tensors of the same name and shape replaced by the pool's
before any adapter is added, so the frozen base weights exist once however
many tasks and head sizes are served. Heads are never shared: each adapter
brings its own head copy (``core/heads.py``).

Why per head size: a task model's head copies start as copies of its base
head, and ``load_adapter`` fits saved head tensors to them by shape only
(``fit_shape``), and the saved fingerprint hashes the head's shape, so a
3-label classifier cannot load onto a 2-label task model. Adapters with the
same head size but other label *names* share a task model; each adapter's
labels come from its own metadata and decode with them.

Inference groups items by task model, and routes each row of a batch to its
adapter (``adapterkit.core.route``) through ``runtime.inference.run_inference``,
which sorts by length and runs one forward per ``max_batch`` chunk. Prefix
and prompt adapters add virtual tokens, which a routed batch cannot mix, so
each of those gets batches of its own. Every model use, load and unload holds
``self.lock``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.core import (
    AdapterFileError,
    BaseModelMismatchError,
    delete_adapter,
    get_adapter_config,
    get_method,
)
from adapterkit.core import load_adapter as core_load_adapter
from adapterkit.errors import UsageError
from adapterkit.evaluate.api import DEFAULT_MAX_LENGTH, model_labels
from adapterkit.runtime.device import resolve_device
from adapterkit.runtime.inference import run_inference
from adapterkit.models import load_model
from adapterkit.models.adapters import adapter_metadata, adapter_task
from adapterkit.models.aliases import resolve_model_path
from adapterkit.models.loading import LABELLED_TASKS
from adapterkit.serve.encoder_batching import (
    ITEM_FIELDS,
    KIND_TASKS,
    Kind,
    Results,
    classification_result,
    decode_rows,
    entity_result,
)
from adapterkit.serve.errors import BadRequest, Forbidden, NotFound
from adapterkit.tasks import get_task
from adapterkit.tasks.lengths import model_limit
from adapterkit.tasks.question_answering import QA_MAX_LENGTH

# The endpoint that serves each task.
TASK_ENDPOINTS: dict[str, str] = {"classification": "/v1/classify", "token-classification": "/v1/tag",
                                  "question-answering": "/v1/answer"}


@dataclass
class TaskModel:
    """The base encoder with one task's head of one size, and the adapters loaded on it."""

    task: str
    head_size: int | None  # outputs of the label head; None for question answering
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    labels: list[str] | None  # the head's label names as built (the first adapter's)
    max_length: int


@dataclass
class LoadedAdapter:
    """One served adapter: where it came from and which task model holds it."""

    name: str
    task: str
    labels: list[str] | None
    method: str
    path: str
    slot: TaskModel = field(repr=False)
    input_side: bool = False  # prefix/prompt: adds virtual tokens, so it is batched on its own

    def info(self) -> dict[str, Any]:
        """The public description: name, task, labels, method and folder."""
        return {"name": self.name, "task": self.task, "labels": self.labels, "method": self.method,
                "path": self.path}


def share_base(pool: dict[str, torch.Tensor], encoder: nn.Module) -> int:
    """Make ``encoder``'s parameters and buffers the pool's tensors of the same name; return how many.

    Tensors the pool lacks (a pooler only the classification model has) join
    it, so a later task model with them shares them too. Call this before any
    adapter wraps the encoder's modules, so the names are the plain ones.
    """
    shared = 0
    for kind, named in (("param", encoder.named_parameters()), ("buffer", encoder.named_buffers())):
        for name, tensor in list(named):
            key = f"{kind}:{name}"
            pooled = pool.setdefault(key, tensor)
            if pooled is tensor:
                continue
            if pooled.shape != tensor.shape or pooled.dtype != tensor.dtype:
                raise RuntimeError(f"cannot share base {kind} {name}: {tuple(tensor.shape)} {tensor.dtype} here, "
                                   f"{tuple(pooled.shape)} {pooled.dtype} in the first task model")
            path, _, leaf = name.rpartition(".")
            setattr(encoder.get_submodule(path), leaf, pooled)  # a Parameter re-registers, a buffer is replaced
            shared += 1
    return shared


class EncoderHost:
    """One base encoder serving classification, token-classification and question-answering adapters.

    Args:
        model: the base model, an alias such as ``"minilm"`` or a local folder;
            kept as ``base_name``.
        device: where the task models run.
        max_batch: the most features (texts, or QA windows) in one forward.
        max_length: tokens per input; default 512 (384 per window for QA), at
            most the model's position table. Longer classification inputs are
            truncated; longer NER sentences and QA contexts become windows.
        quantize: store the encoder's linear layers as ``int8``, ``nf4`` or ``fp4``
            (``models/quantize.py``); the task models still share one copy of them.
    """

    kind = "encoder"  # which kind of host the HTTP layer talks to

    def __init__(self, model: str, *, device: str = "cpu", max_batch: int = 64,
                 max_length: int | None = None, quantize: str | None = None) -> None:
        if max_batch < 1:
            raise UsageError(f"max_batch must be 1 or more, got {max_batch}")
        path = resolve_model_path(model)  # an unknown alias or missing folder fails now, not at the first load
        self.base_name = model
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)  # for usage counts
        self.batcher: Any = None  # the EncoderBatcher the server attaches; closed by close()
        self.device = resolve_device(device)
        self.max_batch = max_batch
        self.max_length = max_length
        self.quantize = quantize
        self.lock = threading.RLock()
        self.task_models: dict[tuple[str, int | None], TaskModel] = {}
        self._pool: dict[str, torch.Tensor] = {}
        self._adapters: dict[str, LoadedAdapter] = {}

    def close(self, wait: bool = True) -> None:
        """Stop the attached batcher, then drop the adapters and models.

        With ``wait`` the batcher's queued requests finish first; without it,
        those not yet started are refused as their adapters are gone.
        """
        if self.batcher is not None:
            self.batcher.close(wait)
        with self.lock:
            self._adapters.clear()
            self.task_models.clear()
            self._pool.clear()

    # --- adapters --------------------------------------------------------------------------
    def load_adapter(self, name: str, folder: Path) -> dict[str, Any]:
        """Load the adapter in ``folder`` as ``name`` onto the task model of its task and head size.

        Returns ``{"name", "task", "labels", "method", "path"}``. Refuses a
        taken name or a non-encoder task (400), a damaged folder (400
        ``invalid_adapter``) and an adapter made for another base (403
        ``base_model_mismatch``).
        """
        folder = Path(folder)
        with self.lock:
            if name in self._adapters or name == self.base_name:
                taken = "the base model's name" if name == self.base_name else "already loaded"
                raise BadRequest(f"adapter name {name!r} is {taken}; unload it first or pick another name",
                                 param="lora_name", code="adapter_exists")
            try:
                metadata = adapter_metadata(folder)
                task = adapter_task(metadata, folder)
            except AdapterFileError as err:
                raise BadRequest(f"cannot load the adapter in {folder}: {err}", param="lora_path",
                                 code="invalid_adapter") from err
            if task not in TASK_ENDPOINTS:
                served = ", ".join(f"{t} ({e})" for t, e in TASK_ENDPOINTS.items())
                raise BadRequest(f"the adapter in {folder} is a {task} adapter; this encoder server serves "
                                 f"{served}", param="lora_path", code="wrong_task")
            labels = [str(label) for label in metadata["labels"]] if task in LABELLED_TASKS and \
                metadata.get("labels") else None
            head_size = (len(labels) if labels else metadata.get("head_outputs")) if task in LABELLED_TASKS else None
            key = (task, head_size)
            new_slot = key not in self.task_models
            slot = self._task_model(task, head_size, labels)
            try:
                self._add(slot, name, folder)
            except Exception:
                if new_slot:  # built for this adapter alone; the pool keeps the shared base tensors
                    del self.task_models[key]
                raise
            if task in LABELLED_TASKS and not labels:  # no names saved: Hugging Face's placeholders
                labels = [f"LABEL_{i}" for i in range(slot.model.config.num_labels)]
            method = get_method(get_adapter_config(slot.model, name))
            adapter = LoadedAdapter(name, task, labels, method.name, str(folder), slot, method.input_side)
            self._adapters[name] = adapter
            return adapter.info()

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (404 ``model_not_found`` when it is not loaded)."""
        with self.lock:
            adapter = self._lookup(name, "model")
            delete_adapter(adapter.slot.model, name)
            del self._adapters[name]

    def adapters(self) -> dict[str, dict[str, Any]]:
        """Every loaded adapter's description, by name, in load order.

        Like :meth:`validate` it reads a snapshot of the table without taking
        ``self.lock``: the server calls it on its event loop (every request's
        model check, ``/v1/models``, ``/health``), which must not wait for a
        forward running in the batcher's thread.
        """
        return {name: adapter.info() for name, adapter in dict(self._adapters).items()}

    def _add(self, slot: TaskModel, name: str, folder: Path) -> None:
        """``core.load_adapter`` onto ``slot``, its errors as the server's."""
        try:
            core_load_adapter(slot.model, folder, name=name)
        except BaseModelMismatchError as err:
            raise Forbidden(f"adapter {name!r} does not fit this server's base model {self.base_name!r}: {err}",
                            param="lora_path", code="base_model_mismatch") from err
        except AdapterFileError as err:
            raise BadRequest(f"cannot load the adapter in {folder}: {err}", param="lora_path",
                             code="invalid_adapter") from err
        except UsageError as err:  # a name add_adapter refuses (empty, or with a dot)
            raise BadRequest(str(err), param="lora_name", code="invalid_adapter_name") from err
        finally:
            slot.model.eval()

    def _task_model(self, task: str, head_size: int | None, labels: list[str] | None) -> TaskModel:
        """The task model for ``task`` with a head of ``head_size`` outputs, built on first use."""
        key = (task, head_size)
        slot = self.task_models.get(key)
        if slot is not None:
            return slot
        num_labels = head_size if task in LABELLED_TASKS and not labels else None
        # quantised (each task model once, as it loads), then its base tensors replaced by the pool's
        model, tokenizer = load_model(self.base_name, task=task, labels=labels, num_labels=num_labels,
                                      device=str(self.device) if self.quantize else None, quantize=self.quantize)
        model.to(self.device).eval()
        if self.device.type != "cpu":  # the tasks collate on the CPU
            model.register_forward_pre_hook(_inputs_to(self.device), with_kwargs=True)
        share_base(self._pool, model.base_model)
        for param in model.base_model.parameters():
            param.requires_grad_(False)  # served, never trained
        limit = model_limit(model, tokenizer)
        default = QA_MAX_LENGTH if task == "question-answering" else DEFAULT_MAX_LENGTH
        slot = TaskModel(task, head_size, model, tokenizer, model_labels(model) if task in LABELLED_TASKS else None,
                         min(self.max_length or default, limit))
        self.task_models[key] = slot
        return slot

    # --- requests --------------------------------------------------------------------------
    def validate(self, kind: Kind, items: Sequence[tuple]) -> None:
        """Refuse items of a request before any model runs: their shape, adapter and task.

        Raises ``BadRequest`` (``invalid_input``, ``no_task_head``,
        ``wrong_task``) or ``NotFound`` (``model_not_found``). It reads a
        snapshot of the adapter table and takes no lock, so a caller is not
        held up by a forward running in another thread.
        """
        if kind not in KIND_TASKS:
            raise BadRequest(f"unknown request kind {kind!r}; expected one of {sorted(KIND_TASKS)}")
        fields = ITEM_FIELDS[kind]
        loaded = dict(self._adapters)  # one atomic copy; entries are added only once fully loaded
        for i, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 1 + len(fields)
                    and all(isinstance(v, str) for v in item[1:])):
                raise BadRequest(f"input {i}: expected (model, {', '.join(fields)}) as strings, "
                                 f"found {item!r:.80}", param="input", code="invalid_input")
            if kind == "answer" and not (item[1].strip() and item[2].strip()):
                raise BadRequest(f"input {i}: question and context must not be empty", param="input",
                                 code="invalid_input")
            self._adapter_for(item[0], kind, loaded)

    def classify(self, items: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        """``(adapter, text)`` -> ``{"label", "probs", "num_classes"}``; ``probs`` in the adapter's label order."""
        return list(self.run("classify", items))

    def tag(self, items: Sequence[tuple[str, str]]) -> list[list[dict[str, Any]]]:
        """``(adapter, text)`` -> entities ``{"type", "text", "start", "end", "score"}``.

        ``start``/``end`` are character offsets into the text
        (``text[start:end] == entity["text"]``). A word's tag is read at its
        first sub-token; ``score`` is the mean, over the entity's words, of the
        softmax probability of the tag chosen for each word.
        """
        return list(self.run("tag", items))

    def answer(self, items: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
        """``(adapter, question, context)`` -> ``{"answer", "start", "end", "score"}``.

        ``context[start:end] == answer``; ``score`` is p(start) * p(end) in the
        answer's window. No valid span gives ``{"answer": "", "start": 0, "end": 0, "score": 0.0}``.
        """
        return list(self.run("answer", items))

    def run(self, kind: Kind, items: Sequence[tuple]) -> Results:
        """The results of ``items`` of one kind, in item order, with the input tokens each one cost.

        Validates, groups by task model (and input-side adapter) and runs each
        group routed; ``Results.item_tokens`` counts the tokens the model read
        per item (every window of a long one), which is what ``usage`` reports.
        """
        results: list[Any] = [None] * len(items)
        tokens = [0] * len(items)
        with self.lock:
            self.validate(kind, items)
            groups: dict[tuple, list[int]] = {}
            for i, item in enumerate(items):
                adapter = self._adapters[item[0]]
                key = (adapter.task, adapter.slot.head_size, adapter.name if adapter.input_side else None)
                groups.setdefault(key, []).append(i)
            for indices in groups.values():
                chosen = [items[i] for i in indices]
                values, counts = self._run_group(kind, chosen)
                for i, result, count in zip(indices, values, counts):
                    results[i], tokens[i] = result, count
        return Results(results, item_tokens=tokens)

    def _run_group(self, kind: Kind, items: Sequence[tuple]) -> tuple[list[Any], list[int]]:
        """One task model's items: a routed ``run_inference``, then each adapter's rows decoded with its labels.

        Returns the results and the tokens the model read for each item.
        """
        adapters = [self._adapters[item[0]] for item in items]
        slot = adapters[0].slot
        task = get_task(slot.task)
        inputs = [item[1] if kind != "answer" else (item[1], item[2]) for item in items]
        data = task.from_texts(inputs, slot.labels)
        features = task.encode(data, slot.tokenizer, slot.max_length)
        counts = [0] * len(items)
        for feature in features:
            counts[feature["_example"]] += len(feature["input_ids"])
        with torch.no_grad():
            predictions, outputs = run_inference(slot.model, slot.tokenizer, task, data, slot.max_length,
                                                 self.max_batch, features=features,
                                                 adapter_names=[a.name for a in adapters])
        if kind == "classify":
            return [classification_result(logits, adapter.labels)
                    for logits, adapter in zip(outputs, adapters)], counts
        for name in {a.name for a in adapters if a.labels != slot.labels}:
            rows = [i for i, a in enumerate(adapters) if a.name == name]
            for i, prediction in zip(rows, decode_rows(task, data, features, outputs, rows,
                                                        self._adapters[name].labels)):
                predictions[i] = prediction
        if kind == "tag":
            return [[entity_result(e) for e in p.entities] for p in predictions], counts
        return [{"answer": p.answer, "start": p.start, "end": p.end, "score": p.score} for p in predictions], counts

    # --- lookups ---------------------------------------------------------------------------
    def _lookup(self, name: str | None, param: str, loaded: dict[str, LoadedAdapter] | None = None) -> LoadedAdapter:
        loaded = dict(self._adapters) if loaded is None else loaded
        adapter = loaded.get(name) if isinstance(name, str) else None
        if adapter is None:
            raise NotFound(f"no adapter called {name!r} is loaded; loaded: {sorted(loaded)}",
                           param=param, code="model_not_found")
        return adapter

    def _adapter_for(self, name: str | None, kind: Kind, loaded: dict[str, LoadedAdapter]) -> LoadedAdapter:
        """The loaded adapter ``name`` if it serves ``kind`` requests; the base and other tasks refused."""
        task = KIND_TASKS[kind]
        if name is None or name == self.base_name:
            fit = sorted(n for n, a in loaded.items() if a.task == task)
            raise BadRequest(f"{self.base_name!r} is the base encoder, which has no trained {task} head; "
                             f"name one of its {task} adapters: {fit}", param="model", code="no_task_head")
        adapter = self._lookup(name, "model", loaded)
        if adapter.task != task:
            raise BadRequest(f"adapter {name!r} is a {adapter.task} adapter, not {task}; send it to "
                             f"{TASK_ENDPOINTS[adapter.task]}", param="model", code="wrong_task")
        return adapter


def _inputs_to(device: torch.device) -> Any:
    """A forward pre-hook that moves the call's tensor arguments to ``device``."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
    return hook
