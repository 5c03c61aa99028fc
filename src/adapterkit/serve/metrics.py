"""What the server counts, in Prometheus' format (``GET /metrics``).

Each application gets its own registry, so several servers in one process
(tests) do not share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Requests, errors, queue depth, batch sizes and generated tokens, per adapter where it applies."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("adapterkit_requests", "Requests answered, by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.errors = Counter("adapterkit_errors", "Requests refused or failed, by endpoint and status",
                              ["endpoint", "status"], registry=self.registry)
        self.queue_depth = Gauge("adapterkit_queue_depth", "Requests waiting to be scheduled", ["kind"],
                                 registry=self.registry)
        self.running = Gauge("adapterkit_running_rows", "Sequences being decoded together now",
                             registry=self.registry)
        self.batch_size = Histogram("adapterkit_batch_size", "Rows per forward pass", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_adapters = Histogram("adapterkit_batch_adapters", "Distinct adapters per forward pass",
                                        ["kind"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.tokens = Counter("adapterkit_generated_tokens", "Tokens generated, by model", ["model"],
                              registry=self.registry)
        self.prompt_tokens = Counter("adapterkit_prompt_tokens", "Prompt tokens read, by model", ["model"],
                                     registry=self.registry)
        self.tokens_per_second = Gauge("adapterkit_tokens_per_second",
                                       "Tokens generated per second over the last decoding step",
                                       registry=self.registry)
        self.latency = Histogram("adapterkit_request_seconds", "Time from arrival to the last byte, by endpoint",
                                 ["endpoint"], registry=self.registry)

    def observe_batch(self, kind: str, rows: int, adapters: int) -> None:
        """One forward pass of ``rows`` rows over ``adapters`` distinct adapters."""
        self.batch_size.labels(kind).observe(rows)
        self.batch_adapters.labels(kind).observe(adapters)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
