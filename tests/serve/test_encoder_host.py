"""EncoderHost and EncoderBatcher: classification, NER and QA adapters on one shared tiny BERT.

Every result is checked against a reference: the same adapter loaded alone
with ``load_with_adapter`` and run through ``predict`` (or a plain forward for
the probabilities), one text at a time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import adapterkit as ak  # noqa: E402
from adapterkit.models import load_with_adapter  # noqa: E402
from adapterkit.serve.encoder import EncoderHost  # noqa: E402
from adapterkit.serve.encoder_batching import EncoderBatcher  # noqa: E402
from adapterkit.serve.errors import BadRequest, Forbidden, NotFound, Overloaded  # noqa: E402
from tests import tiny_ner, tiny_qa, tiny_text  # noqa: E402
from tests.tolerances import assert_close_scaled, forward_ops  # noqa: E402

MAX_LENGTH = 64  # the tiny BERT's position table
VOCAB = list(dict.fromkeys(tiny_text.SPECIALS + tiny_text.WORDS + tiny_ner.VOCAB[5:] + tiny_qa.WORDS))
CLASSIFY_TEXTS = ["a good film", "the plot was dull", "a great story and the acting", "bad", "very quite music"]
TAG_TEXTS = ["John Smith lives in Paris.", "mary met olga at acme today", "the megacorp works with unicef in newyork",
             "nothing here"]
CONTEXTS = ["w1 w2 red w3 w4", "w5 w6 w7 w8 w9 teal w10", "blue w11 w12 w13 w14 w15 w16 w17 w18"]
QUESTION = tiny_qa.QUESTION


def shared_bert_folder(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny 2-layer BERT encoder (pooler included, no task head) whose WordPiece vocabulary covers
    the toy classification, NER and QA words, saved like a hub checkout."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=MAX_LENGTH, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, task: str, labels: list[str] | None, seed: int,
                 config: ak.AdapterConfig | None = None) -> Path:
    """An untrained adapter made non-trivial: noise on its LoRA B (or other) weights and its head copy."""
    model, _ = ak.load_model(base, task=task, labels=labels)
    torch.manual_seed(seed)
    ak.add_adapter(model, "a", config or ak.LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ak.adapter_parameters(model, "a").items():
            if "lora_A" not in name:  # A is random already; B starts at zero
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    ak.save_adapter(model, "a", folder, metadata={"task": task, "labels": labels})
    return folder


ADAPTERS = {  # name -> (task, labels, config)
    "sent": ("classification", ["neg", "pos"], None),
    "yesno": ("classification", ["no", "yes"], None),  # same head size, other label names
    "three": ("classification", ["a", "b", "c"], None),  # another head size: its own task model
    "prompted": ("classification", ["neg", "pos"], "prompt"),  # virtual tokens: batched on its own
    "ner": ("token-classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"], None),
    "ner2": ("token-classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"], "bottleneck"),
    "ner3": ("token-classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"], None),
    "qa": ("question-answering", None, None),
    "qa2": ("question-answering", None, None),
}


def _config(kind: str | None) -> ak.AdapterConfig | None:
    if kind == "prompt":
        return ak.PromptTuningConfig(num_virtual_tokens=4)
    if kind == "bottleneck":
        return ak.BottleneckConfig(reduction_factor=4)
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shared base, one folder per adapter, and a host with all of them loaded."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("encoder")
    base = shared_bert_folder(root / "base")
    folders = {name: make_adapter(base, root / name, task, labels, seed, _config(kind))
               for seed, (name, (task, labels, kind)) in enumerate(ADAPTERS.items())}
    host = EncoderHost(str(base), max_batch=4)
    infos = {name: host.load_adapter(name, folder) for name, folder in folders.items()}
    return {"root": root, "base": base, "folders": folders, "host": host, "infos": infos}


def reference(folder: Path, inputs: list) -> tuple[list, list, torch.nn.Module]:
    """(predict results one input at a time, raw head outputs per input, model) of one adapter alone."""
    model, tokenizer, _ = load_with_adapter(folder)
    predictions, raw = [], []
    with torch.no_grad():
        for item in inputs:
            predictions.append(ak.predict(model, tokenizer, [item], max_length=MAX_LENGTH)[0])
            if isinstance(item, str):
                raw.append(model(**tokenizer(item, return_tensors="pt")).logits[0])
    return predictions, raw, model


def test_load_reports_task_labels_and_method(world):
    infos = world["infos"]
    assert infos["sent"] == {"name": "sent", "task": "classification", "labels": ["neg", "pos"], "method": "lora",
                             "path": str(world["folders"]["sent"])}
    assert infos["ner2"]["method"] == "bottleneck" and infos["prompted"]["method"] == "prompt_tuning"
    assert infos["qa"]["task"] == "question-answering" and infos["qa"]["labels"] is None
    assert world["host"].adapters() == infos
    keys = sorted(world["host"].task_models)
    assert keys == [("classification", 2), ("classification", 3), ("question-answering", None),
                    ("token-classification", 7)]


def test_classify_mixed_batch_matches_each_adapter_alone(world):
    host = world["host"]
    names = ["sent", "yesno", "three", "prompted"]
    items = [(names[i % 4], text) for i, text in enumerate(CLASSIFY_TEXTS * 2)]
    mixed = host.classify(items)  # max_batch=4: several routed chunks, each mixing adapters
    for name in names:
        rows = [i for i, (n, _) in enumerate(items) if n == name]
        predictions, logits, model = reference(world["folders"][name], [items[i][1] for i in rows])
        labels = world["infos"][name]["labels"]
        for i, prediction, row_logits in zip(rows, predictions, logits):
            got = mixed[i]
            assert got["label"] == prediction.label and got["num_classes"] == len(labels)
            expected = torch.softmax(row_logits.double(), -1)
            assert_close_scaled(torch.tensor(got["probs"]), expected, ops=forward_ops(model),
                                scale=float(row_logits.abs().max()), dtype=torch.float32)
            assert labels[int(np.argmax(got["probs"]))] == got["label"]
            alone = host.classify([items[i]])[0]
            assert alone["label"] == got["label"]
            assert_close_scaled(torch.tensor(alone["probs"]), torch.tensor(got["probs"]), ops=forward_ops(model),
                                scale=float(row_logits.abs().max()), dtype=torch.float32)
    # the adapters really differ from each other on the same text
    same_text = host.classify([("sent", "a good film"), ("yesno", "a good film")])
    assert abs(same_text[0]["probs"][0] - same_text[1]["probs"][0]) > 1e-3


def test_tag_entities_match_reference_and_slice_the_text(world):
    host = world["host"]
    names = ("ner", "ner2", "ner3")  # ner3: same head size as ner, other label names
    items = [(names[i % 3], text) for i, text in enumerate(TAG_TEXTS * 3)]
    mixed = host.tag(items)
    found = 0
    for name in names:
        rows = [i for i, (n, _) in enumerate(items) if n == name]
        predictions, _, _ = reference(world["folders"][name], [items[i][1] for i in rows])
        for i, prediction in zip(rows, predictions):
            text = items[i][1]
            got = mixed[i]
            assert [(e["type"], e["start"], e["end"], e["text"]) for e in got] == \
                [(e.type, e.start, e.end, e.text) for e in prediction.entities]
            for entity, expected in zip(got, prediction.entities):
                assert text[entity["start"]:entity["end"]] == entity["text"]
                assert entity["score"] == pytest.approx(expected.score, rel=1e-4, abs=1e-5)
                assert 0.0 < entity["score"] <= 1.0
            found += len(got)
            alone = host.tag([items[i]])[0]
            spans = [(e["type"], e["start"], e["end"]) for e in got]
            assert [(e["type"], e["start"], e["end"]) for e in alone] == spans
            assert [e["score"] for e in alone] == pytest.approx([e["score"] for e in got], rel=1e-4, abs=1e-5)
    assert found > 0, "untrained adapters should still tag some words as entities"
    assert any(e["type"] == "MISC" for result in mixed for e in result), "ner3 decodes with its own label names"


def test_answer_spans_match_reference_and_slice_the_context(world):
    host = world["host"]
    items = [(("qa", "qa2")[i % 2], QUESTION, context) for i, context in enumerate(CONTEXTS * 2)]
    mixed = host.answer(items)
    for name in ("qa", "qa2"):
        rows = [i for i, item in enumerate(items) if item[0] == name]
        predictions, _, _ = reference(world["folders"][name], [(QUESTION, items[i][2]) for i in rows])
        for i, prediction in zip(rows, predictions):
            context, got = items[i][2], mixed[i]
            assert (got["answer"], got["start"], got["end"]) == (prediction.answer, prediction.start, prediction.end)
            assert context[got["start"]:got["end"]] == got["answer"] != ""
            assert got["score"] == pytest.approx(prediction.score, rel=1e-4, abs=1e-6)
    swapped = host.answer([("qa2" if n == "qa" else "qa", q, c) for n, q, c in items])
    assert max(abs(a["score"] - b["score"]) for a, b in zip(mixed, swapped)) > 1e-3  # the adapters differ


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def test_every_task_model_uses_the_one_base_encoder(world):
    slots = list(world["host"].task_models.values())
    assert len(slots) == 4 and len(world["infos"]) == len(ADAPTERS)
    first = dict(slots[0].model.base_model.named_parameters())
    for slot in slots[1:]:
        for name, param in slot.model.base_model.named_parameters():
            plain = name.replace(".base_layer", "")  # the same tensor under an adapter's wrapper
            if plain in first:
                assert param.data_ptr() == first[plain].data_ptr(), name
        assert slot.model.base_model.embeddings.word_embeddings.weight.data_ptr() == \
            first["embeddings.word_embeddings.weight"].data_ptr()
    # the base tensors of all four task models together are exactly one encoder (pooler included)
    one, _ = ak.load_model(world["base"], task="classification", labels=["neg", "pos"])
    base_tensors = [t for slot in slots for t in _tensors(slot.model.base_model)
                    if not any(t is p for p in _adapter_tensors(slot.model))]
    assert _bytes(base_tensors) == _bytes(_tensors(one.base_model))


def _adapter_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for name in ak.list_adapters(model) for p in ak.adapter_parameters(model, name).values()]


def test_three_task_adapters_cost_little_more_than_one_model(tmp_path):
    base = shared_bert_folder(tmp_path / "base", hidden=64)
    host = EncoderHost(str(base))
    for seed, (task, labels) in enumerate([("classification", ["neg", "pos"]), ("token-classification", ["O", "B-PER",
                                           "I-PER"]), ("question-answering", None)]):
        config = ak.LoraConfig(rank=2, alpha=4, targets=["query", "value"])
        host.load_adapter(task, make_adapter(base, tmp_path / task, task, labels, seed, config))
    one, _ = ak.load_model(base, task="classification", labels=["neg", "pos"])
    total = _bytes([t for slot in host.task_models.values() for t in _tensors(slot.model)])
    assert len(host.task_models) == 3
    assert total <= 1.10 * _bytes(_tensors(one)), (total, _bytes(_tensors(one)))


def test_errors_have_their_codes(world, tmp_path):
    host, folders = world["host"], world["folders"]
    with pytest.raises(BadRequest) as err:
        host.tag([("sent", "John lives in Paris")])
    assert err.value.code == "wrong_task" and "/v1/classify" in err.value.message
    with pytest.raises(BadRequest) as err:
        host.classify([("qa", "hello")])
    assert err.value.code == "wrong_task" and "/v1/answer" in err.value.message
    for base_name in (None, host.base_name):
        with pytest.raises(BadRequest) as err:
            host.classify([(base_name, "hello")])
        assert err.value.code == "no_task_head"
    with pytest.raises(NotFound) as err:
        host.classify([("nobody", "hello")])
    assert err.value.code == "model_not_found" and err.value.status == 404
    with pytest.raises(BadRequest) as err:
        host.load_adapter("sent", folders["sent"])
    assert err.value.code == "adapter_exists"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in folders["sent"].iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    (damaged / "adapter_model.safetensors").write_bytes(b"not tensors")
    with pytest.raises(BadRequest) as err:
        host.load_adapter("damaged", damaged)
    assert err.value.code == "invalid_adapter"
    with pytest.raises(NotFound) as err:
        host.unload_adapter("nobody")
    assert err.value.code == "model_not_found"
    assert "damaged" not in host.adapters()


def test_causal_lm_adapter_is_refused_as_wrong_task(world, tmp_path):
    from tests.tiny_lm import tiny_model_folder

    lm = tiny_model_folder(tmp_path / "llama", "llama")
    model, _ = ak.load_model(lm, task="causal-lm")
    ak.add_adapter(model, "lm", ak.LoraConfig(rank=2))
    ak.save_adapter(model, "lm", tmp_path / "lm-adapter", metadata={"task": "causal-lm"})
    with pytest.raises(BadRequest) as err:
        world["host"].load_adapter("lm", tmp_path / "lm-adapter")
    assert err.value.code == "wrong_task" and "/v1/tag" in err.value.message


def test_adapter_of_another_base_is_forbidden(world, tmp_path):
    other = shared_bert_folder(tmp_path / "wide", hidden=48)
    folder = make_adapter(other, tmp_path / "wide-adapter", "classification", ["neg", "pos"], seed=9)
    host = world["host"]
    before = dict(host.task_models)
    with pytest.raises(Forbidden) as err:
        host.load_adapter("wide", folder)
    assert err.value.code == "base_model_mismatch" and err.value.status == 403
    assert "hidden size 48" in err.value.message
    assert host.task_models == before and "wide" not in host.adapters()


def test_unload_then_request_is_not_found(world, tmp_path):
    host = EncoderHost(str(world["base"]))
    host.load_adapter("x", world["folders"]["sent"])
    host.load_adapter("y", world["folders"]["yesno"])
    host.unload_adapter("x")
    with pytest.raises(NotFound) as err:
        host.classify([("x", "good")])
    assert err.value.code == "model_not_found"
    assert host.classify([("y", "good")])[0]["label"] in ("no", "yes")
    host.load_adapter("x", world["folders"]["three"])  # the name is free again
    assert host.adapters()["x"]["labels"] == ["a", "b", "c"]


# --- the batcher ---------------------------------------------------------------------------
def test_batcher_batches_concurrent_requests_and_results_are_right(world):
    host = world["host"]
    batches: list[tuple[str, int, list[str]]] = []
    batcher = EncoderBatcher(host, max_batch=16, max_wait_s=0.05, on_batch=lambda *b: batches.append(b))
    requests = [("classify", [(("sent", "yesno", "three")[i % 3], CLASSIFY_TEXTS[i % 5])]) for i in range(40)]
    requests += [("tag", [("ner", TAG_TEXTS[i % 4])]) for i in range(5)]
    requests += [("answer", [("qa", QUESTION, CONTEXTS[i % 3])]) for i in range(5)]
    start = threading.Barrier(len(requests))

    def send(request):
        start.wait()
        return batcher.submit(*request).result(timeout=60)

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, requests))
    batcher.close()
    assert sum(size for _, size, _ in batches) == len(requests)
    assert len(batches) < len(requests)
    for (kind, items), result in zip(requests, results):
        expected = getattr(host, kind)(items)
        if kind == "classify":
            assert result[0]["label"] == expected[0]["label"]
            np.testing.assert_allclose(result[0]["probs"], expected[0]["probs"], rtol=1e-4, atol=1e-6)
        elif kind == "tag":
            assert [(e["type"], e["start"], e["end"]) for e in result[0]] == \
                [(e["type"], e["start"], e["end"]) for e in expected[0]]
        else:
            assert (result[0]["start"], result[0]["end"]) == (expected[0]["start"], expected[0]["end"])


def test_batcher_bad_request_fails_alone(world):
    batcher = EncoderBatcher(world["host"], max_wait_s=0.05)
    with world["host"].lock:  # hold the worker so that all three land in one batch
        good = batcher.submit("classify", [("sent", "good")])
        bad = batcher.submit("classify", [("ner", "good")])
        unknown = batcher.submit("tag", [("nobody", "John")])
        also_good = batcher.submit("tag", [("ner", "John Smith")])
    assert good.result(timeout=30)[0]["label"] in ("neg", "pos")
    assert isinstance(also_good.result(timeout=30), list) and len(also_good.result()) == 1
    with pytest.raises(BadRequest) as err:
        bad.result(timeout=30)
    assert err.value.code == "wrong_task"
    with pytest.raises(NotFound):
        unknown.result(timeout=30)
    batcher.close()


def _until(condition, seconds: float = 20.0) -> None:
    """Wait until ``condition()`` is true (the worker thread runs on its own schedule)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def _refused_for_shutdown(batcher: EncoderBatcher) -> bool:
    try:
        batcher.submit("classify", [("sent", "good")])
    except Overloaded as err:
        return "shutting down" in err.message
    raise AssertionError("a full queue accepted a request")


def test_batcher_queue_limit_and_close(world):
    host = world["host"]
    batcher = EncoderBatcher(host, max_batch=1, max_wait_s=0.0, max_queue=3)
    with host.lock:  # the worker takes one request, then waits for the lock
        first = batcher.submit("classify", [("sent", "good")])
        _until(lambda: batcher.queue_depth() == 0)
        queued = [batcher.submit("classify", [("sent", "bad")]) for _ in range(3)]
        assert batcher.queue_depth() == 3
        with pytest.raises(Overloaded) as err:
            batcher.submit("classify", [("sent", "dull")])
        assert err.value.status == 503 and err.value.headers["Retry-After"] == "1" and "full" in err.value.message
        closer = threading.Thread(target=batcher.close)  # close(wait=True) blocks until the queue is done
        closer.start()
        _until(lambda: _refused_for_shutdown(batcher))
        assert closer.is_alive() and not any(f.done() for f in queued)
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert first.result(timeout=0)[0]["label"] in ("neg", "pos")
    assert all(f.done() and f.result()[0]["label"] in ("neg", "pos") for f in queued)


def test_batcher_rejects_adapters_unloaded_while_queued(world):
    host = EncoderHost(str(world["base"]))
    host.load_adapter("x", world["folders"]["sent"])
    host.load_adapter("y", world["folders"]["yesno"])
    batcher = EncoderBatcher(host, max_wait_s=0.05)
    with host.lock:
        gone = batcher.submit("classify", [("x", "good")])
        kept = batcher.submit("classify", [("y", "good")])
        host.unload_adapter("x")
    with pytest.raises(NotFound):
        gone.result(timeout=30)
    assert kept.result(timeout=30)[0]["label"] in ("no", "yes")
    batcher.close()


def test_damaged_json_is_invalid_adapter(world, tmp_path):
    folder = tmp_path / "bad-json"
    folder.mkdir()
    for file in world["folders"]["sent"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    kit = json.loads((folder / "adapterkit.json").read_text())
    kit["labels"] = ["only-one"]
    (folder / "adapterkit.json").write_text(json.dumps(kit))
    with pytest.raises(BadRequest) as err:
        world["host"].load_adapter("bad-json", folder)
    assert err.value.code == "invalid_adapter"


def test_close_finishes_the_attached_batcher_then_drops_the_models(world):
    host = EncoderHost(str(world["base"]))
    host.load_adapter("x", world["folders"]["sent"])
    host.batcher = EncoderBatcher(host, max_wait_s=0.05)
    with host.lock:
        pending = [host.batcher.submit("classify", [("x", text)]) for text in CLASSIFY_TEXTS]
        closer = threading.Thread(target=host.close)
        closer.start()
    closer.join(timeout=30)
    assert [f.result(timeout=0)[0]["label"] for f in pending] == [r["label"] for r in world["host"].classify(
        [("sent", text) for text in CLASSIFY_TEXTS])]
    assert host.adapters() == {} and host.task_models == {}
    with pytest.raises(Overloaded, match="shutting down"):
        host.batcher.submit("classify", [("x", "good")])
