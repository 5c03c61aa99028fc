"""Damaged, hand-edited and foreign adapter folders: each is refused with one message that
names the file, the field and both values, as a UserError (so the command line shows no
traceback).

Covers: config values that contradict the tensors of the same folder (rank, head size,
bottleneck width, prefix length); values that ``adapter_config.json`` and
``adapterkit.json`` both state, differently; PEFT folders without ``adapterkit.json``
(task from ``task_type``, base model from ``base_model_name_or_path``); a file given
where a folder is expected; malformed JSON, weights and field types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch

import adapterkit as ak
from adapterkit.errors import UserError
from adapterkit.models import adapter_info, load_with_adapter
from tests.tiny_models import build_tiny, output_tensor
from tests.tiny_text import tiny_bert_folder


def saved(folder: Path, config: ak.AdapterConfig | None = None, kind: str = "bert",
          metadata: dict[str, Any] | None = None) -> Path:
    """A tiny ``kind`` model's adapter (LoRA rank 4 on query/value by default) saved in ``folder``."""
    model, _ = build_tiny(kind)
    ak.add_adapter(model, "task", config or ak.LoraConfig(rank=4, targets=["query", "value"]))
    return ak.save_adapter(model, "task", folder, metadata=metadata)


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to the JSON object in ``path``, as a hand edit would."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def refused(folder: Path, kind: str = "bert", error: type[Exception] = ak.AdapterFileError) -> list[str]:
    """The messages of ``load_adapter`` and ``adapter_info`` on ``folder``; both must raise ``error``.

    The model is left without adapters by the failed load.
    """
    model, _ = build_tiny(kind)
    messages = []
    for attempt in (lambda: ak.load_adapter(model, folder), lambda: adapter_info(folder)):
        with pytest.raises(error) as caught:
            attempt()
        assert isinstance(caught.value, UserError)
        messages.append(str(caught.value))
    assert ak.list_adapters(model) == []
    return messages


# --- 1. config values that contradict the tensors of the same folder -----------------------
def test_rank_edited_in_both_files_names_the_files_and_the_tensor(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    edit(folder / "adapterkit.json", lambda d: d["config"].update(rank=2))
    edit(folder / "adapter_config.json", lambda d: d.update(r=2))
    for message in refused(folder):
        assert "adapterkit.json has config.rank = 2" in message
        assert "adapter_config.json has r = 2" in message
        assert "bert.encoder.layer.0.attention.self.query.lora_A.weight" in message
        assert "shape (4, 32)" in message and "rank 4" in message
        assert "inconsistent" in message and "other layer sizes" not in message


def test_labels_that_do_not_fit_the_saved_head_are_a_folder_inconsistency(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a", metadata={"task": "classification", "labels": ["a", "b", "c"]})
    edit(folder / "adapterkit.json", lambda d: d.update(labels=["a", "b", "c", "d", "e"]))
    for message in refused(folder):
        assert "adapterkit.json lists 5 labels" in message
        assert "classifier.weight" in message and "shape (3, 32)" in message and "3 outputs" in message
        assert "not a sign of another base model" in message


def test_bottleneck_width_that_the_reduction_factor_cannot_give(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a", ak.BottleneckConfig(reduction_factor=4))
    edit(folder / "adapterkit.json", lambda d: d["config"].update(reduction_factor=2))
    edit(folder / "adapter_config.json", lambda d: d.update(reduction_factor=2))
    for message in refused(folder):
        assert "reduction_factor = 2" in message and "adapter_down.weight" in message
        assert "shape (8, 32)" in message and "gives 16" in message


@pytest.mark.parametrize("config,shape", [(ak.PromptTuningConfig(num_virtual_tokens=3), "(3, 32)"),
                                          (ak.PrefixTuningConfig(num_virtual_tokens=3), "(3, 128)")])
def test_prompt_or_prefix_length_that_differs_from_the_table(tmp_path: Path, config: ak.AdapterConfig,
                                                             shape: str) -> None:
    folder = saved(tmp_path / "a", config)
    edit(folder / "adapterkit.json", lambda d: d["config"].update(num_virtual_tokens=5))
    edit(folder / "adapter_config.json", lambda d: d.update(num_virtual_tokens=5))
    for message in refused(folder):
        assert "num_virtual_tokens = 5" in message and "prompt_embeddings" in message
        assert f"shape {shape}" in message and "3 virtual tokens" in message


def test_a_real_head_size_difference_is_still_a_base_model_mismatch(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    model, _ = build_tiny("bert")
    model.config.num_labels = 5
    other = type(model)(model.config)  # the same base with a 5-label head: a real difference
    with pytest.raises(ak.BaseModelMismatchError, match=r"classifier.weight has shape \(3, 32\)"):
        ak.load_adapter(other, folder)


# --- 2. values both files state -----------------------------------------------------------
def test_rank_changed_only_in_adapter_config_is_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    edit(folder / "adapter_config.json", lambda d: d.update(r=2))
    for message in refused(folder):
        assert "adapter_config.json has r = 2" in message
        assert "adapterkit.json has config.rank = 4" in message
        assert "the tensors say 4" in message and "lora_A.weight" in message
        assert "PEFT reads" in message and "delete adapterkit.json" in message


@pytest.mark.parametrize("field,value,words", [
    ("lora_alpha", 99, "lora_alpha = 99"),
    ("use_dora", True, "use_dora = true"),
    ("target_modules", ["query", "key"], 'target_modules = ["query", "key"]'),
    ("task_type", "CAUSAL_LM", 'task_type = "CAUSAL_LM"'),
])
def test_other_shared_values_are_compared(tmp_path: Path, field: str, value: Any, words: str) -> None:
    folder = saved(tmp_path / "a", metadata={"task": "classification"})
    edit(folder / "adapter_config.json", lambda d: d.update({field: value}))
    for message in refused(folder):
        assert words in message and "adapterkit.json has" in message


def test_target_lists_in_another_order_agree(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    edit(folder / "adapter_config.json", lambda d: d.update(target_modules=["value", "query"]))
    assert ak.load_adapter(build_tiny("bert")[0], folder) == "task"


def test_method_disagreement_is_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    edit(folder / "adapterkit.json", lambda d: d.update(method="ia3"))
    for message in refused(folder):
        assert 'adapter_config.json has peft_type = "LORA"' in message
        assert 'adapterkit.json has method = "ia3"' in message


def test_own_schema_copy_that_differs_is_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a", ak.BottleneckConfig(reduction_factor=4))
    edit(folder / "adapter_config.json", lambda d: d.update(non_linearity="gelu"))
    for message in refused(folder):
        assert 'adapter_config.json has non_linearity = "gelu"' in message
        assert 'adapterkit.json has config.non_linearity = "relu"' in message


# --- 3. PEFT folders without adapterkit.json ------------------------------------------------
peft_names = {"SEQ_CLS": "classification", "TOKEN_CLS": "token-classification",
              "QUESTION_ANS": "question-answering", "CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq"}


@pytest.mark.parametrize("task_type", sorted(peft_names))
def test_task_comes_from_peft_task_type(tmp_path: Path, task_type: str) -> None:
    folder = saved(tmp_path / "a")
    (folder / "adapterkit.json").unlink()
    edit(folder / "adapter_config.json", lambda d: d.update(task_type=task_type))
    assert ak.read_adapter_metadata(folder)["task"] == peft_names[task_type]
    assert adapter_info(folder)["task"] == peft_names[task_type]


@pytest.fixture
def peft_folder(tmp_path: Path) -> tuple[Path, Path, torch.Tensor, dict]:
    """(PEFT LoRA folder of a 3-label classifier, its base model folder, PEFT's logits, inputs)."""
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    base = tiny_bert_folder(tmp_path / "base", num_labels=3, dropout=0.0)
    model = BertForSequenceClassification.from_pretrained(str(base)).eval()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                         task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    inputs = {"input_ids": torch.tensor([[2, 5, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        expected = wrapped.eval()(**inputs).logits
    return tmp_path / "adapter", base, expected, inputs


def test_peft_folder_loads_with_task_base_and_head_size_from_its_config(peft_folder) -> None:
    folder, base, expected, inputs = peft_folder
    assert not (folder / "adapterkit.json").exists()
    info = adapter_info(folder)
    assert info["task"] == "classification" and info["base_model"] == str(base) and info["method"] == "lora"
    model, _, metadata = load_with_adapter(folder)
    assert metadata["task"] == "classification" and model.config.num_labels == 3
    assert torch.allclose(output_tensor(model, inputs), expected, atol=1e-5)


def test_peft_folder_without_a_task_says_how_to_give_one(peft_folder) -> None:
    folder, _, _, _ = peft_folder
    edit(folder / "adapter_config.json", lambda d: d.update(task_type=None))
    assert adapter_info(folder)["task"] is None  # info still describes it
    with pytest.raises(ak.AdapterFileError) as caught:
        load_with_adapter(folder)
    message = str(caught.value)
    assert "task of the adapter" in message and "unknown" in message and "no task_type" in message
    assert "SEQ_CLS (classification)" in message and '"task": "classification"' in message
    (folder / "adapterkit.json").write_text('{"task": "classification"}')  # as the message says
    model, _, _ = load_with_adapter(folder)
    assert model.config.num_labels == 3


def test_peft_folder_that_names_no_base_model(peft_folder) -> None:
    folder, _, _, _ = peft_folder
    edit(folder / "adapter_config.json", lambda d: d.update(base_model_name_or_path=None))
    with pytest.raises(ak.AdapterFileError, match="does not say which base model.*base_model_name_or_path"):
        load_with_adapter(folder)


def test_unknown_task_in_adapterkit_json(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a", metadata={"task": "sentiment"})
    with pytest.raises(ak.AdapterFileError, match=r"adapterkit.json: task 'sentiment' is not one adapterkit knows"):
        load_with_adapter(folder)


# --- 4. a file where a folder is expected --------------------------------------------------------
@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors", "adapterkit.json"])
def test_a_file_of_an_adapter_points_at_its_folder(tmp_path: Path, file: str) -> None:
    folder = saved(tmp_path / "a")
    for message in refused(folder / file, error=ak.MissingAdapterFileError):
        assert f"{folder / file} is a file, not a folder" in message
        assert "adapter is a folder holding adapter_config.json and adapter_model.safetensors" in message
        assert f"its folder {folder} is an adapter folder" in message


def test_a_stray_file_gets_no_suggestion(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    for message in refused(tmp_path / "notes.txt", error=ak.MissingAdapterFileError):
        assert "is a file, not a folder" in message and "its folder" not in message


def test_a_run_folder_points_at_the_adapter_inside(tmp_path: Path) -> None:
    saved(tmp_path / "run" / "adapter")
    for message in refused(tmp_path / "run", error=ak.MissingAdapterFileError):
        assert "not an adapter folder" in message and str(tmp_path / "run" / "adapter") in message


# --- 5. malformed files -------------------------------------------------------------------
@pytest.mark.parametrize("file", ["adapter_config.json", "adapterkit.json"])
def test_invalid_json_names_the_file(tmp_path: Path, file: str) -> None:
    folder = saved(tmp_path / "a")
    (folder / file).write_text('{"r": 4,')
    for message in refused(folder):
        assert f"{folder / file} is truncated or corrupt" in message


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"])
def test_weights_that_are_not_safetensors(tmp_path: Path, content: bytes) -> None:
    folder = saved(tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(content)
    for message in refused(folder):
        assert "adapter_model.safetensors is truncated or corrupt" in message


def test_a_truncated_weights_file_in_info(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    for message in refused(folder):
        assert "truncated or corrupt" in message


@pytest.mark.parametrize("file,field,value,words", [
    ("adapter_config.json", "r", "8", "'r' should be an integer, found '8'"),
    ("adapter_config.json", "lora_dropout", [0.1], "'lora_dropout' should be a number"),
    ("adapter_config.json", "target_modules", 5, "'target_modules' should be a list of module names"),
    ("adapter_config.json", "modules_to_save", "classifier", "'modules_to_save' should be a list"),
    ("adapter_config.json", "peft_type", 7, "'peft_type' should be a string"),
    ("adapterkit.json", "fingerprint", [1], "'fingerprint' should be an object"),
    ("adapterkit.json", "labels", 5, "'labels' should be a list of label names"),
    ("adapterkit.json", "labels", ["a", "a", "b"], "'labels' should be distinct"),
    ("adapterkit.json", "name", 3, "'name' should be a non-empty string"),
    ("adapterkit.json", "config", "rank 4", "'config' should be an object"),
    ("adapterkit.json", "metrics", [0.5], "'metrics' should be an object"),
    ("adapterkit.json", "task", ["classification"], "'task' should be a task name"),
])
def test_fields_of_the_wrong_type_name_file_and_field(tmp_path: Path, file: str, field: str,
                                                      value: Any, words: str) -> None:
    folder = saved(tmp_path / "a", metadata={"task": "classification", "labels": ["a", "b", "c"]})
    edit(folder / file, lambda d: d.update({field: value}))
    for message in refused(folder):
        assert str(folder / file) in message and words in message


def test_fingerprint_fields_of_the_wrong_type(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    edit(folder / "adapterkit.json", lambda d: d["fingerprint"].update(hidden_size="32"))
    for message in refused(folder):
        assert "adapterkit.json: 'fingerprint' field 'hidden_size' should be an integer" in message


def test_a_config_value_only_adapterkit_json_states_is_type_checked(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    edit(folder / "adapter_config.json", lambda d: d.pop("lora_dropout"))
    edit(folder / "adapterkit.json", lambda d: d["config"].update(dropout="lots"))
    for message in refused(folder):
        assert str(folder / "adapterkit.json") in message and "'lots'" in message


def test_own_schema_method_that_is_not_a_name(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a", ak.BottleneckConfig())
    edit(folder / "adapter_config.json", lambda d: d.update(adapterkit_method=["bottleneck"]))
    (folder / "adapterkit.json").unlink()
    for message in refused(folder):
        assert "adapter_config.json" in message and "'adapterkit_method' should be a method name" in message


def test_missing_prompt_length_names_the_field(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a", ak.PromptTuningConfig(num_virtual_tokens=3))
    (folder / "adapterkit.json").unlink()
    edit(folder / "adapter_config.json", lambda d: d.pop("num_virtual_tokens"))
    model, _ = build_tiny("bert")
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json: .*num_virtual_tokens"):
        ak.load_adapter(model, folder)


def test_unknown_peft_type_is_refused_on_load_and_described_by_info(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    edit(folder / "adapter_config.json", lambda d: d.update(peft_type="LOHA"))
    (folder / "adapterkit.json").unlink()
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json: .*'LOHA' is not supported"):
        ak.load_adapter(build_tiny("bert")[0], folder)
    assert "LOHA" in adapter_info(folder)["unsupported"]


def test_a_missing_head_tensor_names_the_file(tmp_path: Path) -> None:
    folder = saved(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    tensors.pop("base_model.model.classifier.bias")
    safetensors.torch.save_file(tensors, str(weights))
    model, _ = build_tiny("bert")
    with pytest.raises(ak.AdapterFileError, match=r"adapter_model.safetensors: the saved task head 'classifier' "
                                                  r"lacks \['classifier.bias'\]"):
        ak.load_adapter(model, folder)
    assert ak.list_adapters(model) == []


def test_format_adapter_info_shows_unrecorded_values_as_dashes(tmp_path: Path) -> None:
    from adapterkit.evaluate import format_adapter_info

    folder = saved(tmp_path / "a")
    (folder / "adapterkit.json").unlink()
    edit(folder / "adapter_config.json", lambda d: d.update(task_type=None, peft_type="LOHA"))
    text = format_adapter_info(adapter_info(folder))
    assert "task:             -" in text and "unsupported:" in text and "LOHA" in text
