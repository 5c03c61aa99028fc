"""``adapterkit serve`` on an encoder base, over real HTTP: classify, tag and answer adapters on one tiny BERT.

A real uvicorn server runs on 127.0.0.1 in a thread; httpx is the client.
Every result is checked against a reference: the same adapter loaded alone
with ``load_with_adapter`` and run through ``predict`` (and a plain forward for
the probabilities), one input at a time.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

import adapterkit as ak
from adapterkit.serve.app import create_app
from adapterkit.serve.config import ServerConfig
from adapterkit.serve.errors import Overloaded
from tests.serve.test_encoder_host import (
    CLASSIFY_TEXTS,
    CONTEXTS,
    QUESTION,
    TAG_TEXTS,
    make_adapter,
    reference,
    shared_bert_folder,
)
from tests.tolerances import assert_close_scaled, forward_ops

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
ADAPTERS = {  # name -> (task, labels, seed); loaded at start
    "sent": ("classification", ["neg", "pos"], 0),
    "three": ("classification", ["a", "b", "c"], 2),  # another label set and head size
    "ner": ("token-classification", NER_LABELS, 4),
    "qa": ("question-answering", None, 7),
}
RUNTIME = {"yesno": ("classification", ["no", "yes"], 1)}  # under adapter_root, loaded over HTTP
MAX_INPUTS = 8
TIME_CAP = 30.0  # seconds any group of concurrent requests may take


# --- the server -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A uvicorn server for ``app`` in a thread on a free port of 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited during start-up"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The base, adapter folders under one adapter root, and the offline references."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("encoder-http")
    base = shared_bert_folder(root / "base")
    folders = {name: make_adapter(base, root / name, task, labels, seed)
               for name, (task, labels, seed) in {**ADAPTERS, **RUNTIME}.items()}
    refs: dict[str, dict] = {}
    for name in ("sent", "three", "yesno"):
        predictions, logits, model = reference(folders[name], CLASSIFY_TEXTS)
        refs[name] = {text: (p, lg) for text, p, lg in zip(CLASSIFY_TEXTS, predictions, logits)}
        refs[name]["ops"] = forward_ops(model)
    refs["ner"] = dict(zip(TAG_TEXTS, reference(folders["ner"], TAG_TEXTS)[0]))
    refs["qa"] = dict(zip(CONTEXTS, reference(folders["qa"], [(QUESTION, c) for c in CONTEXTS])[0]))
    return {"root": root, "base": base, "folders": folders, "refs": refs,
            "tokenizer": AutoTokenizer.from_pretrained(base)}


@pytest.fixture(scope="module")
def served(world: dict) -> Iterator[dict]:
    config = ServerConfig(model=str(world["base"]), adapters={n: world["folders"][n] for n in ADAPTERS},
                          adapter_root=world["root"], max_inputs=MAX_INPUTS)
    app = create_app(config)
    with RunningServer(app) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        yield {**world, "url": running.url, "client": client, "host": app.state.server.host, "app": app}


def _check_classification(world: dict, name: str, text: str, got: dict) -> None:
    """``got`` (a ``data`` item) against the adapter alone: the label, and the softmax within float32 rounding."""
    prediction, logits = world["refs"][name][text]
    labels = {**ADAPTERS, **RUNTIME}[name][1]
    assert got["label"] == prediction.label
    assert got["num_classes"] == len(labels) == len(got["probs"])
    assert labels[max(range(len(labels)), key=got["probs"].__getitem__)] == got["label"]
    assert_close_scaled(torch.tensor(got["probs"], dtype=torch.float64), torch.softmax(logits.double(), -1),
                        ops=world["refs"][name]["ops"], scale=float(logits.abs().max()), dtype=torch.float32)


def _error_of(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The OpenAI-shaped error of ``response``, after checking its status (and code)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _batch_sizes(client: httpx.Client, kind: str) -> tuple[float, float, dict[float, float]]:
    """(count, sum, cumulative buckets by upper bound) of ``adapterkit_batch_size`` for ``kind``."""
    count = total = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name != "adapterkit_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("kind") != kind:
                continue
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_bucket"):
                buckets[float(sample.labels["le"])] = sample.value
    return count, total, buckets


# --- models -----------------------------------------------------------------------------------------
def test_models_lists_the_adapters_with_parent_and_task(served):
    body = served["client"].get("/v1/models").json()
    base = str(served["base"])
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {base, *ADAPTERS}
    assert cards[base]["parent"] is None
    for name, (task, _, _) in ADAPTERS.items():
        card = cards[name]
        assert card["object"] == "model" and card["parent"] == base and card["task"] == task
        assert card["method"] == "lora" and card["root"] == str(served["folders"][name])
    health = served["client"].get("/health").json()
    assert health == {"status": "ok", "model": base, "adapters": len(ADAPTERS), "queue_depth": 0}


# --- classify, tag, answer -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sent", "three"])
def test_classify_has_vllms_shape_and_matches_offline(served, name):
    texts = CLASSIFY_TEXTS
    before = int(time.time())
    response = served["client"].post("/v1/classify", json={"model": name, "input": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["object"] == "list" and body["model"] == name and body["id"]
    assert before <= body["created"] <= int(time.time())
    assert [item["index"] for item in body["data"]] == list(range(len(texts)))
    for text, item in zip(texts, body["data"]):
        assert set(item) == {"index", "label", "probs", "num_classes"}
        _check_classification(served, name, text, item)
    tokens = sum(len(ids) for ids in served["tokenizer"](texts)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}


def test_classify_single_string_input(served):
    text = CLASSIFY_TEXTS[1]
    body = served["client"].post("/v1/classify", json={"model": "three", "input": text}).json()
    assert len(body["data"]) == 1 and body["data"][0]["index"] == 0
    _check_classification(served, "three", text, body["data"][0])
    # the two adapters answer the same text differently (their heads are not the same)
    other = served["client"].post("/v1/classify", json={"model": "sent", "input": text}).json()
    assert other["data"][0]["num_classes"] == 2 != body["data"][0]["num_classes"]


def test_tag_entities_slice_the_input_and_match_host_and_offline(served):
    response = served["client"].post("/v1/tag", json={"model": "ner", "input": TAG_TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "ner"
    direct = served["host"].tag([("ner", text) for text in TAG_TEXTS])
    found = 0
    for i, (text, item, host_entities) in enumerate(zip(TAG_TEXTS, body["data"], direct)):
        assert item["index"] == i
        entities = item["entities"]
        offline = served["refs"]["ner"][text].entities
        assert [(e["type"], e["start"], e["end"], e["text"]) for e in entities] == \
            [(e.type, e.start, e.end, e.text) for e in offline] == \
            [(e["type"], e["start"], e["end"], e["text"]) for e in host_entities]
        for entity, expected in zip(entities, offline):
            assert text[entity["start"]:entity["end"]] == entity["text"]
            assert entity["score"] == pytest.approx(expected.score, rel=1e-4, abs=1e-5)
            assert 0.0 < entity["score"] <= 1.0
        found += len(entities)
    assert found > 0, "the noisy untrained adapter should tag some words"
    single = served["client"].post("/v1/tag", json={"model": "ner", "input": TAG_TEXTS[0]}).json()
    assert [e["text"] for e in single["data"][0]["entities"]] == [e["text"] for e in body["data"][0]["entities"]]


@pytest.mark.parametrize("context", CONTEXTS)
def test_answer_is_a_span_of_the_context_and_matches_offline(served, context):
    response = served["client"].post("/v1/answer", json={"model": "qa", "question": QUESTION, "context": context})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "answer" and body["model"] == "qa"
    expected = served["refs"]["qa"][context]
    assert context[body["start"]:body["end"]] == body["answer"] != ""
    assert (body["answer"], body["start"], body["end"]) == (expected.answer, expected.start, expected.end)
    assert body["score"] == pytest.approx(expected.score, rel=1e-4, abs=1e-6)
    tokens = len(served["tokenizer"](QUESTION, context)["input_ids"])  # one window: the pair as the model reads it
    assert body["usage"]["prompt_tokens"] == tokens


# --- concurrency ----------------------------------------------------------------------------------
def test_event_loop_answers_while_a_batch_runs(served):
    """Holding the host's lock (as a forward does) must not stall the server's event loop."""
    client = httpx.Client(base_url=served["url"], timeout=5)
    with served["host"].lock, client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 200
        _error_of(client.post("/v1/classify", json={"model": "nobody", "input": "x"}), 404, "model_not_found")


def test_64_concurrent_classify_requests_are_batched_and_right(served):
    client, host = served["client"], served["host"]
    names = ("sent", "three")
    good = [(names[i % 2], CLASSIFY_TEXTS[i % len(CLASSIFY_TEXTS)]) for i in range(64)]
    bad = [({"model": "ner", "input": "John"}, 400, "wrong_task"), ({"model": "nobody", "input": "x"}, 404,
           "model_not_found"), ({"model": "sent", "input": []}, 400, None)] * 2
    count0, sum0, _ = _batch_sizes(client, "classify")

    async def run() -> tuple[list[dict], list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=len(good) + len(bad) + 2)
        async with httpx.AsyncClient(base_url=served["url"], timeout=TIME_CAP, limits=limits) as ac:
            async def queue_depth_reaches(depth: int) -> None:
                while (await ac.get("/health")).json()["queue_depth"] != depth:
                    await asyncio.sleep(0.01)

            def classify(body: dict) -> asyncio.Task:
                return asyncio.create_task(ac.post("/v1/classify", json=body))

            # With the host's lock held (as during a forward) the batcher takes the first request and waits
            # for the lock, so the 64 sent after it pile up in its queue; released, they run as one batch.
            with host.lock:
                first = host.batcher.submit("classify", [("sent", CLASSIFY_TEXTS[0])])
                await asyncio.wait_for(queue_depth_reaches(0), TIME_CAP)
                await asyncio.sleep(0.1)  # well past the batcher's collecting window (5 ms)
                goods = [classify({"model": n, "input": t}) for n, t in good]
                bads = [classify(body) for body, _, _ in bad]
                await asyncio.wait_for(queue_depth_reaches(len(good)), TIME_CAP)
            return await asyncio.wait_for(asyncio.gather(asyncio.wrap_future(first), asyncio.gather(*goods),
                                                         asyncio.gather(*bads)), TIME_CAP)

    first, good_responses, bad_responses = asyncio.run(run())
    _check_classification(served, "sent", CLASSIFY_TEXTS[0], first[0])
    for (name, text), response in zip(good, good_responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == name and len(body["data"]) == 1
        _check_classification(served, name, text, body["data"][0])
    for (_, status, code), response in zip(bad, bad_responses):
        _error_of(response, status, code)
    count, total, buckets = _batch_sizes(client, "classify")
    assert total - sum0 == 1 + len(good)  # every good text ran once, no bad one did
    assert count - count0 == 2  # the first request alone, then the 64 in one batch (max_batch=64)
    assert buckets[32.0] < count, "no batch merged more than 32 requests"


# --- errors ----------------------------------------------------------------------------------------
def test_errors_have_openais_shape_and_codes(served):
    client, base = served["client"], str(served["base"])
    error = _error_of(client.post("/v1/classify", json={"model": "nobody", "input": "x"}), 404, "model_not_found")
    assert error["type"] == "not_found_error" and error["param"] == "model"
    error = _error_of(client.post("/v1/classify", json={"model": base, "input": "x"}), 400, "no_task_head")
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    for endpoint, body in (("/v1/tag", {"model": base, "input": "x"}),
                           ("/v1/answer", {"model": base, "question": QUESTION, "context": CONTEXTS[0]})):
        _error_of(client.post(endpoint, json=body), 400, "no_task_head")
    error = _error_of(client.post("/v1/classify", json={"model": "ner", "input": "x"}), 400, "wrong_task")
    assert "/v1/tag" in error["message"]
    error = _error_of(client.post("/v1/tag", json={"model": "sent", "input": "x"}), 400, "wrong_task")
    assert "/v1/classify" in error["message"]
    _error_of(client.post("/v1/answer", json={"model": "sent", "question": QUESTION, "context": "x y"}), 400,
              "wrong_task")
    for endpoint, body in (("/v1/completions", {"model": "sent", "prompt": "hi", "max_tokens": 3}),
                           ("/v1/chat/completions", {"model": "sent", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 3})):
        error = _error_of(client.post(endpoint, json=body), 400, "wrong_endpoint")
        assert "/v1/classify" in error["message"]
    error = _error_of(client.post("/v1/classify", json={"model": "sent", "input": []}), 400)
    assert error["param"] == "input"
    _error_of(client.post("/v1/tag", json={"model": "ner", "input": []}), 400)
    error = _error_of(client.post("/v1/classify", json={"model": "sent", "input": ["a"] * (MAX_INPUTS + 1)}), 413,
                      "too_many_inputs")
    assert str(MAX_INPUTS) in error["message"]
    assert client.post("/v1/classify", json={"model": "sent", "input": ["a good film"] * MAX_INPUTS}).status_code == 200
    _error_of(client.post("/v1/classify", content=b"{nope", headers={"content-type": "application/json"}), 400)
    _error_of(client.post("/v1/classify", json={"model": "sent"}), 422)


def test_loading_a_causal_lm_adapter_is_wrong_task(served):
    from tests.tiny_lm import tiny_model_folder

    root = served["root"]
    lm = tiny_model_folder(root / "llama", "llama")
    model, _ = ak.load_model(lm, task="causal-lm")
    ak.add_adapter(model, "lm", ak.LoraConfig(rank=2))
    ak.save_adapter(model, "lm", root / "lm-adapter", metadata={"task": "causal-lm"})
    response = served["client"].post("/v1/load_lora_adapter",
                                     json={"lora_name": "lm", "lora_path": str(root / "lm-adapter")})
    error = _error_of(response, 400, "wrong_task")
    assert error["param"] == "lora_path"
    assert "lm" not in {c["id"] for c in served["client"].get("/v1/models").json()["data"]}


def test_runtime_load_answers_at_once_and_unload_makes_it_404(served):
    client = served["client"]
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "yesno", "lora_path": "yesno"})  # relative
    assert response.status_code == 200, response.text
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["yesno"]["parent"] == str(served["base"]) and cards["yesno"]["task"] == "classification"
    body = client.post("/v1/classify", json={"model": "yesno", "input": CLASSIFY_TEXTS}).json()
    for text, item in zip(CLASSIFY_TEXTS, body["data"]):
        _check_classification(served, "yesno", text, item)
    _error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "yesno", "lora_path": "yesno"}), 400,
              "adapter_exists")
    outside = Path(served["root"]).parent
    _error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(outside)}), 403,
              "adapter_path_forbidden")
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "yesno"}).status_code == 200
    _error_of(client.post("/v1/classify", json={"model": "yesno", "input": "a good film"}), 404, "model_not_found")
    _error_of(client.post("/v1/unload_lora_adapter", json={"lora_name": "yesno"}), 404, "model_not_found")
    assert "yesno" not in {c["id"] for c in client.get("/v1/models").json()["data"]}
    # the others are untouched
    body = client.post("/v1/classify", json={"model": "sent", "input": CLASSIFY_TEXTS[0]}).json()
    _check_classification(served, "sent", CLASSIFY_TEXTS[0], body["data"][0])


# --- shutdown --------------------------------------------------------------------------------------
def test_shutdown_stops_the_batcher(world):
    config = ServerConfig(model=str(world["base"]), adapters={"sent": world["folders"]["sent"]})
    app = create_app(config)
    host = app.state.server.host
    with RunningServer(app) as running:
        body = httpx.post(f"{running.url}/v1/classify", json={"model": "sent", "input": CLASSIFY_TEXTS[0]},
                          timeout=30).json()
        _check_classification(world, "sent", CLASSIFY_TEXTS[0], body["data"][0])
        assert host.batcher._thread.is_alive()
    assert not host.batcher._thread.is_alive() and host.batcher.queue_depth() == 0
    with pytest.raises(Overloaded, match="shutting down"):
        host.batcher.submit("classify", [("sent", "a good film")])
    assert host.adapters() == {} and host.task_models == {}
