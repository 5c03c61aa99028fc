"""Batches of encoder requests: their kinds, per-adapter results of a routed batch, and micro-batching.

The kinds of request (``classify``, ``tag``, ``answer``) and the helpers that
turn one routed batch's raw outputs into each adapter's results live here,
below :mod:`adapterkit.serve.encoder`, which uses them.

:class:`EncoderBatcher` owns one background thread. Requests wait in a queue;
the thread takes the oldest, then keeps collecting for up to ``max_wait_s``
or until ``max_batch`` items are waiting, and runs what it collected through
the :class:`~adapterkit.serve.encoder.EncoderHost` together, one host call
per kind of request (the host groups by task model and routes by adapter).

One bad request never fails the others: each is validated alone when it is
submitted and again when its batch starts (an adapter may have been unloaded
in between), and if a joint run still fails, each request of it is rerun on
its own so the error reaches only the request that caused it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from adapterkit.data.examples import TaskData
from adapterkit.errors import UsageError
from adapterkit.serve.errors import APIError, Overloaded
from adapterkit.tasks.base import Feature, Task

if TYPE_CHECKING:
    from adapterkit.serve.encoder import EncoderHost

log = logging.getLogger(__name__)

Kind = Literal["classify", "tag", "answer"]

# The task each kind of request runs.
KIND_TASKS: dict[str, str] = {"classify": "classification", "tag": "token-classification",
                              "answer": "question-answering"}
# The text fields an item of each kind has after its adapter name.
ITEM_FIELDS: dict[str, tuple[str, ...]] = {"classify": ("text",), "tag": ("text",),
                                           "answer": ("question", "context")}


# --- one routed batch's outputs, per adapter ------------------------------------------------
def classification_result(logits: np.ndarray, labels: list[str] | None) -> dict[str, Any]:
    """``{"label", "probs", "num_classes"}`` from one row of logits; ``probs`` in label order (float64 softmax)."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = int(probs.argmax())
    label = labels[best] if labels and best < len(labels) else str(best)
    return {"label": label, "probs": [float(p) for p in probs], "num_classes": int(len(probs))}


def entity_result(entity: Any) -> dict[str, Any]:
    """A ``tasks.token_classification.Entity`` as ``{"type", "text", "start", "end", "score"}``."""
    return {"type": entity.type, "text": entity.text, "start": int(entity.start), "end": int(entity.end),
            "score": float(entity.score)}


def decode_rows(task: Task, data: TaskData, features: Sequence[Feature], outputs: Sequence[Any],
                rows: list[int], labels: list[str] | None) -> list[Any]:
    """``task.decode`` of examples ``rows`` of ``data`` alone, with the label names ``labels``.

    A routed batch decodes with its task model's labels; an adapter whose
    labels have other names gets its own rows decoded again with them.
    """
    local = {row: k for k, row in enumerate(rows)}
    picked = [(f, o) for f, o in zip(features, outputs) if f["_example"] in local]
    sub = TaskData(data.task, [data.examples[row] for row in rows], labels, data.source, dict(data.columns))
    return task.decode(sub, [{**f, "_example": local[f["_example"]]} for f, _ in picked], [o for _, o in picked])


class Results(list):
    """Per-item results in item order, with ``item_tokens``: the input tokens the model read for each item."""

    def __init__(self, values: Sequence[Any] = (), item_tokens: Sequence[int] = ()) -> None:
        super().__init__(values)
        self.item_tokens = list(item_tokens)

    @property
    def tokens(self) -> int:
        """Input tokens of all the items (a request's ``usage.prompt_tokens``)."""
        return sum(self.item_tokens)

    def part(self, start: int, stop: int) -> "Results":
        """Items ``start:stop`` (one request's share of a joint batch)."""
        return Results(self[start:stop], self.item_tokens[start:stop])


# --- micro-batching ---------------------------------------------------------------------

# on_batch(kind, number of items, adapter names in the batch): a metrics hook
BatchHook = Callable[[str, int, list[str]], None]


@dataclass
class _Request:
    kind: Kind
    items: list[tuple]
    future: Future


class EncoderBatcher:
    """Collects submitted encoder requests into joint runs on ``host``.

    Args:
        host: the encoder host that runs the batches.
        max_batch: items a batch collects before it runs without waiting longer
            (one request larger than that still runs whole; the host chunks it).
        max_wait_s: how long the first request of a batch waits for others.
        max_queue: the most requests waiting; past it ``submit`` raises ``Overloaded``.
        on_batch: called after each host call with ``(kind, items, adapters)``.
    """

    def __init__(self, host: "EncoderHost", max_batch: int = 64, max_wait_s: float = 0.005,
                 max_queue: int = 4096, on_batch: BatchHook | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise UsageError(f"max_batch and max_queue must be 1 or more and max_wait_s 0 or more; got "
                             f"max_batch={max_batch}, max_queue={max_queue}, max_wait_s={max_wait_s}")
        self.host = host
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: deque[_Request] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="encoder-batcher", daemon=True)
        self._thread.start()

    def submit(self, kind: Kind, items: Sequence[tuple]) -> Future:
        """Queue one request; the future resolves to its :class:`Results` in item order.

        A request the host refuses (unknown adapter, wrong task, malformed
        item) gets its ``APIError`` on the future and is never batched. Raises
        ``Overloaded`` when the queue is full or the batcher is closed.
        """
        if self._closed:
            raise Overloaded("server is shutting down")
        future: Future = Future()
        items = list(items)
        try:
            self.host.validate(kind, items)
        except APIError as err:
            future.set_exception(err)
            return future
        if not items:
            future.set_result(Results())
            return future
        with self._ready:
            if self._closed:
                raise Overloaded("server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"the encoder queue is full ({self.max_queue} requests waiting); retry shortly")
            self._queue.append(_Request(kind, items, future))
            self._ready.notify()
        return future

    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch running now)."""
        with self._ready:
            return len(self._queue)

    def close(self, wait: bool = True) -> None:
        """Refuse new requests, finish the queued ones, then stop the thread (joined when ``wait``)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        if wait:
            self._thread.join()

    # --- the worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._collect()
            if not batch:
                return
            try:
                self._run(batch)
            except BaseException as err:  # never leave a caller waiting, whatever happened
                log.exception("encoder batch failed")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(err)

    def _collect(self) -> list[_Request]:
        """The next batch: the oldest request and those that arrive within ``max_wait_s`` (empty: stop)."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return []
            batch = [self._queue.popleft()]
            size = len(batch[0].items)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                if self._queue:
                    batch.append(self._queue.popleft())
                    size += len(batch[-1].items)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._ready.wait(left)
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """Run the batch's requests of each kind together; hand each request its slice of the results."""
        runnable = [r for r in batch if r.future.set_running_or_notify_cancel()]
        with self.host.lock:  # nothing is unloaded between the checks and the run
            for kind in KIND_TASKS:
                requests = [r for r in runnable if r.kind == kind and self._still_valid(r)]
                if requests:
                    self._run_kind(kind, requests)  # type: ignore[arg-type]

    def _still_valid(self, request: _Request) -> bool:
        try:
            self.host.validate(request.kind, request.items)
        except APIError as err:
            request.future.set_exception(err)
            return False
        return True

    def _run_kind(self, kind: Kind, requests: list[_Request]) -> None:
        items = [item for r in requests for item in r.items]
        try:
            results = self.host.run(kind, items)
        except Exception as err:
            if len(requests) == 1:
                requests[0].future.set_exception(err)
                return
            log.warning("a joint %s batch of %d requests failed (%s); running them one by one", kind,
                        len(requests), err)
            for request in requests:
                self._run_kind(kind, [request])
            return
        self._report(kind, items)
        start = 0
        for request in requests:
            request.future.set_result(results.part(start, start + len(request.items)))
            start += len(request.items)

    def _report(self, kind: str, items: list[tuple]) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(kind, len(items), sorted({item[0] for item in items}))
        except Exception:  # a metrics hook must not fail requests
            log.exception("the on_batch hook failed")
