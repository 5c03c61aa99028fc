"""``export_merged``: a merged model folder that plain transformers loads, in a process without adapterkit.

The reference is the adapted model's own output under the plan; the exported
folder is loaded by ``AutoModelFor*.from_pretrained`` in a subprocess where
``import adapterkit`` fails, and must give the same logits (float32
tolerance from their magnitude) and show the adapter's label names.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import adapterkit as ak
from adapterkit.core.atomic import leftovers
from adapterkit.export.hf_folder import OutputExistsError, export_merged
from tests.cli.test_run_folders import snapshot
from tests.tiny_lm import tiny_model_folder
from tests.tiny_models import build_tiny, perturb
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier
from tests.tolerances import assert_close_scaled, forward_ops

REVIEWS = ["a good film", "the plot was very dull", "great acting and music"]
LABELS = ["neg", "pos"]

# Runs in a fresh interpreter: loads an exported folder the way a user of plain transformers would.
PLAIN_LOAD = r"""
import json, sys
sys.modules["adapterkit"] = None  # any import of adapterkit now raises ImportError
import torch, transformers
from transformers import AutoTokenizer, pipeline
request = json.loads(sys.argv[1])
folder, auto = request["folder"], getattr(transformers, request["auto_class"])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = auto.from_pretrained(folder).eval()
batch = tokenizer(request["texts"], return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits
answer = {"class": type(model).__name__, "dtype": str(model.dtype), "input_ids": batch["input_ids"].tolist(),
          "logits": logits.float().tolist(), "dtype_of_logits": str(logits.dtype),
          "adapterkit_modules": sorted(n for n, m in sys.modules.items() if n.startswith("adapterkit") and m)}
if request.get("pipeline"):
    answer["pipeline"] = [p["label"] for p in pipeline(request["pipeline"], model=folder)(request["texts"])]
print(json.dumps(answer))
"""


def load_plainly(folder: Path, auto_class: str, texts: list[str], pipeline: str | None = None) -> dict:
    """What plain transformers computes from ``folder`` in a process that cannot import adapterkit."""
    request = {"folder": str(folder), "auto_class": auto_class, "texts": texts, "pipeline": pipeline}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ""}  # neither the source tree nor the tests on the path
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, json.dumps(request)], capture_output=True,
                          check=False, text=True, env=env, cwd=folder.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["adapterkit_modules"] == []
    return answer


def adapted_logits(model: torch.nn.Module, tokenizer, texts: list[str], plan=None) -> tuple[torch.Tensor, list]:
    """The adapted model's logits on ``texts`` (under ``plan`` when given) and the token ids fed."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), (ak.use(model, plan) if plan is not None else contextlib.nullcontext()):
        return model(**batch).logits, batch["input_ids"].tolist()


def assert_plain_config(exported: Path, base: Path) -> dict:
    """config.json holds the base's keys (plus labels and padding), nothing of adapterkit's."""
    saved = json.loads((exported / "config.json").read_text())
    original = json.loads((base / "config.json").read_text())
    extra = set(saved) - set(original)
    assert extra <= {"id2label", "label2id", "pad_token_id", "dtype", "transformers_version"}, extra
    assert "adapterkit" not in json.dumps(saved).lower()
    assert saved["architectures"] == original["architectures"]
    return saved


def test_classifier_folder_loads_without_adapterkit_with_labels_and_same_logits(tmp_path: Path) -> None:
    base = tiny_bert_folder(tmp_path / "base")
    model, tokenizer = tiny_lora_classifier(base, labels=LABELS)
    perturb(model, "toy")
    with torch.no_grad():  # a trained-looking head, so the head's fold matters too
        model.classifier.copies["toy"].weight.mul_(3.0)
    model.eval()
    expected, ids = adapted_logits(model, tokenizer, REVIEWS)
    with ak.adapters_disabled(model):
        base_logits, _ = adapted_logits(model, tokenizer, REVIEWS)

    out = export_merged(model, tokenizer, tmp_path / "merged")
    assert out == tmp_path / "merged" and not leftovers(out)
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    saved = assert_plain_config(out, base)
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["label2id"] == {"neg": 0, "pos": 1}

    plain = load_plainly(out, "AutoModelForSequenceClassification", REVIEWS, pipeline="text-classification")
    assert plain["class"] == "BertForSequenceClassification" and plain["input_ids"] == ids
    tolerance = assert_close_scaled(torch.tensor(plain["logits"]), expected, ops=forward_ops(model))
    assert (expected - base_logits).abs().max() > 100 * tolerance  # the adapter's effect is in the file
    assert set(plain["pipeline"]) <= set(LABELS)
    assert plain["pipeline"] == [LABELS[i] for i in expected.argmax(-1).tolist()]


def test_dtype_is_kept_and_generation_config_written(tmp_path: Path) -> None:
    base = tiny_model_folder(tmp_path / "base", "llama")
    model, tokenizer = ak.load_model(base, task="causal-lm")
    model.to(torch.bfloat16)
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2))
    perturb(model, "a")
    out = export_merged(model, tokenizer, tmp_path / "merged")
    saved = assert_plain_config(out, base)
    assert saved["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert (out / "generation_config.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and not ak.list_adapters(model)


def test_export_writes_the_merged_weights_in_the_dtype_asked_for(tmp_path: Path) -> None:
    base = tiny_model_folder(tmp_path / "base", "llama")
    model, tokenizer = ak.load_model(base, task="causal-lm")
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2))
    perturb(model, "a")
    out = export_merged(model, tokenizer, tmp_path / "merged", dtype=torch.bfloat16)
    assert assert_plain_config(out, base)["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_an_existing_output_is_refused_untouched_and_replaced_only_when_asked(tmp_path: Path) -> None:
    model, _ = build_tiny("llama")
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2))
    perturb(model, "a")
    old = tmp_path / "merged"
    old.mkdir()
    (old / "config.json").write_text('{"keep": "me"}')
    (old / "notes.txt").write_text("an earlier export")
    before = snapshot(old)
    with pytest.raises(OutputExistsError, match="already exists.*overwrite"):
        export_merged(model, None, old)
    assert snapshot(old) == before and ak.list_adapters(model) == ["a"]  # nothing changed

    export_merged(model, None, old, overwrite=True)
    assert not (old / "notes.txt").exists() and (old / "model.safetensors").is_file()
    assert not leftovers(old)


def test_a_failed_write_leaves_the_old_folder_whole_and_no_partial_one(tmp_path: Path, monkeypatch) -> None:
    base = tiny_bert_folder(tmp_path / "base")
    old = tmp_path / "merged"
    old.mkdir()
    (old / "config.json").write_text("{}")
    before = snapshot(old)
    for target, overwrite in ((old, True), (tmp_path / "fresh", False)):
        model, tokenizer = tiny_lora_classifier(base, labels=LABELS)

        def broken(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(tokenizer, "save_pretrained", broken)  # fails after the weights are written
        with pytest.raises(OSError, match="No space"):
            export_merged(model, tokenizer, target, overwrite=overwrite)
        assert not leftovers(target)
    assert snapshot(old) == before
    assert not (tmp_path / "fresh").exists()


def test_methods_that_cannot_fold_are_refused_with_the_reason(tmp_path: Path) -> None:
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "bn", ak.BottleneckConfig())
    with pytest.raises(ak.MergeError, match="'bn' is a bottleneck adapter.*no weight matrix"):
        export_merged(model, None, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and ak.list_adapters(model) == ["bn"]

    gpt2, _ = build_tiny("gpt2")  # GPT-2 ties its output head to the token embedding
    ak.add_adapter(gpt2, "emb", ak.LoraConfig(rank=2, targets=["wte"]))
    with pytest.raises(ak.MergeError, match="tied embeddings"):
        export_merged(gpt2, None, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
