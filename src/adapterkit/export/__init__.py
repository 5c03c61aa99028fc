"""Adapters written for tools that know nothing about adapterkit: merged HF folders, llama.cpp GGUF."""

from adapterkit.export.gguf_lora import (
    GGUF_ARCHES,
    export_gguf_lora,
    export_gguf_lora_folder,
    gguf_lora_tensors,
)
from adapterkit.export.hf_folder import export_merged

__all__ = ["export_merged", "GGUF_ARCHES", "export_gguf_lora", "export_gguf_lora_folder", "gguf_lora_tensors"]
