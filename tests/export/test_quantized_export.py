"""Export into a quantised folder: merged, requantised, reported, and loadable by plain transformers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.core.base_weight import read_base_tensor
from adapterkit.export.hf_folder import export_quantized
from adapterkit.export.quantized_folder import int8_parts
from adapterkit.models.quantize import is_quantized_module
from tests.tiny_lm import _ids, tiny_tokenizer
from tests.tiny_models import perturb

TARGETS = ["q_proj", "v_proj"]
# Requantisation error of merged weights on these 128-wide layers: int8 per channel ~0.5%, nf4 ~9%
# (the quantisation step itself); bounds with margin.
WEIGHT_BOUND = {"int8": 0.01, "nf4": 0.2}


def _base_folder(folder: Path) -> Path:
    """A small Llama whose layers are wide enough for 64-value 4-bit blocks, saved with its tokenizer."""
    tokenizer = tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, **_ids(tokenizer))
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _adapted(folder: Path, scheme: str):
    model, tokenizer = ak.load_model(folder, task="causal-lm", quantize=scheme)
    ak.add_adapter(model, "a", ak.LoraConfig(rank=4, alpha=8, targets=TARGETS))
    perturb(model, "a", scale=0.05)
    return model.eval(), tokenizer


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["the red cat", "a blue dog runs"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_export_quantized_writes_what_the_merged_model_stores_and_reports_it(tmp_path, scheme: str) -> None:
    model, tokenizer = _adapted(_base_folder(tmp_path / "base"), scheme)
    written, report = export_quantized(model, tokenizer, tmp_path / "out")
    requant, probe = report["requantization"], report["probe"]
    assert requant["layers"] == 2 * len(TARGETS)  # the LoRA-targeted layers of two blocks, nothing else
    assert 0 < requant["mean_relative_error"] <= WEIGHT_BOUND[scheme]
    assert 0 < probe["max_relative_change"] <= 2 * WEIGHT_BOUND[scheme]
    merged = _logits(model, tokenizer)  # ``model`` is now the plain merged model
    loaded = AutoModelForCausalLM.from_pretrained(written, device_map="cpu").eval()
    mine = dict(model.named_modules())
    for path, module in loaded.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            assert is_quantized_module(mine[path])
    assert sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in loaded.modules()) == \
        sum(is_quantized_module(m) for m in model.modules()) > 0
    if scheme == "nf4":  # the same packed weights through the same kernels
        for module in loaded.modules():  # as adapterkit does: no bf16 repacking on AVX512-BF16 CPUs
            if type(module).__name__ == "Linear4bit":
                module.support_avx512bf16_for_cpu = False
        torch.testing.assert_close(_logits(loaded, tokenizer), merged, rtol=1e-5, atol=1e-5)
    else:
        # the same int8 weights and scales; bitsandbytes' LLM.int8 matmul also rounds the activations
        # to int8 (one part in 127 of a row's largest value), so the logits agree to a few percent
        for path, module in loaded.named_modules():
            if type(module).__name__ == "Linear8bitLt":
                data, scale = int8_parts(mine[path].weight, path)
                torch.testing.assert_close(data.float() * scale[:, None], read_base_tensor(mine[path]))
                assert torch.equal(module.weight.data.to(torch.int8), data)
                torch.testing.assert_close(module.weight.SCB / 127, scale)
        difference = (_logits(loaded, tokenizer) - merged).abs().max() / merged.abs().max()
        assert difference < 0.05


def test_export_quantize_on_the_command_line_prints_the_requantisation(tmp_path, capsys) -> None:
    model, _ = _adapted(_base_folder(tmp_path / "base"), "nf4")
    ak.save_adapter(model, "a", tmp_path / "adapter")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out"),
                 "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    line = re.search(r"requantised: (\d+) layers; relative error of the stored merged weights mean ([\d.]+)%, "
                     r"max ([\d.]+)%", out)
    assert line and int(line.group(1)) == 2 * len(TARGETS) and 0 < float(line.group(2)) <= 100 * WEIGHT_BOUND["nf4"]
    assert "probe batch: outputs moved by at most" in out
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.quantization_config.load_in_4bit
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out2"),
                 "--quantize", "nf4", "--dtype", "bf16"]) == 2  # one folder is either quantised or float
    assert "give one" in capsys.readouterr().err
