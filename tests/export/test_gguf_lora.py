"""LoRA adapters written as llama.cpp GGUF adapter files, read back with gguf's own reader.

The reference computation is llama.cpp's: for each ``<weight>.lora_a`` /
``.lora_b`` pair it adds ``(alpha / rank) * lora_b @ lora_a`` (``rank`` =
``lora_b``'s last torch dimension) to the weight, and for the token embedding
``(alpha / rank) * lora_a[token] @ lora_b.T`` to each looked-up row; the q/k rows
are in llama.cpp's interleaved rotary order, undone here by the index map that
defines it. The result must equal each layer's own ``delta_weight``.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import adapterkit as ak
from adapterkit.errors import UnknownNameError, UnsupportedError, UsageError, UserError
from adapterkit.export import export_gguf_lora, export_gguf_lora_folder
from adapterkit.export.gguf_lora import rope_rows_to_interleaved
from adapterkit.methods.lora import LoraLayer
from tests.tiny_models import build_tiny, perturb
from tests.tolerances import assert_close_scaled

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    return LlamaForCausalLM(config).eval()


def with_lora(config: ak.LoraConfig, model: torch.nn.Module | None = None) -> torch.nn.Module:
    model = model if model is not None else build_tiny("llama")[0]
    ak.add_adapter(model, "a", config)
    perturb(model, "a")
    return model


def read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray], gguf.GGUFReader]:
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return fields, tensors, reader


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer) and m.has_adapter("a")}


def gguf_name(model: torch.nn.Module, path: str) -> tuple[gguf.MODEL_TENSOR, str]:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    kind, name = name_map.get_type_and_name(path)
    return kind, f"{name}.weight"


def interleaved_to_rotate_half(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k reordering: GGUF row ``h*d + 2j + s`` is HF row ``h*d + s*d/2 + j``."""
    d = rows.shape[0] // n_head
    hf_rows = [h * d + s * (d // 2) + j for h in range(n_head) for j in range(d // 2) for s in range(2)]
    out = np.empty_like(rows)
    out[hf_rows] = rows
    return out


def llama_cpp_delta(tensors: dict[str, np.ndarray], name: str, alpha: float, kind, config) -> np.ndarray:
    """The update llama.cpp applies to weight ``name``, in Hugging Face's (out, in) / (vocab, dim) layout."""
    a, b = tensors[f"{name}.lora_a"].astype(np.float64), tensors[f"{name}.lora_b"].astype(np.float64)
    scale = alpha / b.shape[-1]
    if kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
        return scale * (a @ b.T)  # (vocab, rank) @ (rank, dim)
    delta = scale * (b @ a)  # (out, rank) @ (rank, in)
    if kind == gguf.MODEL_TENSOR.ATTN_Q:
        delta = interleaved_to_rotate_half(delta, config.num_attention_heads)
    elif kind == gguf.MODEL_TENSOR.ATTN_K:
        delta = interleaved_to_rotate_half(delta, config.num_key_value_heads)
    return delta


def assert_same_deltas(model: torch.nn.Module, path: Path) -> set[str]:
    """Every LoRA module's delta equals what llama.cpp computes from the file; returns the weights seen."""
    fields, tensors, _ = read(path)
    alpha = float(fields["adapter.lora.alpha"])
    seen = set()
    for module_path, layer in lora_layers(model).items():
        kind, name = gguf_name(model, module_path)
        actual = llama_cpp_delta(tensors, name, alpha, kind, model.config)
        expected = layer.delta_weight("a").detach()
        if layer.is_embedding:
            a, b = layer.lora_embedding_A["a"], layer.lora_embedding_B["a"]
        else:
            a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
        # the sum of |terms| behind each entry of B @ A, times the scale
        magnitude = float((b.detach().abs() @ a.detach().abs()).max()) * layer.scaling["a"]
        assert_close_scaled(torch.from_numpy(actual), expected, ops=a.shape[0] + 3, scale=magnitude,
                            dtype=torch.float32, msg=f"{module_path} ({name}): ")
        assert float(expected.abs().max()) > 1e-3  # the check compares real updates
        seen.add(name)
    assert {n.rsplit(".", 1)[0] for n in tensors} == seen  # nothing more, nothing less
    return seen


def test_metadata_names_shapes_and_dtype(tmp_path: Path) -> None:
    model = with_lora(ak.LoraConfig(rank=4, alpha=8))
    written = export_gguf_lora(model, "a", tmp_path / "a.gguf")
    assert written == tmp_path / "a.gguf"
    fields, tensors, reader = read(written)
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora"
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert fields["adapter.lora.alpha"] == 8.0
    expected = {f"blk.{i}.{t}.weight.lora_{ab}" for i in range(2) for ab in "ab"
                for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == expected
    ne = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    # GGUF lists dimensions innermost first: lora_a is (rank, in) in torch order, ne = [in, rank]
    assert ne["blk.0.attn_q.weight.lora_a"] == [32, 4] and ne["blk.0.attn_q.weight.lora_b"] == [4, 32]
    assert ne["blk.0.attn_k.weight.lora_b"] == [4, 16]  # 2 key/value heads of 8
    assert ne["blk.1.ffn_down.weight.lora_a"] == [64, 4] and ne["blk.1.ffn_down.weight.lora_b"] == [4, 32]
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # no temporary file left beside it


@pytest.mark.parametrize("rslora, rank", [(False, 4), (True, 4), (True, 8)], ids=["lora", "rslora", "rslora-r8"])
def test_llama_cpp_applies_the_adapters_delta(tmp_path: Path, rslora: bool, rank: int) -> None:
    model = with_lora(ak.LoraConfig(rank=rank, alpha=8, use_rslora=rslora))
    path = export_gguf_lora(model, "a", tmp_path / "a.gguf")
    assert len(assert_same_deltas(model, path)) == 2 * len(ADAPTED)
    fields, tensors, _ = read(path)
    # llama.cpp scales by alpha / rank, so rsLoRA's alpha / sqrt(rank) is carried by the file's alpha
    assert fields["adapter.lora.alpha"] == pytest.approx(8 * math.sqrt(rank) if rslora else 8)
    # with one scale for all modules the factors are written as they are, bit for bit
    layer = lora_layers(model)["model.layers.1.mlp.down_proj"]
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight.lora_a"], layer.lora_A["a"].weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight.lora_b"], layer.lora_B["a"].weight.detach().numpy())


def test_modules_with_their_own_scale_fold_it_into_b(tmp_path: Path) -> None:
    model = with_lora(ak.LoraConfig(rank=4, alpha=8, use_rslora=True, targets=["q_proj", "v_proj", "down_proj"]))
    odd = lora_layers(model)["model.layers.0.self_attn.v_proj"]
    odd.scaling["a"] = 0.3  # as a merge giving one module a scale of its own would
    path = export_gguf_lora(model, "a", tmp_path / "a.gguf")
    assert_same_deltas(model, path)
    fields, tensors, _ = read(path)
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)  # what most modules need
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"],
                               odd.lora_B["a"].weight.detach().numpy() * 0.3 * 4 / 16, rtol=1e-6)


def test_q_and_k_rows_follow_llama_cpps_rotary_order() -> None:
    # per head of d rows, Hugging Face pairs rows (j, j + d/2), llama.cpp rows (2j, 2j + 1)
    n_head, d, rank = 3, 8, 2
    rows = torch.arange(n_head * d * rank, dtype=torch.float32).reshape(n_head * d, rank)
    out = rope_rows_to_interleaved(rows, n_head)
    for h in range(n_head):
        for j in range(d // 2):
            assert torch.equal(out[h * d + 2 * j], rows[h * d + j])
            assert torch.equal(out[h * d + 2 * j + 1], rows[h * d + d // 2 + j])


def test_embedding_and_output_head_of_an_untied_base(tmp_path: Path) -> None:
    model = with_lora(ak.LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj", "lm_head"]),
                      tiny_llama(tie_word_embeddings=False))
    path = export_gguf_lora(model, "a", tmp_path / "a.gguf")
    seen = assert_same_deltas(model, path)
    assert {"token_embd.weight", "output.weight", "blk.0.attn_q.weight"} <= seen
    _, _, reader = read(path)
    ne = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    # llama.cpp checks token_embd's pair as (rank, vocab) / (rank, dim) in ne order
    assert ne["token_embd.weight.lora_a"] == [4, 64] and ne["token_embd.weight.lora_b"] == [4, 32]


def test_refuses_embedding_lora_on_a_tied_base(tmp_path: Path) -> None:
    model = with_lora(ak.LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj"]),
                      tiny_llama(tie_word_embeddings=True))
    with pytest.raises(UnsupportedError, match="tie_word_embeddings"):
        export_gguf_lora(model, "a", tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("config, match", [
    (ak.LoraConfig(rank=4, alpha=8, use_dora=True), "DoRA"),
    (ak.IA3Config(), "ia3 adapter.*LoRA only"),
])
def test_refuses_what_the_format_cannot_hold(tmp_path: Path, config, match: str) -> None:
    model = with_lora(config)
    with pytest.raises(UnsupportedError, match=match) as info:
        export_gguf_lora(model, "a", tmp_path / "a.gguf")
    assert isinstance(info.value, UserError)
    assert not list(tmp_path.iterdir())


def test_refuses_an_architecture_without_a_gguf_mapping(tmp_path: Path) -> None:
    model = with_lora(ak.LoraConfig(rank=4, alpha=8), build_tiny("bert")[0])
    with pytest.raises(UnsupportedError, match=r"\['llama'\].*'bert'"):
        export_gguf_lora(model, "a", tmp_path / "a.gguf")


def test_refuses_an_adapter_with_a_task_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(tiny_llama().config).eval()
    base.config.num_labels = 2
    model = with_lora(ak.LoraConfig(rank=4, alpha=8), base)
    with pytest.raises(UnsupportedError, match="task head.*score"):
        export_gguf_lora(model, "a", tmp_path / "a.gguf")


def test_refuses_unknown_adapters_and_folder_paths(tmp_path: Path) -> None:
    model = with_lora(ak.LoraConfig(rank=4, alpha=8))
    with pytest.raises(UnknownNameError):
        export_gguf_lora(model, "b", tmp_path / "b.gguf")
    with pytest.raises(UsageError, match="is a folder"):
        export_gguf_lora(model, "a", tmp_path)


def test_a_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.gguf"
    target.write_bytes(b"previous export")

    def broken(self, *, progress: bool = False) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf_lora(with_lora(ak.LoraConfig(rank=4, alpha=8)), "a", target)
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


def test_export_from_an_adapter_folder(tmp_path: Path) -> None:
    from tests.tiny_lm import tiny_model_folder

    base_dir = tiny_model_folder(tmp_path / "base", "llama")
    model, _ = ak.load_model(str(base_dir), task="causal-lm")
    ak.add_adapter(model, "a", ak.LoraConfig(rank=4, alpha=8, use_rslora=True))
    perturb(model, "a")
    ak.save_adapter(model, "a", tmp_path / "adapter")
    from_model = export_gguf_lora(model, "a", tmp_path / "from_model.gguf")
    from_folder = export_gguf_lora_folder(tmp_path / "adapter", tmp_path / "out" / "from_folder.gguf")
    fields, tensors, _ = read(from_folder)
    expected_fields, expected, _ = read(from_model)
    assert fields == expected_fields
    assert tensors.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(tensors[name], expected[name])
