"""Drop two import-time log lines that say nothing about what adapterkit does.

transformers imports torchao whenever it is installed (the ``quantize``
extra). On a machine without CUDA, torchao then logs one "Failed to load"
warning per CUDA kernel library it ships, and torch one line per enum torchao
registers. Narrow filters drop exactly those records; the loggers' levels and
everything else they say are left alone.
"""

from __future__ import annotations

import logging


class _Drop(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


logging.getLogger("torchao").addFilter(_Drop("Failed to load", "Skipping import of cpp extensions"))
logging.getLogger("torch.utils._pytree").addFilter(_Drop("register_constant()"))
