"""The generative side of the server: one causal LM (or encoder-decoder), its adapters, their prompts.

Adapters are loaded and unloaded on the engine's thread between decoding
steps, so a forward never sees the model half-changed. An unloaded adapter
disappears from the model list at once; its weights go once no waiting or
running request uses it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterkit.runtime.device import resolve_device
from adapterkit.core import delete_adapter, load_adapter
from adapterkit.core.fingerprint import BaseModelMismatchError
from adapterkit.core.registry import get_method
from adapterkit.core.serialization import AdapterFileError
from adapterkit.core.state import get_state, has_state
from adapterkit.models import load_model
from adapterkit.models.adapters import adapter_metadata, adapter_task
from adapterkit.serve.engine import Batching, GenerationEngine
from adapterkit.serve.errors import BadRequest, Forbidden, NotFound
from adapterkit.serve.metrics import ServerMetrics
from adapterkit.tasks import chat_format

CHAT_TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_CONTEXT = 2048


def adapter_chat_template(folder: Path) -> str | None:
    """A chat template saved with the adapter (``chat_template.jinja``, or ``tokenizer_config.json``'s)."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        import json

        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def load_refusal(folder: Path, err: Exception) -> Exception:
    """The HTTP error for an adapter folder that cannot be loaded."""
    if isinstance(err, BaseModelMismatchError):
        return Forbidden(f"the adapter in {folder} was made for another base model: {err}", param="lora_path",
                         code="base_model_mismatch")
    if isinstance(err, (AdapterFileError, ValueError, OSError)):
        return BadRequest(f"cannot load the adapter in {folder}: {err}", param="lora_path", code="invalid_adapter")
    return err


class GenerativeHost:
    """A causal LM with its adapters, and the engine that generates with them.

    Args:
        model: alias or folder of the base model.
        task: ``"causal-lm"`` or ``"seq2seq"``.
        quantize: store the base's linear layers as ``int8``, ``nf4`` or ``fp4``.
        engine_options: passed to :class:`GenerationEngine` (``max_batch``, ``max_queue``, ``batching``).
    """

    kind = "generative"

    def __init__(self, model: str, *, task: str = "causal-lm", metrics: ServerMetrics | None = None,
                 device: str = "cpu", max_batch: int = 64, max_queue: int = 1024,
                 batching: Batching = "mixed", quantize: str | None = None) -> None:
        self.base_name, self.task = model, task
        self.model, self.tokenizer = load_model(model, task=task, device=str(resolve_device(device)),
                                                quantize=quantize)
        self.model.eval()
        self.metrics = metrics or ServerMetrics()
        self._adapters: dict[str, dict[str, Any]] = {}
        self._templates: dict[str, str] = {}
        self._lock = threading.Lock()
        self.created = int(time.time())
        self.engine = GenerationEngine(self.model, self.tokenizer, max_batch=max_batch, max_queue=max_queue,
                                       batching=batching, exclusive=self._alone, metrics=self.metrics)

    @property
    def context_limit(self) -> int:
        """Most tokens (prompt and reply) one sequence may hold."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return DEFAULT_CONTEXT

    def _alone(self, name: str | None) -> bool:
        """Adapters that add virtual tokens cannot share a KV cache with others."""
        if name is None or not has_state(self.model):
            return False
        config = get_state(self.model).configs.get(name)
        return config is not None and get_method(config).layer_class is None

    # --- adapters ----------------------------------------------------------------------------

    def adapters(self) -> dict[str, dict[str, Any]]:
        """Loaded adapters by name: ``path``, ``task``, ``method``.

        Read without the lock (the event loop calls it for every request, while a load may hold the
        lock until the engine finishes a step); an adapter enters the table only once fully loaded.
        """
        return dict(self._adapters)

    def has(self, name: str) -> bool:
        """Whether ``name`` is a loaded adapter."""
        return name in self._adapters

    def load_adapter(self, name: str, folder: Path) -> dict[str, Any]:
        """Load the adapter in ``folder`` as ``name`` (between decoding steps); returns its description."""
        with self._lock:
            if name in self._adapters or name == self.base_name:
                raise BadRequest(f"a model called {name!r} is already loaded; unload it first or pick another "
                                 "name", param="lora_name", code="adapter_exists")
            try:
                metadata = adapter_metadata(folder)
                task = adapter_task(metadata, folder)
            except Exception as err:  # noqa: BLE001 - reported to the client
                raise load_refusal(folder, err) from err
            if task != self.task:
                raise BadRequest(f"the adapter in {folder} is for the {task} task; this server generates "
                                 f"({self.task}) with {self.base_name}", param="lora_path", code="wrong_task")
            try:
                self.engine.call(lambda: load_adapter(self.model, folder, name=name)).result()
            except Exception as err:  # noqa: BLE001 - reported to the client
                raise load_refusal(folder, err) from err
            template = adapter_chat_template(folder)
            if template:
                self._templates[name] = template
            info = {"name": name, "path": str(folder), "task": task,
                    "method": metadata.get("method") or metadata.get("peft_type")}
            self._adapters[name] = info
            return info

    def unload_adapter(self, name: str) -> None:
        """Take ``name`` off the list now; its weights go once no request uses it."""
        with self._lock:
            if name not in self._adapters:
                raise NotFound(f"no adapter called {name!r} is loaded; loaded: {sorted(self._adapters)}",
                               param="lora_name", code="model_not_found")
            del self._adapters[name]
            self._templates.pop(name, None)
        self._delete_when_unused(name)

    def _delete_when_unused(self, name: str) -> None:
        """Delete ``name`` on the engine's thread at the first turn no request uses it (tried once a turn)."""
        def attempt() -> None:
            if name in self._adapters:  # loaded again meanwhile under the same name: keep it
                return
            if self.engine.in_use(name):  # requests still run: the engine keeps turning, try again next turn
                self.engine.call(attempt)
                return
            delete_adapter(self.model, name)

        self.engine.call(attempt)

    # --- prompts -----------------------------------------------------------------------------

    def completion_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a completion prompt (a text, continued as it is, or token ids)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return list(prompt)

    def chat_ids(self, adapter: str | None, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation in the adapter's chat template, else the base's (else the plain format)."""
        template = self._templates.get(adapter) if adapter is not None else None
        if template is None:
            return chat_format.prompt_ids(self.tokenizer, messages)
        text = self.tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_stops(self) -> tuple[str, ...]:
        """Stop strings the prompt format implies (as offline chat adds them)."""
        return chat_format.default_stops(self.tokenizer)

    def check_vocabulary(self, ids: Sequence[int], param: str) -> None:
        """Token ids a client sent must exist in the vocabulary."""
        size = len(self.tokenizer)
        bad = [i for i in ids if not isinstance(i, int) or i < 0 or i >= max(size, self.model.config.vocab_size)]
        if bad:
            raise BadRequest(f"token ids must be in [0, {size}); got {bad[:5]}", param=param, code="invalid_tokens")

    def close(self, wait: bool = True) -> None:
        """Finish accepted requests (with ``wait``) and stop the engine."""
        self.engine.close(wait=wait)
