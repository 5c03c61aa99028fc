"""A LoRA adapter as a llama.cpp GGUF adapter file (``llama-cli --lora adapter.gguf``).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for a PEFT
LoRA folder, and what ``llama_adapter_lora_init`` in ``src/llama-adapter.cpp``
checks on load:

- metadata ``general.type = "adapter"``, ``general.architecture`` (the base's,
  e.g. ``"llama"``; llama.cpp refuses an adapter whose architecture differs
  from the model's), ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
- two float32 tensors per adapted weight, named after the base tensor in the
  GGUF model: ``blk.0.attn_q.weight.lora_a`` (torch shape (rank, in), GGUF
  ``ne = [in, rank]``) and ``blk.0.attn_q.weight.lora_b`` ((out, rank)). The
  token embedding is the exception: llama.cpp gathers rows of its ``lora_a``
  by token id, so there ``lora_a`` is (vocab, rank) and ``lora_b`` (dim, rank).

llama.cpp adds ``(alpha / rank) * B @ A`` to a weight, with ``rank`` read from
each ``lora_b`` and one ``alpha`` for the whole file. Our layers add
``scaling * B @ A`` with a scaling of their own per module (``alpha / r``,
``alpha / sqrt(r)`` for rsLoRA, or whatever a merge produced), so the file's
alpha is chosen as ``scaling * rank`` of most modules (then their factors are
written unchanged, bit for bit) and any module that differs has the ratio
folded into its B. llama.cpp's result is then our ``delta_weight`` exactly, up
to float32 rounding.

Query and key rows are reordered. Hugging Face's Llama applies rotary
embeddings in the "rotate half" layout (row ``j`` of a head pairs with row
``j + d/2``), llama.cpp's ``llama`` kernels in the interleaved one (rows ``2j``
and ``2j + 1``), so llama.cpp's converter permutes the rows of ``q_proj`` and
``k_proj`` (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``). A LoRA update
of those weights must land in the same rows; the LoRA converter gets this by
running the same permutation through its (A, B) pair, which reorders the rows
of B and leaves A as it is. :func:`rope_rows_to_interleaved` does the same.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn as nn

from adapterkit.core.atomic import TMP_MARK, fsync_dir, fsync_file
from adapterkit.core.layers import AdapterLayer, candidate_modules, find_layer, innermost
from adapterkit.core.lifecycle import active_adapters, get_adapter_config
from adapterkit.core.registry import get_method
from adapterkit.core.state import get_state
from adapterkit.errors import UnsupportedError, UsageError
from adapterkit.methods.lora import LoraConfig, LoraLayer


@dataclass(frozen=True)
class GGUFArch:
    """What the export needs to know about one base architecture."""

    arch: gguf.MODEL_ARCH
    # llama.cpp's converter reorders q/k rows from rotate-half to interleaved rotary layout
    rope_permute: bool


# keyed by ``config.model_type``; an architecture joins this table once its converter
# class in llama.cpp's convert_hf_to_gguf.py has been checked for tensor rewrites
GGUF_ARCHES: dict[str, GGUFArch] = {
    "llama": GGUFArch(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
}


def export_gguf_lora(model: nn.Module, adapter: str, path: str | os.PathLike[str]) -> Path:
    """Write LoRA adapter ``adapter`` of ``model`` as a llama.cpp GGUF adapter file.

    The file loads in llama.cpp onto the base model converted to GGUF by
    llama.cpp's own ``convert_hf_to_gguf.py`` (``llama-cli -m base.gguf --lora
    path``). It is written to a temporary file beside ``path`` and renamed over
    it, so an error never leaves a partial file or damages an existing one.

    Args:
        model: A model carrying the adapter, e.g. after ``adapterkit.load_adapter``.
        adapter: The adapter's name on ``model``.
        path: The ``.gguf`` file to write; missing parent folders are created.

    Returns:
        The path written.

    Raises:
        UnknownNameError: ``model`` has no adapter called ``adapter``.
        UnsupportedError: The adapter or base model is something the GGUF
            adapter format cannot hold (not LoRA, DoRA, a task head, a base
            architecture without a llama.cpp mapping, a tied output head).
        UsageError: ``path`` is an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"cannot write the GGUF adapter to {path}: it is a folder; give a file path "
                         f"such as {path / (adapter + '.gguf')}")
    spec = _check_exportable(model, adapter)
    alpha, tensors = _tensors(model, adapter, spec)
    _write_atomically(path, spec, adapter, alpha, tensors)
    return path


def export_gguf_lora_folder(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Write the LoRA adapter saved in ``folder`` as a llama.cpp GGUF adapter file.

    Loads the base model the folder names (as ``adapterkit.models.load_with_adapter``
    does), puts the adapter on it, and calls :func:`export_gguf_lora`.

    Args:
        folder: An adapter folder from ``adapterkit.save_adapter`` or PEFT's ``save_pretrained``.
        path: The ``.gguf`` file to write.

    Returns:
        The path written.
    """
    from adapterkit.models import load_with_adapter  # models/ is only needed on this path

    model, _, _ = load_with_adapter(folder)
    (name,) = active_adapters(model)
    return export_gguf_lora(model, name, path)


def gguf_lora_tensors(model: nn.Module, adapter: str) -> tuple[float, dict[str, np.ndarray]]:
    """The file's alpha and its tensors (GGUF name -> float32 array in torch order).

    Args:
        model: A model carrying LoRA adapter ``adapter`` on a base in :data:`GGUF_ARCHES`.
        adapter: The adapter's name on ``model``.

    Returns:
        ``(alpha, tensors)``: llama.cpp scales each pair by ``alpha / rank``,
        with ``rank = lora_b.shape[-1]``.
    """
    return _tensors(model, adapter, _check_exportable(model, adapter))


def _tensors(model: nn.Module, adapter: str, spec: GGUFArch) -> tuple[float, dict[str, np.ndarray]]:
    """:func:`gguf_lora_tensors` for a model already checked to be exportable as ``spec``."""
    config = model.config
    name_map = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    layers = _lora_layers(model, adapter)
    alpha = _file_alpha([(layer.scaling[adapter], _rank(layer, adapter)) for _, layer in layers])
    tensors: dict[str, np.ndarray] = {}
    for path, layer in layers:
        kind, base_name = _gguf_name(name_map, path, spec)
        a, b = _factors(layer, adapter)
        rank = b.shape[1]
        ratio = layer.scaling[adapter] * rank / alpha
        if ratio != 1.0:  # this module's own scale differs from the file's alpha / rank
            b = b * ratio
        if spec.rope_permute and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            heads = config.num_attention_heads if kind == gguf.MODEL_TENSOR.ATTN_Q else _kv_heads(config)
            b = rope_rows_to_interleaved(b, heads)
        if kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            a = a.T  # llama.cpp gathers token rows of lora_a: (vocab, rank)
        tensors[f"{base_name}.lora_a"] = _to_numpy(a)
        tensors[f"{base_name}.lora_b"] = _to_numpy(b)
    return float(np.float32(alpha)), tensors  # the file stores alpha as float32


def rope_rows_to_interleaved(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (or its LoRA B) as llama.cpp's converter does.

    Within each head of ``d`` rows, row ``j`` and row ``j + d/2`` (Hugging Face's
    rotate-half pair) become rows ``2j`` and ``2j + 1`` (the interleaved pair
    that llama.cpp's rotary kernel for ``llama`` expects).

    Args:
        rows: (n_head * d, ...) tensor.
        n_head: Heads of the projection (the key/value heads for ``k_proj``).

    Returns:
        A tensor of the same shape with the rows reordered.
    """
    head_dim = rows.shape[0] // n_head
    split = rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:])  # (head, half, j, ...)
    return split.transpose(1, 2).reshape(rows.shape)  # (head, j, half, ...)


# --- checks ---------------------------------------------------------------------

def _check_exportable(model: nn.Module, adapter: str) -> GGUFArch:
    """The base's GGUF architecture; refuses what a GGUF LoRA adapter cannot hold."""
    config = get_adapter_config(model, adapter)  # UnknownNameError for a missing name
    method = get_method(config)
    if not isinstance(config, LoraConfig):
        instead = ("; merge it into the base (adapterkit.merge_and_unload) and convert the whole model "
                   "instead" if method.mergeable else "")
        raise UnsupportedError(
            f"adapter {adapter!r} is a {method.name} adapter, and llama.cpp's GGUF adapter format holds "
            f"LoRA only (low-rank pairs added to weights){instead}")
    if config.use_dora:
        raise UnsupportedError(
            f"adapter {adapter!r} is a DoRA adapter: its per-output magnitude rescales the whole "
            "updated weight, which llama.cpp's LoRA adapters (W + scale * B @ A) cannot express; "
            "merge it into the base (adapterkit.merge_and_unload) and convert the whole model instead")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = GGUF_ARCHES.get(str(model_type))
    if spec is None:
        raise UnsupportedError(
            f"exporting to GGUF is supported for base architectures {sorted(GGUF_ARCHES)}, but this "
            f"model ({type(model).__name__}) is {model_type!r}; use the PEFT folder from save_adapter")
    heads = get_state(model).heads.get(adapter) or []
    if heads:
        raise UnsupportedError(
            f"adapter {adapter!r} carries a task head ({', '.join(heads)}), which a GGUF LoRA adapter "
            "cannot hold; llama.cpp adapters are for causal-LM bases (add the adapter with "
            "train_head=False, or use the PEFT folder from save_adapter)")
    return spec


def _gguf_name(name_map: gguf.TensorNameMap, path: str, spec: GGUFArch) -> tuple[gguf.MODEL_TENSOR, str]:
    """The GGUF tensor type and weight name of the module at ``path``."""
    found = name_map.get_type_and_name(path)
    if found is None:
        raise UnsupportedError(
            f"module {path!r} has no tensor in llama.cpp's {gguf.MODEL_ARCH_NAMES[spec.arch]!r} models, "
            "so a GGUF adapter cannot adapt it; retrain without it in LoraConfig.targets")
    kind, name = found
    return kind, f"{name}.weight"


def _lora_layers(model: nn.Module, adapter: str) -> list[tuple[str, LoraLayer]]:
    """(module path, LoRA layer) for every module that adapter ``adapter`` adapts.

    The path is that of the original module, whatever other adapter wrappers
    stand around or inside the LoRA layer.
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    found = []
    for path, module in candidate_modules(model):
        if not isinstance(module, AdapterLayer):
            continue
        layer = find_layer(module, LoraLayer)
        if layer is None or not layer.has_adapter(adapter):
            continue
        if tied and _is_tied(model, layer):
            raise UnsupportedError(
                f"adapter {adapter!r} adapts {path!r}, whose weight is shared by the input embedding "
                "and the output head of this base (tie_word_embeddings); llama.cpp keeps one tensor "
                "(token_embd) for both and cannot apply a LoRA to only one use of it; retrain without "
                f"{path.rsplit('.', 1)[-1]!r} in LoraConfig.targets")
        found.append((path, layer))
    if not found:
        raise UnsupportedError(f"adapter {adapter!r} adapts no module of this model, so there is nothing to export")
    return found


def _is_tied(model: nn.Module, layer: LoraLayer) -> bool:
    """True when ``layer`` wraps the input embedding or the output head and the two share a weight."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None:
        return False
    return innermost(layer) in (innermost(inputs), innermost(outputs))


# --- numbers --------------------------------------------------------------------

def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) of one module, in float32 on the CPU."""
    if adapter in layer.lora_embedding_A:
        a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]  # (rank, vocab), (dim, rank)
    else:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return a.detach().float().cpu(), b.detach().float().cpu()


def _rank(layer: LoraLayer, adapter: str) -> int:
    """The rank of one module's pair as stored (a merge may give modules ranks of their own)."""
    b = layer.lora_embedding_B[adapter] if adapter in layer.lora_embedding_B else layer.lora_B[adapter].weight
    return int(b.shape[1])


def _file_alpha(scales: list[tuple[float, int]]) -> float:
    """The one alpha of the file: ``scaling * rank`` of most modules, so that theirs need no folding."""
    (alpha, _), = Counter(float(s) * r for s, r in scales).most_common(1)
    return alpha


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.numpy(), dtype=np.float32)


def _kv_heads(config: object) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # type: ignore[attr-defined]


# --- the file -------------------------------------------------------------------

def _write_atomically(path: Path, spec: GGUFArch, adapter: str, alpha: float,
                      tensors: dict[str, np.ndarray]) -> None:
    """Write the GGUF file beside ``path``, flush it, and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[spec.arch])  # writes general.architecture
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(adapter)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
