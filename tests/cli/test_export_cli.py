"""``adapterkit export``: saved adapters -> a merged model folder (or a GGUF LoRA file) from the command line.

Adapters are built through the Python API on tiny local model folders and
saved as a training run would save them; the command's folder is then loaded
by plain transformers in a process without adapterkit and must compute what
the adapted model computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.models import load_with_adapter
from tests.cli.test_run_folders import snapshot
from tests.export.test_hf_folder import LABELS, REVIEWS, adapted_logits, assert_plain_config, load_plainly
from tests.tiny_lm import tiny_model_folder
from tests.tiny_models import perturb
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier
from tests.tolerances import assert_close_scaled, forward_ops

PROMPTS = ["say red twice", "what is two plus three ?"]


def export_cli(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def saved_lora(base: Path, folder: Path, name: str, seed: int, **lora: object) -> Path:
    """A perturbed LoRA adapter ``name`` on the causal LM in ``base``, saved to ``folder``."""
    model, _ = ak.load_model(base, task="causal-lm")
    torch.manual_seed(seed)
    ak.add_adapter(model, name, ak.LoraConfig(rank=2, **lora))
    perturb(model, name, seed=seed)
    ak.save_adapter(model, name, folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny Llama folder and two LoRA adapters "a" and "b" saved for it."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_model_folder(root / "base", "llama")
    return base, saved_lora(base, root / "a", "a", seed=1), saved_lora(base, root / "b", "b", seed=2,
                                                                        targets=["q_proj", "down_proj"])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT folder and a LoRA classification adapter with a head for neg/pos."""
    root = tmp_path_factory.mktemp("bert")
    base = tiny_bert_folder(root / "base")
    model, _ = tiny_lora_classifier(base, labels=LABELS)
    perturb(model, "toy")
    with torch.no_grad():
        model.classifier.copies["toy"].weight.mul_(3.0)
    ak.save_adapter(model, "toy", root / "adapter", metadata={"task": "classification"})
    return base, root / "adapter"


def test_classifier_export_loads_in_plain_transformers_with_its_labels(classifier, tmp_path, capsys) -> None:
    base, adapter = classifier
    out = tmp_path / "merged"
    code, printed, err = export_cli(capsys, "--adapter", adapter, "--output", out)
    assert code == 0, err
    assert f"exported:  {out}" in printed and "plan:      toy folded" in printed

    saved = assert_plain_config(out, base)
    assert saved["id2label"] == {"0": "neg", "1": "pos"}
    model, tokenizer, _ = load_with_adapter(adapter)
    expected, ids = adapted_logits(model, tokenizer, REVIEWS)
    plain = load_plainly(out, "AutoModelForSequenceClassification", REVIEWS, pipeline="text-classification")
    assert plain["input_ids"] == ids
    assert_close_scaled(torch.tensor(plain["logits"]), expected, ops=forward_ops(model))
    assert plain["pipeline"] == [LABELS[i] for i in expected.argmax(-1).tolist()]


def test_causal_lm_export_loads_in_plain_transformers(llama, tmp_path, capsys) -> None:
    base, adapter, _ = llama
    out = tmp_path / "merged"
    code, printed, err = export_cli(capsys, "--adapter", adapter, "--output", out)
    assert code == 0, err
    assert "LlamaForCausalLM (float32)" in printed
    assert_plain_config(out, base)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names

    model, tokenizer, _ = load_with_adapter(adapter)
    expected, ids = adapted_logits(model, tokenizer, PROMPTS)
    plain = load_plainly(out, "AutoModelForCausalLM", PROMPTS)
    assert plain["class"] == "LlamaForCausalLM" and plain["input_ids"] == ids
    assert_close_scaled(torch.tensor(plain["logits"]), expected, ops=forward_ops(model))


def test_an_average_plan_of_two_adapters(llama, tmp_path, capsys) -> None:
    _, a, b = llama
    out = tmp_path / "merged"
    code, _, err = export_cli(capsys, "--adapter", a, b, "--output", out)
    assert code == 2 and "2 adapters (a, b)" in err and "--plan FILE" in err and not out.exists()

    code, _, err = export_cli(capsys, "--adapter", a, "--adapter", b, "--output", out)  # the flag repeated
    assert code == 2 and "2 adapters (a, b)" in err

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"average": [["a", 0.25], ["b", 0.75]]}))
    code, printed, err = export_cli(capsys, "--adapter", a, "--adapter", b, "--plan", plan_file, "--output", out)
    assert code == 0, err
    assert "plan:      Average({'a': 0.25, 'b': 0.75}) folded" in printed

    model, tokenizer, _ = load_with_adapter(a)
    ak.load_adapter(model, b)
    expected, _ = adapted_logits(model, tokenizer, PROMPTS, plan=ak.Average({"a": 0.25, "b": 0.75}))
    only_a, _ = adapted_logits(model, tokenizer, PROMPTS, plan="a")
    plain = load_plainly(out, "AutoModelForCausalLM", PROMPTS)
    tolerance = assert_close_scaled(torch.tensor(plain["logits"]), expected, ops=forward_ops(model))
    assert (only_a - expected).abs().max() > 100 * tolerance  # b's share is in the weights

    (tmp_path / "plan.yaml").write_text("stack: [a, c]\n")
    code, _, err = export_cli(capsys, "--adapter", a, b, "--plan", tmp_path / "plan.yaml",
                              "--output", tmp_path / "other")
    assert code == 2 and "'c'" in err and not (tmp_path / "other").exists()


def test_an_existing_output_needs_overwrite(llama, tmp_path, capsys) -> None:
    _, adapter, _ = llama
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text('{"an": "earlier export"}')
    before = snapshot(out)
    code, _, err = export_cli(capsys, "--adapter", adapter, "--output", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert snapshot(out) == before

    code, _, err = export_cli(capsys, "--adapter", adapter, "--output", adapter, "--overwrite")
    assert code == 2 and "reads" in err  # never replace the adapter being exported

    code, _, err = export_cli(capsys, "--adapter", adapter, "--output", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_bottleneck_adapter_is_refused_with_the_reason(classifier, tmp_path, capsys) -> None:
    base, _ = classifier
    model, _ = ak.load_model(base, labels=LABELS)
    ak.add_adapter(model, "bn", ak.BottleneckConfig())
    ak.save_adapter(model, "bn", tmp_path / "bn", metadata={"task": "classification"})
    code, _, err = export_cli(capsys, "--adapter", tmp_path / "bn", "--output", tmp_path / "merged")
    assert code == 2
    assert "'bn' is a bottleneck adapter" in err and "no weight matrix" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_gguf_format_writes_a_llama_cpp_lora_file(llama, tmp_path, capsys) -> None:
    _, a, b = llama
    target = tmp_path / "a.gguf"
    code, printed, err = export_cli(capsys, "--adapter", a, "--output", target)  # the suffix picks gguf
    assert code == 0, err
    assert "GGUF LoRA adapter 'a'" in printed
    reader = gguf.GGUFReader(target)
    assert reader.fields["general.type"].contents() == "adapter"
    assert any(t.name.endswith(".lora_a") for t in reader.tensors)

    code, _, err = export_cli(capsys, "--adapter", a, "--output", target)
    assert code == 2 and "already exists" in err
    code, _, err = export_cli(capsys, "--adapter", a, "--output", target, "--overwrite")
    assert code == 0, err
    code, _, err = export_cli(capsys, "--adapter", a, b, "--format", "gguf", "--output", tmp_path / "ab.gguf")
    assert code == 2 and "one --adapter" in err
