"""Building the host a configuration asks for, and running the server with uvicorn."""

from __future__ import annotations

import logging
from typing import Any

from adapterkit.serve.config import ServerConfig
from adapterkit.serve.hosts import server_task
from adapterkit.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


def build_host(config: ServerConfig, metrics: ServerMetrics) -> Any:
    """The generative host (causal LM / seq2seq) or the encoder host, with the start-up adapters loaded."""
    task = server_task(config.model, config.adapters, config.task)
    if task == "encoder":
        from adapterkit.serve.encoder import EncoderHost
        from adapterkit.serve.encoder_batching import EncoderBatcher

        host: Any = EncoderHost(config.model, device=config.device, max_batch=config.max_batch,
                                quantize=config.quantize)
        host.batcher = EncoderBatcher(host, max_batch=config.max_batch, max_queue=config.max_queue,
                                      on_batch=lambda kind, size, adapters: metrics.observe_batch(
                                          kind, size, len(set(adapters))))
    else:
        from adapterkit.serve.generative import GenerativeHost

        host = GenerativeHost(config.model, task=task, metrics=metrics, device=config.device,
                              max_batch=config.max_batch, max_queue=config.max_queue, batching=config.batching,
                              quantize=config.quantize)
    try:
        for name, folder in config.adapters.items():
            host.load_adapter(name, folder)
    except BaseException:
        host.close(False)
        raise
    return host


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 30.0) -> None:
    """Serve ``config`` on ``host:port`` until interrupted; in-flight requests finish before it stops."""
    import uvicorn

    from adapterkit.serve.app import create_app

    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout)
