"""The settings of one server, as ``adapterkit serve``'s flags give them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapterkit.serve.engine import BATCHING_MODES, Batching


@dataclass
class ServerConfig:
    """What ``create_app`` builds.

    Attributes:
        model: the base model (an alias such as ``smollm2-135m`` or ``minilm``, or a local folder);
            requests name it in ``model`` to use the base without an adapter.
        adapters: adapters loaded at start, ``{name: folder}``.
        adapter_root: the only folder runtime ``load_lora_adapter`` may read from (none: refused).
        api_key: when set, ``/v1`` requests need ``Authorization: Bearer KEY``.
        max_batch: most sequences decoded together (and most inputs an encoder batch holds).
        max_tokens: most tokens one request may ask to generate.
        max_inputs: most texts in one ``/v1/classify`` or ``/v1/tag`` request, and most
            prompts x ``n`` in one completion request.
        max_body_bytes: largest request body accepted (413 beyond).
        max_queue: most requests waiting; beyond it the server answers 503 with ``Retry-After``.
        batching: ``mixed`` (requests of any adapters share each decoding step), ``same-adapter``
            or ``single`` (for comparisons in ``bench/serve.py``).
        device: where the model runs (``auto``: CUDA when present, else ``cpu``; ``cuda``, ``cuda:N``, ``mps``).
        task: the base's task when no adapter says (``None``: found from the model's config).
    """

    model: str
    adapters: dict[str, Path] = field(default_factory=dict)
    adapter_root: Path | None = None
    api_key: str | None = None
    max_batch: int = 64
    max_tokens: int = 1024
    max_inputs: int = 256
    max_body_bytes: int = 1 << 20
    max_queue: int = 1024
    batching: Batching = "mixed"
    device: str = "auto"
    task: str | None = None
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        for name, value in (("max_batch", self.max_batch), ("max_tokens", self.max_tokens),
                            ("max_inputs", self.max_inputs), ("max_body_bytes", self.max_body_bytes),
                            ("max_queue", self.max_queue)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.adapters = {name: Path(folder) for name, folder in self.adapters.items()}
        if self.adapter_root is not None:
            self.adapter_root = Path(self.adapter_root)
