"""save_adapter / load_adapter: round trips, base-model checks, damaged files, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import BertConfig, BertForSequenceClassification

import adapterkit as ak
from adapterkit.core.registry import get_config_class
from tests.tiny_models import build_tiny, output_tensor

KINDS = ("bert", "gpt2", "llama", "t5")


def perturb(model: torch.nn.Module, name: str, seed: int = 0) -> None:
    """Move the adapter (and head) weights away from their initial values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name).values():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)


def trained(kind: str, config: ak.AdapterConfig, name: str = "task") -> tuple[torch.nn.Module, dict]:
    """A tiny model carrying a perturbed adapter ``name``."""
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, name, config)
    perturb(model, name)
    return model.eval(), inputs


def default_config(method: str) -> ak.AdapterConfig:
    """The method's default config, shrunk where it has a virtual-token count."""
    config_class = get_config_class(method)
    fields = getattr(config_class, "__dataclass_fields__", {})
    return config_class(num_virtual_tokens=3) if "num_virtual_tokens" in fields else config_class()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- round trips ------------------------------------------------------------------------
# BitFit needs biases; Llama and T5 have none (test_bitfit checks the error they give).
NO_BIASES = {("bitfit", "llama"), ("bitfit", "t5")}
# A fusion is built over other adapters; tests/core/test_composition.py saves and loads one.
STANDALONE = [m for m in ak.registered_methods() if m != "fusion"]


@pytest.mark.parametrize("method,kind", [
    (m, k) for m in STANDALONE for k in KINDS if (m, k) not in NO_BIASES])
def test_every_method_round_trips_onto_a_fresh_base(method: str, kind: str, tmp_path: Path) -> None:
    model, inputs = build_tiny(kind)
    ak.add_adapter(model, "task", default_config(method))
    perturb(model, "task")
    expected = output_tensor(model.eval(), inputs)
    ak.save_adapter(model, "task", tmp_path / "a")
    fresh, _ = build_tiny(kind)
    assert ak.load_adapter(fresh, tmp_path / "a") == "task"
    assert ak.active_adapters(fresh) == ["task"]
    assert torch.equal(output_tensor(fresh, inputs), expected)


LORA_CASES = {
    "bert-qv": ("bert", dict(targets=["query", "value"])),
    "bert-regex": ("bert", dict(targets=r".*attention\.self\.(query|key)")),
    "gpt2-conv1d": ("gpt2", dict()),
    "gpt2-embedding": ("gpt2", dict(targets=["c_attn", "wte"])),
    "gpt2-dora": ("gpt2", dict(use_dora=True)),
    "llama-dora-rslora": ("llama", dict(use_dora=True, use_rslora=True)),
    "llama-all-linear": ("llama", dict(targets="all-linear", dropout=0.1)),
    "t5-default": ("t5", dict()),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_round_trip_gives_identical_outputs(case: str, tmp_path: Path) -> None:
    kind, fields = LORA_CASES[case]
    config = ak.LoraConfig(rank=4, alpha=8, **fields)
    model, inputs = trained(kind, config)
    expected = output_tensor(model, inputs)
    with ak.adapters_disabled(model):
        assert not torch.allclose(output_tensor(model, inputs), expected)  # the adapter matters
    ak.save_adapter(model, "task", tmp_path / case)
    fresh, _ = build_tiny(kind)
    ak.load_adapter(fresh, tmp_path / case)
    assert not any(m.training for m in fresh.modules())  # loaded dropout follows eval mode
    assert torch.equal(output_tensor(fresh, inputs), expected)
    assert ak.get_adapter_config(fresh, "task") == config


def test_head_is_saved_and_restored(tmp_path: Path) -> None:
    model, inputs = trained("bert", ak.LoraConfig(rank=4, targets=["query"]))
    head = {k.split("copies.task.")[-1]: p.detach().clone() for k, p in ak.head_parameters(model, "task").items()}
    ak.save_adapter(model, "task", tmp_path / "a")
    fresh, _ = build_tiny("bert")
    ak.load_adapter(fresh, tmp_path / "a")
    loaded = {k.split("copies.task.")[-1]: p for k, p in ak.head_parameters(fresh, "task").items()}
    assert sorted(loaded) == ["bias", "weight"]
    for key, value in head.items():
        assert torch.equal(loaded[key], value)
    assert not torch.equal(fresh.classifier.base_layer.weight, head["weight"])  # the base head is untouched


def test_name_defaults_to_the_saved_one_and_can_be_overridden(tmp_path: Path) -> None:
    model, inputs = trained("gpt2", ak.LoraConfig(rank=4), name="mine")
    expected = output_tensor(model, inputs)
    ak.save_adapter(model, "mine", tmp_path / "a")
    fresh, _ = build_tiny("gpt2")
    assert ak.load_adapter(fresh, tmp_path / "a") == "mine"
    assert ak.load_adapter(fresh, tmp_path / "a", name="again") == "again"
    assert ak.list_adapters(fresh) == ["mine", "again"] and ak.active_adapters(fresh) == ["again"]
    assert torch.equal(output_tensor(fresh, inputs), expected)
    with pytest.raises(ValueError, match="already has an adapter called 'mine'"):
        ak.load_adapter(fresh, tmp_path / "a")
    assert ak.list_adapters(fresh) == ["mine", "again"]  # the existing one survived


def test_files_metadata_and_card(tmp_path: Path) -> None:
    model, _ = trained("bert", ak.LoraConfig(rank=4, targets=["query", "value"]))
    metadata = {"task": "classification", "labels": ["neg", "pos", "mixed"], "base_model": "tiny-bert",
                "metrics": {"accuracy": 0.75}}
    out = ak.save_adapter(model, "task", tmp_path / "a", metadata=metadata)
    assert out == tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterkit.json"]
    kit = json.loads((out / "adapterkit.json").read_text())
    assert kit["method"] == "lora" and kit["name"] == "task" and kit["peft_format"] is True
    assert kit["config"] == ak.LoraConfig(rank=4, targets=["query", "value"]).to_dict()
    assert kit["task"] == "classification" and kit["labels"] == ["neg", "pos", "mixed"]
    assert kit["metrics"] == {"accuracy": 0.75} and kit["base_model"] == "tiny-bert"
    assert kit["heads"] == ["classifier"]
    fp = kit["fingerprint"]
    assert (fp["model_type"], fp["architecture"], fp["hidden_size"], fp["num_layers"], fp["vocab_size"]) == (
        "bert", "BertForSequenceClassification", 32, 2, 64)
    assert len(fp["touched_sha256"]) == 64
    card = (out / "README.md").read_text()
    assert "lora" in card and "accuracy" in card and "load_adapter" in card
    info = ak.read_adapter_metadata(out)
    assert info["method"] == "lora" and info["format"] == "peft" and info["r"] == 4
    assert info["metrics"] == {"accuracy": 0.75} and info["adapter_config"]["peft_type"] == "LORA"
    assert info["num_parameters"] == sum(p.numel() for p in ak.adapter_parameters(model, "task").values())


def test_bad_metadata_is_refused_before_writing(tmp_path: Path) -> None:
    model, _ = trained("gpt2", ak.LoraConfig(rank=4))
    with pytest.raises(ValueError, match="reserved"):
        ak.save_adapter(model, "task", tmp_path / "a", metadata={"config": 1})
    with pytest.raises(ValueError, match="JSON"):
        ak.save_adapter(model, "task", tmp_path / "a", metadata={"metrics": object()})
    assert list(tmp_path.iterdir()) == []


# --- wrong base ---------------------------------------------------------------------------
def test_other_architecture_is_refused_with_the_difference(tmp_path: Path) -> None:
    model, _ = trained("bert", ak.LoraConfig(rank=4, targets=["query", "value"]))
    ak.save_adapter(model, "task", tmp_path / "a")
    other, inputs = build_tiny("gpt2")
    other.config.n_embd = 48  # make the hidden size differ as well
    with pytest.raises(ak.BaseModelMismatchError) as err:
        ak.load_adapter(other, tmp_path / "a")
    message = str(err.value)
    assert "trained on bert (BertForSequenceClassification) with hidden size 32" in message
    assert "this model is gpt2 (GPT2LMHeadModel) with hidden size 48" in message
    assert ak.list_adapters(other) == []


def test_other_sizes_are_refused_and_the_model_is_left_as_it_was(tmp_path: Path) -> None:
    model, _ = trained("bert", ak.LoraConfig(rank=4, targets=["query", "value"]))
    ak.save_adapter(model, "task", tmp_path / "a")
    torch.manual_seed(0)
    wider = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3, max_position_embeddings=64)).eval()
    with pytest.raises(ak.BaseModelMismatchError, match="hidden size 32.*hidden size 48"):
        ak.load_adapter(wider, tmp_path / "a")
    assert ak.list_adapters(wider) == [] and all(p.requires_grad for p in wider.parameters())


def test_other_head_shape_is_refused(tmp_path: Path) -> None:
    model, _ = trained("bert", ak.LoraConfig(rank=4, targets=["query", "value"]))
    ak.save_adapter(model, "task", tmp_path / "a")
    fresh, inputs = build_tiny("bert")
    ak.add_adapter(fresh, "keep", ak.LoraConfig(rank=2))
    before = output_tensor(fresh, inputs)
    fresh.classifier.base_layer = torch.nn.Linear(32, 5)  # five labels instead of three
    with pytest.raises(ak.BaseModelMismatchError, match=r"classifier.weight has shape \(3, 32\).*\(5, 32\)"):
        ak.load_adapter(fresh, tmp_path / "a")
    assert ak.list_adapters(fresh) == ["keep"] and ak.active_adapters(fresh) == ["keep"]
    assert torch.equal(output_tensor(fresh, inputs), before)


def test_same_sizes_but_other_touched_shapes_are_refused(tmp_path: Path) -> None:
    model, _ = trained("bert", ak.LoraConfig(rank=4, targets=["query"]))
    ak.save_adapter(model, "task", tmp_path / "a")
    fresh, _ = build_tiny("bert")
    for layer in fresh.bert.encoder.layer:  # same shapes for LoRA's A and B, but no bias any more
        layer.attention.self.query.bias = None
    with pytest.raises(ak.BaseModelMismatchError, match="differ in names or shapes"):
        ak.load_adapter(fresh, tmp_path / "a")


# --- damaged files -------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, _ = trained("gpt2", ak.LoraConfig(rank=4))
    return ak.save_adapter(model, "task", tmp_path / "a")


def test_truncated_weights_name_the_file(saved: Path) -> None:
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    fresh, _ = build_tiny("gpt2")
    with pytest.raises(ak.AdapterFileError, match="adapter_model.safetensors is truncated or corrupt"):
        ak.load_adapter(fresh, saved)
    with pytest.raises(ak.AdapterFileError, match="adapter_model.safetensors"):
        ak.read_adapter_metadata(saved)
    assert ak.list_adapters(fresh) == []


@pytest.mark.parametrize("file", ["adapter_config.json", "adapterkit.json"])
def test_garbled_json_names_the_file(saved: Path, file: str) -> None:
    path = saved / file
    path.write_text(path.read_text()[:40])
    with pytest.raises(ak.AdapterFileError, match=f"{file} is truncated or corrupt"):
        ak.load_adapter(build_tiny("gpt2")[0], saved)


def test_json_of_the_wrong_kind_names_the_file(saved: Path) -> None:
    (saved / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json should hold a JSON object"):
        ak.load_adapter(build_tiny("gpt2")[0], saved)
    (saved / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json: .*names no method"):
        ak.load_adapter(build_tiny("gpt2")[0], saved)


@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file_is_named(saved: Path, file: str) -> None:
    (saved / file).unlink()
    with pytest.raises(ak.MissingAdapterFileError, match=f"{file} is missing"):
        ak.load_adapter(build_tiny("gpt2")[0], saved)
    with pytest.raises(FileNotFoundError):
        ak.read_adapter_metadata(saved)


def test_missing_folder_and_tensors(saved: Path) -> None:
    with pytest.raises(ak.MissingAdapterFileError, match="does not exist"):
        ak.load_adapter(build_tiny("gpt2")[0], saved.parent / "nowhere")
    tensors = safetensors.torch.load_file(str(saved / "adapter_model.safetensors"))
    tensors.pop(sorted(tensors)[0])
    safetensors.torch.save_file(tensors, str(saved / "adapter_model.safetensors"))
    with pytest.raises(ak.AdapterFileError, match="1 missing"):
        ak.load_adapter(build_tiny("gpt2")[0], saved)


def test_an_interrupted_swap_is_pointed_out(saved: Path) -> None:
    saved.rename(saved.parent / ".a.old-1234abcd")  # as a crash between the two renames leaves it
    with pytest.raises(ak.MissingAdapterFileError,
                       match=r"interrupted between its two renames; .*\.a\.old-1234abcd holds the previous complete"):
        ak.load_adapter(build_tiny("gpt2")[0], saved)


def test_optional_files_may_be_missing(saved: Path) -> None:
    (saved / "README.md").unlink()
    (saved / "adapterkit.json").unlink()
    fresh, _ = build_tiny("gpt2")
    assert ak.load_adapter(fresh, saved) == "default"  # read as a plain PEFT folder


# --- atomic saves ------------------------------------------------------------------------------
def test_failed_save_leaves_the_previous_adapter_byte_identical(saved: Path, monkeypatch) -> None:
    before = folder_bytes(saved)
    model, _ = trained("gpt2", ak.LoraConfig(rank=4))
    perturb(model, "task", seed=7)

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # a partial file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        ak.save_adapter(model, "task", saved)
    assert folder_bytes(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["a"]  # no temporary folder left


def test_failed_swap_restores_the_previous_adapter(saved: Path, monkeypatch) -> None:
    (saved / "train_log.txt").write_text("kept")
    before = folder_bytes(saved)
    model, _ = trained("gpt2", ak.LoraConfig(rank=4))
    real_rename = __import__("os").rename

    def failing_rename(src, dst):
        if Path(dst) == saved and ".tmp-" in Path(src).name:
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr("adapterkit.core.atomic.os.rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        ak.save_adapter(model, "task", saved)
    assert folder_bytes(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["a"]


def test_overwrite_keeps_foreign_files_and_replaces_the_adapter(saved: Path) -> None:
    (saved / "train_log.txt").write_text("kept")
    model, inputs = trained("gpt2", ak.LoraConfig(rank=2))
    ak.save_adapter(model, "task", saved)
    assert (saved / "train_log.txt").read_text() == "kept"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 2
    fresh, _ = build_tiny("gpt2")
    ak.load_adapter(fresh, saved)
    assert torch.equal(output_tensor(fresh, inputs), output_tensor(model, inputs))


def test_saving_onto_a_file_is_refused(tmp_path: Path) -> None:
    model, _ = trained("gpt2", ak.LoraConfig(rank=2))
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        ak.save_adapter(model, "task", tmp_path / "f")


def test_tensor_shapes_fit_only_by_adding_or_dropping_unit_dimensions() -> None:
    from adapterkit.core.registry import ShapeMismatchError, fit_shape

    param = torch.zeros(4, 1)
    assert fit_shape(torch.ones(4), param, "v").shape == (4, 1)
    with pytest.raises(ShapeMismatchError, match=r"v has shape \(1, 4\) in the file but \(4, 1\)"):
        fit_shape(torch.ones(1, 4), param, "v")
