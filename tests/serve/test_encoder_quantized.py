"""An encoder server on a quantised base: its task models share one quantised encoder and answer as offline."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.models import load_with_adapter
from adapterkit.models.quantize import is_quantized_module
from adapterkit.serve.encoder import EncoderHost
from tests.serve.test_encoder_host import CLASSIFY_TEXTS, CONTEXTS, MAX_LENGTH, QUESTION, TAG_TEXTS, make_adapter, \
    shared_bert_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*stay in float")

TASKS = {"sent": ("classification", ["neg", "pos"]),
         "ner": ("token-classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]),
         "qa": ("question-answering", None)}


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantised_encoder_host_shares_one_quantised_base_and_matches_offline(tmp_path, scheme: str) -> None:
    base = shared_bert_folder(tmp_path / "base", hidden=64)  # 64-wide rows: whole 4-bit blocks
    folders = {name: make_adapter(base, tmp_path / name, task, labels, seed)
               for seed, (name, (task, labels)) in enumerate(TASKS.items())}
    host = EncoderHost(str(base), max_batch=8, quantize=scheme)
    for name, folder in folders.items():
        host.load_adapter(name, folder)
    slots = list(host.task_models.values())
    assert len(slots) == 3
    # one quantised copy of every base linear layer, whichever task model computes with it
    first = {path: m.weight for path, m in slots[0].model.base_model.named_modules() if is_quantized_module(m)}
    assert first
    for slot in slots[1:]:
        for path, module in slot.model.base_model.named_modules():
            if is_quantized_module(module) and path in first:
                assert module.weight is first[path], path
    got = {"sent": host.classify([("sent", t) for t in CLASSIFY_TEXTS]),
           "ner": host.tag([("ner", t) for t in TAG_TEXTS]),
           "qa": host.answer([("qa", QUESTION, c) for c in CONTEXTS])}
    inputs = {"sent": CLASSIFY_TEXTS, "ner": TAG_TEXTS, "qa": [(QUESTION, c) for c in CONTEXTS]}
    for name, folder in folders.items():
        model, tokenizer, _ = load_with_adapter(folder, quantize=scheme)  # offline, on its own quantised base
        with torch.no_grad():
            expected = ak.predict(model, tokenizer, inputs[name], max_length=MAX_LENGTH)
        for served, offline in zip(got[name], expected):
            if name == "sent":
                assert served["label"] == offline.label
            elif name == "ner":
                assert [(e["type"], e["start"], e["end"]) for e in served] == \
                    [(e.type, e.start, e.end) for e in offline.entities]
            else:
                assert (served["answer"], served["start"], served["end"]) == \
                    (offline.answer, offline.start, offline.end)
