"""Generation for many requests and adapters at once, scheduled one decoding step at a time.

One thread owns the model. Each turn of its loop it (1) runs control work
queued by the HTTP side (loading and unloading adapters) between steps,
(2) admits waiting requests while the batch has room, prefilling their
prompts together and joining their KV caches to the running batch, and
(3) decodes one token for every running row, each row through its own
adapter by per-example routing (``adapterkit.route``), then lets the rows
that finished leave. A request arriving while others generate joins at the
next step; a finished one leaves at once (iteration-level scheduling, as in
vLLM, LoRAX and Punica).

Two batching modes exist besides ``"mixed"`` for comparison in
``bench/serve.py``: ``"same-adapter"`` (a batch holds one adapter's requests
at a time) and ``"single"`` (one request at a time, what a server around
PEFT's ``set_adapter`` does).

Requests that cannot share a KV cache with others run alone, through the
offline path (``tasks.generation.generate_ids``), between steps: adapters that
add virtual tokens (prefix and prompt tuning) and encoder-decoder models.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.core import route, use
from adapterkit.core.plan import Sum
from adapterkit.serve.errors import APIError, Overloaded
from adapterkit.serve.kv_rows import RowBatch, joinable
from adapterkit.serve.metrics import ServerMetrics
from adapterkit.serve.sampling import SamplingParams, next_tokens, row_generator
from adapterkit.serve.text_stream import TextStream
from adapterkit.tasks.generation import (
    GenerationOptions,
    _cache_keyword,
    generate_ids,
    pad_prompts,
    stop_token_ids,
)

log = logging.getLogger(__name__)

Batching = Literal["mixed", "same-adapter", "single"]
BATCHING_MODES: tuple[str, ...] = ("mixed", "same-adapter", "single")


@dataclass(frozen=True)
class TextEvent:
    """New text of choice ``index``."""

    index: int
    text: str


@dataclass(frozen=True)
class FinishEvent:
    """Choice ``index`` ended: ``reason`` is ``"stop"`` (end of sequence or a stop string) or ``"length"``."""

    index: int
    reason: str
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class DoneEvent:
    """Every choice of the request has ended."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed after it was accepted."""

    error: APIError


Event = TextEvent | FinishEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class GenerationRequest:
    """One request: an adapter (``None`` for the base), a tokenized prompt, settings and ``n`` choices.

    ``emit`` receives the request's events, from the engine's thread.
    Setting ``cancelled`` (a client that went away) drops its rows at the next step.
    """

    adapter: str | None
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    n: int = 1
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    finished: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class _Row:
    """One choice of a request being decoded."""

    request: GenerationRequest
    index: int
    text: TextStream
    generator: torch.Generator | None


class GenerationEngine:
    """Runs generation requests for any mix of adapters on one model, a decoding step at a time.

    Args:
        model: a decoder-only (or encoder-decoder) model carrying the adapters.
        tokenizer: its tokenizer (a pad token set).
        max_batch: most rows (choices) decoded together.
        max_queue: most requests waiting; beyond it ``submit`` raises ``Overloaded``.
        batching: ``"mixed"`` (default), ``"same-adapter"`` or ``"single"``; see the module notes.
        exclusive: adapter names whose requests must run alone (virtual-token adapters); a
            callable, asked at admission, so adapters loaded later are covered.
        metrics: where batch sizes and token counts go.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_batch: int = 64,
                 max_queue: int = 1024, batching: Batching = "mixed",
                 exclusive: Callable[[str | None], bool] = lambda name: False,
                 metrics: ServerMetrics | None = None) -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.batching = max_batch, max_queue, batching
        self.metrics = metrics or ServerMetrics()
        self.device = next(model.parameters()).device
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self._exclusive = exclusive
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_name = _cache_keyword()
        self._waiting: deque[GenerationRequest] = deque()
        self._controls: list[tuple[Callable[[], Any], Future]] = []
        self._rows: list[_Row] = []
        self._batch = RowBatch()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="adapterkit-generation", daemon=True)
        self._thread.start()

    # --- what the HTTP side calls -----------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; its events arrive through ``request.emit``."""
        if request.n > self.max_batch:
            raise ValueError(f"n={request.n} is more than the {self.max_batch} rows a batch holds")
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down; send the request to another instance", retry_after=5)
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting, the most this server queues; "
                                 "try again shortly")
            self._waiting.append(request)
            self.metrics.queue_depth.labels("generation").set(len(self._waiting))
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine's thread between two decoding steps; its result comes in the future."""
        future: Future = Future()
        with self._cond:
            if not self._thread.is_alive():
                future.set_exception(RuntimeError("the generation engine has stopped"))
                return future
            self._controls.append((fn, future))
            self._cond.notify()
        return future

    def in_use(self, adapter: str) -> bool:
        """Whether a waiting or running request uses ``adapter``."""
        with self._cond:
            return (any(r.adapter == adapter for r in self._waiting)
                    or any(row.request.adapter == adapter for row in self._rows))

    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""
        return len(self._waiting)

    def running(self) -> int:
        """Rows being decoded now."""
        return len(self._rows)

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``wait``, finish every accepted one first."""
        with self._cond:
            self._closing = True
            if not wait:
                for request in self._waiting:
                    request.emit(ErrorEvent(Overloaded("the server stopped before this request ran")))
                self._waiting.clear()
                for row in self._rows:
                    row.request.cancelled = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._rows or self._controls or self._closing):
                    self._cond.wait()
                controls, self._controls = self._controls, []
                if self._closing and not self._waiting and not self._rows and not controls:
                    return
            for fn, future in controls:
                self._run_control(fn, future)
            with self._cond:
                admitted = self._admit()
                self.metrics.queue_depth.labels("generation").set(len(self._waiting))
            try:
                self._prefill(admitted)
                if self._rows:
                    self._step()
            except Exception as err:  # an internal failure: fail the rows involved, keep serving
                log.exception("generation step failed")
                self._fail_all(err, admitted)

    @staticmethod
    def _run_control(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            future.set_exception(err)

    def _admit(self) -> list[GenerationRequest]:
        """Waiting requests that join the batch now (under the lock), by the batching mode."""
        room = self.max_batch - len(self._rows)
        if self.batching == "single" and self._rows:
            return []
        adapter = self._rows[0].request.adapter if self._rows else (self._waiting[0].adapter if self._waiting
                                                                     else None)
        admitted, left = [], deque()
        while self._waiting:
            request = self._waiting.popleft()
            if request.cancelled:
                continue
            fits = request.n <= room and not (self.batching == "same-adapter" and request.adapter != adapter)
            if fits and self.batching == "single" and admitted:
                fits = False
            if fits:
                admitted.append(request)
                room -= request.n
            else:
                left.append(request)
        self._waiting = left
        return admitted

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        shared = []
        for request in requests:
            if self.encoder_decoder or self._exclusive(request.adapter):
                self._run_alone(request)
            else:
                shared.append(request)
        if not shared:
            return
        rows = [_Row(r, i, TextStream(self.tokenizer, r.params.stop), row_generator(r.params, i, self.device))
                for r in shared for i in range(r.n)]
        prompts = [row.request.prompt for row in rows]
        ids, mask = pad_prompts(prompts, self.tokenizer.pad_token_id, left=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(rows, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
        self.metrics.observe_batch("prefill", len(rows), len({row.request.adapter for row in rows}))
        for request in shared:
            self.metrics.prompt_tokens.labels(self._label(request)).inc(len(request.prompt))
        if not joinable(cache):
            raise RuntimeError(f"{type(self.model).__name__}'s KV cache has layers rows cannot join "
                               f"({sorted({type(layer).__name__ for layer in cache.layers})})")
        self._batch.join(cache, mask)
        self._rows.extend(rows)
        self._advance(rows, logits, first_row=len(self._rows) - len(rows))

    def _step(self) -> None:
        """One new token for every running row."""
        started = time.perf_counter()
        last = torch.tensor([row.text.tokens[-1] for row in self._rows], dtype=torch.long, device=self.device)
        mask = torch.nn.functional.pad(self._batch.mask, (0, 1), value=1)
        logits = self._forward(self._rows, self._batch.cache, input_ids=last[:, None], attention_mask=mask,
                               position_ids=self._batch.positions[:, None])
        self._batch.grow()
        self.metrics.observe_batch("decode", len(self._rows), len({row.request.adapter for row in self._rows}))
        self._advance(self._rows, logits, first_row=0)
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            self.metrics.tokens_per_second.set(len(logits) / elapsed)

    def _forward(self, rows: list[_Row], cache: DynamicCache | None, **inputs: Any) -> torch.Tensor:
        """Float32 logits of the last position of each row, each row through its own adapter;
        ``cache`` (updated in place) holds the rows' keys and values."""
        inputs[self._cache_name] = cache
        if self._keep_logits:
            inputs["logits_to_keep"] = 1
        with torch.no_grad(), self._plan([row.request.adapter for row in rows]):
            output = self.model(use_cache=True, **inputs)
        return output.logits[:, -1].to(dtype=torch.float32)

    @contextlib.contextmanager
    def _plan(self, adapters: list[str | None]) -> Iterator[None]:
        """One adapter for the whole batch runs it directly; a mix is routed row by row."""
        distinct = set(adapters)
        if len(distinct) == 1:
            (only,) = distinct
            with use(self.model, only if only is not None else Sum()):
                yield
        else:
            # adapters change only through load/unload on this thread: no in-place writes to look for
            with route(self.model, adapters, weights_fixed=True):
                yield

    def _advance(self, rows: list[_Row], logits: torch.Tensor, first_row: int) -> None:
        """Choose each row's next token, send its text, and let finished rows leave the batch."""
        tokens = next_tokens(logits, [row.request.params for row in rows], [row.generator for row in rows])
        finished: set[int] = set()
        for offset, (row, token) in enumerate(zip(rows, tokens)):
            request = row.request
            if request.cancelled:
                finished.add(first_row + offset)
                continue
            new = row.text.add(token)
            request.completion_tokens += 1
            self.metrics.tokens.labels(self._label(request)).inc()
            if new:
                request.emit(TextEvent(row.index, new))
            reason = self._finish_reason(row, token)
            if reason is not None:
                finished.add(first_row + offset)
                self._finish(row, reason)
        if finished:
            keep = [i for i in range(len(self._rows)) if i not in finished]
            self._rows = [self._rows[i] for i in keep]
            self._batch.keep(keep)
        self.metrics.running.set(len(self._rows))

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        if token in self.stop_ids or row.text.stopped:
            return "stop"
        if len(row.text.tokens) >= row.request.params.max_tokens:
            return "length"
        return None

    def _finish(self, row: _Row, reason: str) -> None:
        request = row.request
        rest = row.text.finish()
        if rest:
            request.emit(TextEvent(row.index, rest))
        request.emit(FinishEvent(row.index, reason, tuple(row.text.tokens)))
        request.finished += 1
        if request.finished == request.n:
            request.emit(DoneEvent(len(request.prompt), request.completion_tokens))

    def _run_alone(self, request: GenerationRequest) -> None:
        """A request that cannot share the KV cache: the offline generation path, one choice at a time."""
        params = request.params
        options = GenerationOptions(max_new_tokens=params.max_tokens,
                                    temperature=0.0 if params.greedy else params.temperature,
                                    top_p=params.top_p, stop=params.stop, seed=params.seed)
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        self.metrics.prompt_tokens.labels(self._label(request)).inc(len(request.prompt))
        for index in range(request.n):
            if params.seed is not None:
                options = GenerationOptions(**{**vars(options), "seed": params.seed + index})
            with use(self.model, request.adapter if request.adapter is not None else Sum()):
                out = generate_ids(self.model, self.tokenizer, ids, torch.ones_like(ids), options)
            self.metrics.observe_batch("alone", 1, 1)
            tokens = out[0].tolist()
            text = TextStream(self.tokenizer, params.stop)
            reason = "length"
            for token in tokens:
                new = text.add(token)
                if new:
                    request.emit(TextEvent(index, new))
                if token in self.stop_ids or text.stopped:
                    reason = "stop"
                    break
            request.completion_tokens += len(text.tokens)
            self.metrics.tokens.labels(self._label(request)).inc(len(text.tokens))
            row = _Row(request, index, text, None)
            self._finish(row, reason)

    def _fail_all(self, err: Exception, admitted: list[GenerationRequest]) -> None:
        """After an internal error: every running request, and every one admitted this turn that has not
        finished (it may not have reached the batch yet), gets an error event; the batch starts afresh."""
        failed = {id(row.request): row.request for row in self._rows}
        failed.update((id(r), r) for r in admitted if r.finished < r.n)
        for request in failed.values():
            request.emit(ErrorEvent(APIError(f"generation failed inside the server: {err}", status=500,
                                             code="internal_error")))
        self._rows = []
        self._batch = RowBatch()

    def _label(self, request: GenerationRequest) -> str:
        return request.adapter if request.adapter is not None else "(base)"


_ids = itertools.count()


def request_id(prefix: str) -> str:
    """A unique id for a response (``cmpl-...``, ``chatcmpl-...``)."""
    return f"{prefix}-{int(time.time())}{next(_ids):06d}"
