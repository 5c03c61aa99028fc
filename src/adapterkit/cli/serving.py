"""``adapterkit serve``: many adapters on one base model behind an OpenAI-compatible HTTP server."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from adapterkit.errors import UsageError


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """``["name=DIR", "DIR"]`` -> ``{name: DIR}``; a bare folder is named after the name saved in it."""
    from adapterkit.models.adapters import adapter_metadata

    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder = spec
            name = adapter_metadata(folder).get("name") or Path(folder).name
        if not name or not folder:
            raise UsageError(f"--adapter takes NAME=DIR (or a folder), got {spec!r}")
        if name in adapters:
            raise UsageError(f"two --adapter flags are both called {name!r}; give each its own NAME=DIR")
        adapters[name] = Path(folder)
    return adapters


def serve(
    *,
    model: str | None = None,
    adapter: list[str] | None = None,
    adapter_root: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 64,
    max_tokens: int = 1024,
    max_inputs: int = 256,
    max_body_bytes: int = 1 << 20,
    max_queue: int = 1024,
    batching: Literal["mixed", "same-adapter", "single"] = "mixed",
    device: str = "auto",
    task: str | None = None,
    quantize: Literal["int8", "nf4", "fp4"] | None = None,
) -> int:
    """Serve a base model and its adapters over HTTP with OpenAI's API (vLLM's LoRA contract) plus
    /v1/classify, /v1/tag and /v1/answer for encoder adapters.

    Args:
        model: the base model: an alias (smollm2-135m, minilm) or a local folder; default: the base
            named in the first --adapter.
        adapter: adapters to load at start, NAME=DIR (repeatable); requests name them in "model".
        adapter_root: the folder POST /v1/load_lora_adapter may load from (without it, runtime loading is refused).
        host: the address to listen on (127.0.0.1: this machine only).
        port: the port to listen on.
        api_key: require "Authorization: Bearer KEY" on /v1 requests (default: the ADAPTERKIT_API_KEY variable).
        max_batch: most sequences decoded together in one step.
        max_tokens: most tokens one request may generate.
        max_inputs: most texts per classify/tag request, and most prompts x n per completion request.
        max_body_bytes: largest request body accepted (413 beyond).
        max_queue: most requests waiting before the server answers 503 with Retry-After.
        batching: mixed (requests for any adapters share each step), same-adapter or single (for comparisons).
        device: where the model runs: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps.
        task: the base's task when neither the adapters nor the model's config say.
        quantize: store the base's linear layers as int8, nf4 or fp4 (an encoder server's task models share them).
    """
    import os

    from adapterkit.models.adapters import adapter_metadata, base_model_of
    from adapterkit.serve.config import ServerConfig
    from adapterkit.serve.run import serve as run_server

    adapters = parse_adapters(adapter or [])
    if model is None:
        if not adapters:
            raise UsageError("give --model NAME|DIR, or --adapter NAME=DIR to serve its base model")
        model = base_model_of(adapter_metadata(next(iter(adapters.values()))))
    config = ServerConfig(model=model, adapters=adapters, adapter_root=adapter_root,
                          api_key=api_key or os.environ.get("ADAPTERKIT_API_KEY") or None, max_batch=max_batch,
                          max_tokens=max_tokens, max_inputs=max_inputs, max_body_bytes=max_body_bytes,
                          max_queue=max_queue, batching=batching, device=device, task=task, quantize=quantize)
    print(f"serving {model} with {len(adapters)} adapter(s) on http://{host}:{port}/v1 "
          f"(OpenAPI schema at /openapi.json, docs at /docs)", flush=True)
    run_server(config, host=host, port=port)
    return 0
