"""What the parameters of the methods that do not change weights mean.

- IA3: the learned scales as deviations from 1, per layer and position.
- Bottleneck adapters: the size of the down and up projections per layer
  (their outputs relative to the stream they join need data: ``behaviour.py``).
- Prompt tuning: each virtual token's norm, relative to the vocabulary's mean
  embedding norm, and its nearest vocabulary tokens by cosine similarity.
- Prefix tuning: each layer's key and value vectors' norms and, for the first
  layer's values, the nearest vocabulary tokens: the vocabulary is taken
  through the model's own first value projection, the space those prefix
  values live in (keys are left out: rotary models rotate them by position).
- BitFit: the bias offsets per layer, against the biases they move.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers import PreTrainedTokenizerBase

from adapterkit.analysis.sites import adapter_sites
from adapterkit.core.architectures import modules_in_role
from adapterkit.core.layers import get_store, innermost
from adapterkit.core.lifecycle import adapters_disabled, get_adapter_config

NEAREST = 5  # vocabulary tokens listed per virtual token


def _token_names(ids: list[int], tokenizer: PreTrainedTokenizerBase | None) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.convert_ids_to_tokens(i) for i in ids]


def nearest_tokens(vectors: torch.Tensor, vocabulary: torch.Tensor, tokenizer: PreTrainedTokenizerBase | None,
                   count: int = NEAREST) -> list[list[dict[str, Any]]]:
    """For each row of ``vectors``, the ``count`` vocabulary rows of highest cosine similarity."""
    a = torch.nn.functional.normalize(vectors.detach().float(), dim=-1)
    b = torch.nn.functional.normalize(vocabulary.detach().float(), dim=-1)
    best = (a @ b.T).topk(min(count, b.shape[0]), dim=-1)
    return [[{"token": t, "id": int(i), "cosine": float(c)}
             for t, i, c in zip(_token_names(ids.tolist(), tokenizer), ids, cos)]
            for ids, cos in zip(best.indices, best.values)]


def ia3_report(model: nn.Module, name: str) -> dict[str, Any]:
    """Per IA3 site: mean, mean absolute and largest absolute deviation of the scales from 1."""
    modules = []
    for site in adapter_sites(model, name, "ia3"):
        deviation = site.wrapper.ia3_l[name].detach().float().flatten() - 1.0
        modules.append({"path": site.path, "layer": site.layer, "module": site.module,
                        "scales": "input" if site.wrapper.is_feedforward[name] else "output",
                        "size": deviation.numel(), "mean_deviation": float(deviation.mean()),
                        "mean_abs_deviation": float(deviation.abs().mean()),
                        "max_abs_deviation": float(deviation.abs().max()),
                        "min_scale": float(deviation.min() + 1), "max_scale": float(deviation.max() + 1)})
    return {"modules": modules}


def bottleneck_report(model: nn.Module, name: str) -> dict[str, Any]:
    """Per bottleneck site: its width and the Frobenius norms of its down and up projections."""
    modules = []
    for site in adapter_sites(model, name, "bottleneck"):
        down, up = site.wrapper.adapter_down[name], site.wrapper.adapter_up[name]
        modules.append({"path": site.path, "layer": site.layer, "module": site.module,
                        "width": down.out_features, "parallel": site.wrapper.parallel[name],
                        "down_norm": float(down.weight.detach().float().norm()),
                        "up_norm": float(up.weight.detach().float().norm())})
    return {"modules": modules}


def bitfit_report(model: nn.Module, name: str) -> dict[str, Any]:
    """Per BitFit site: ‖offset‖, ‖original bias‖, their ratio and the largest change."""
    modules = []
    for site in adapter_sites(model, name, "bitfit"):
        offset = site.wrapper.bitfit[name].bias.detach().float()
        bias = innermost(site.wrapper.base_layer).bias.detach().float()
        norm, base = float(offset.norm()), float(bias.norm())
        modules.append({"path": site.path, "layer": site.layer, "module": site.module, "size": offset.numel(),
                        "offset_norm": norm, "bias_norm": base, "norm_ratio": norm / base if base else None,
                        "max_abs_change": float(offset.abs().max())})
    return {"modules": modules}


def prompt_report(model: nn.Module, name: str, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """Per virtual token: its norm, that norm over the vocabulary's mean, and its nearest tokens."""
    vectors = get_store(model).adapters[name].embedding.detach().float()
    vocabulary = model.get_input_embeddings().weight.detach().float()
    mean_norm = float(vocabulary.norm(dim=-1).mean())
    nearest = nearest_tokens(vectors, vocabulary, tokenizer)
    return {"vocabulary_mean_norm": mean_norm,
            "tokens": [{"index": i, "norm": float(v.norm()), "norm_ratio": float(v.norm()) / mean_norm,
                        "nearest": n} for i, (v, n) in enumerate(zip(vectors, nearest))]}


class _Stop(Exception):
    """Raised by a hook to end a forward once the wanted activation is seen."""


@torch.no_grad()
def first_layer_vocabulary_values(model: nn.Module, width: int, chunk: int = 2048) -> torch.Tensor | None:
    """Every vocabulary token's value vector in the first attention layer (a one-token input each), or ``None``.

    The forward of each chunk stops right after that projection, so this costs
    the embeddings and one matrix product per token.
    """
    paths = modules_in_role(model, "value")
    if not paths:
        return None
    module = innermost(model.get_submodule(paths[0]))
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        captured.append(output.detach().float().reshape(output.shape[0], -1))
        raise _Stop

    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    handle = module.register_forward_hook(hook)
    try:
        with adapters_disabled(model):
            for start in range(0, vocab, chunk):
                ids = torch.arange(start, min(start + chunk, vocab), device=device).unsqueeze(1)
                try:
                    model(input_ids=ids)
                except _Stop:
                    pass
    finally:
        handle.remove()
    values = torch.cat(captured) if captured else None
    if values is None:
        return None
    if values.shape[1] == width:
        return values
    if values.shape[1] == 3 * width:  # fused query/key/value (GPT-2's c_attn): values come last
        return values[:, 2 * width:]
    return None


def prefix_report(model: nn.Module, name: str, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """Per layer: the mean norm of the prefix keys and values; nearest tokens of the first layer's values."""
    from adapterkit.methods.prefix import kv_layout

    layout = kv_layout(model)
    table = get_store(model).adapters[name].folded().float()  # (P, blocks * kv_hidden)
    blocks = table.reshape(table.shape[0], -1, layout.kv_hidden)  # (P, 2 * layers, kv_hidden)
    layers = [{"layer": i, "key_norm": float(blocks[:, k].norm(dim=-1).mean()),
               "value_norm": float(blocks[:, v].norm(dim=-1).mean())} for i, (k, v) in enumerate(layout.blocks)]
    report: dict[str, Any] = {"tokens": table.shape[0], "layers": layers}
    vocabulary = None if layout.encoder_decoder else first_layer_vocabulary_values(model, layout.kv_hidden)
    if vocabulary is not None:
        report["first_layer_value_nearest"] = nearest_tokens(blocks[:, layout.blocks[0][1]], vocabulary, tokenizer)
    else:
        report["first_layer_value_nearest"] = None
        report["note"] = "nearest tokens need a known value projection in a decoder-only or encoder model"
    return report


def parameter_report(model: nn.Module, name: str, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any] | None:
    """The report of this file for adapter ``name``'s method, or ``None`` for a weight-update method."""
    method = get_adapter_config(model, name).method
    if method == "ia3":
        return {"method": method, **ia3_report(model, name)}
    if method == "bottleneck":
        return {"method": method, **bottleneck_report(model, name)}
    if method == "bitfit":
        return {"method": method, **bitfit_report(model, name)}
    if method == "prompt_tuning":
        return {"method": method, **prompt_report(model, name, tokenizer)}
    if method == "prefix_tuning":
        return {"method": method, **prefix_report(model, name, tokenizer)}
    return None
