"""Adapters written in the formats of other tools (llama.cpp's GGUF adapters, ...)."""

from adapterkit.export.gguf_lora import (
    GGUF_ARCHES,
    export_gguf_lora,
    export_gguf_lora_folder,
    gguf_lora_tensors,
)

__all__ = ["GGUF_ARCHES", "export_gguf_lora", "export_gguf_lora_folder", "gguf_lora_tensors"]
