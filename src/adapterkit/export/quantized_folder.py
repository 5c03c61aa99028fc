"""Write a merged model whose base is quantised as a transformers folder that stays quantised.

The folder is in transformers' bitsandbytes format, so plain
``AutoModelFor<Task>.from_pretrained(folder)`` (with bitsandbytes installed)
loads it quantised, without adapterkit:

- ``nf4`` / ``fp4`` layers (bitsandbytes ``Linear4bit``) are written as they
  are stored: packed weights and their quantisation state; loading gives
  back the same layers, bit for bit.
- ``int8`` layers (torchao, per-output-channel symmetric) are written as
  LLM.int8 weights: the same int8 values, and ``SCB`` = 127 x the channel's
  scale, which is how bitsandbytes stores a row's absolute maximum. Loaded,
  the weights dequantise to exactly ours; bitsandbytes' LLM.int8 matmul then
  computes with int8 activations (and float outliers), so outputs differ from
  ours by that activation rounding.

Before writing, ``merge_report`` measures what merging into the quantised base
cost: the requantisation error of the merged weights and the change of the
outputs on a probe batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.core.atomic import atomic_folder
from adapterkit.errors import UsageError

PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.",
               "Small adapters change what a large frozen model computes.")


def probe_outputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The model's first output (logits) on a fixed probe batch of two sentences, in float32."""
    batch = tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    with torch.no_grad():
        output = model(**inputs)
    first = output.logits if hasattr(output, "logits") and output.logits is not None else output[0]
    return first.float().cpu()


def output_change(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """How far ``after`` moved from ``before``: the largest absolute change, and relative to before's largest value."""
    change = float((after - before).abs().max())
    return {"max_abs_change": change, "max_relative_change": change / max(float(before.abs().max()), 1e-30)}


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json`` that makes transformers load this model quantised."""
    from adapterkit.models.quantize import is_quantized_module, model_quantization

    info = model_quantization(model)
    if info is None:
        raise UsageError("the model's base is not quantised; write it with export_merged (a float folder)")
    # every other nn.Linear stays float: name them so transformers does not quantise them on load
    skip = sorted({path for path, module in model.named_modules()
                   if isinstance(module, nn.Linear) and not is_quantized_module(module)})
    config: dict[str, Any] = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": skip,
                              "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}
    if info.scheme == "int8":
        config.update(load_in_8bit=True, load_in_4bit=False, llm_int8_threshold=6.0)
    else:
        config.update(load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type=info.scheme,
                      bnb_4bit_use_double_quant=info.double_quant)
    return config


def int8_parts(weight: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchao int8 weight's int8 values ``(out, in)`` and per-row scales ``(out,)``: weight = values x scale.

    Raises ``UsageError`` for an int8 layout LLM.int8 cannot hold (not one symmetric scale per output row).
    """
    block = list(getattr(weight, "block_size", []))
    zero = getattr(weight, "zero_point", None)
    if block != [1, weight.shape[1]] or (zero is not None and bool(zero.any())):
        raise UsageError(f"{layer}: int8 weights with block size {block} and {'a' if zero is not None else 'no'} "
                         "zero point cannot be written in bitsandbytes' per-row format; export in float (--dtype)")
    return weight.qdata.to(torch.int8), weight.scale.float().reshape(-1)


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in transformers' bitsandbytes layout (each shared tensor once)."""
    from adapterkit.models.quantize import _is_torchao

    int8_layers = {path for path, module in model.named_modules()
                   if isinstance(module, nn.Linear) and _is_torchao(module.weight)}
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        layer = key.removesuffix(".weight")
        if layer in int8_layers and key.endswith(".weight"):
            data, scale = int8_parts(tensor, layer)
            state[key] = data.contiguous().cpu()
            state[layer + ".SCB"] = (scale * 127.0).contiguous().cpu()
            state[layer + ".weight_format"] = torch.tensor(0, dtype=torch.uint8)  # row-major, bitsandbytes' default
            continue
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in seen:  # tied (the output embedding): transformers reties it
            continue
        if pointer is not None:
            seen.add(pointer)
        state[key] = tensor.detach().contiguous().cpu()
    return state


def write_quantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, destination: Path) -> None:
    """Write ``model`` (plain, merged, base quantised) to ``destination`` as a bitsandbytes transformers folder."""
    from safetensors.torch import save_file

    state = quantized_state_dict(model)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    with atomic_folder(destination) as folder:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        clean = type(model.config).from_dict({k: v for k, v in config.items() if k != "quantization_config"})
        clean.quantization_config = config["quantization_config"]
        clean.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
