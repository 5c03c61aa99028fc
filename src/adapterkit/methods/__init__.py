"""Built-in adapter methods; importing this package registers them all."""

from adapterkit.methods.lora import LoraConfig

__all__ = ["LoraConfig"]
