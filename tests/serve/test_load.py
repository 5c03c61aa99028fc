"""A bounded load: 120 concurrent chat and completion requests over eight LoRA adapters and the base.

Every reply equals offline generation of its prompt with its adapter (the
references are computed once, before the load); ``/health`` answers
throughout; and ``/metrics`` shows what iteration-level batching promises:
decoding steps of many rows that mix many adapters.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import LORA_RANKS, Offline, Running

PROMPTS = ["say red twice", "what is 2 plus 3 ?", "translate blue to German", "hello", "the answer is four",
           "say pink twice", "what is 4 plus 1 ?"]
REQUESTS = 120
TIME_CAP = 120.0


def jobs(base: str) -> list[tuple[str, str, str, int]]:
    """(kind, model, prompt, max_tokens) of every request: models in turn, one request in three a chat."""
    models = [base, *LORA_RANKS]
    return [("chat" if i % 3 == 0 else "completion", models[i % len(models)], PROMPTS[i % len(PROMPTS)],
             8 + (7 * i) % 25) for i in range(REQUESTS)]


def histogram(text: str, name: str, kind: str) -> dict[str, float]:
    """Cumulative bucket counts (by upper bound) and ``count`` of a histogram in Prometheus' text format."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.labels.get("kind") != kind:
                continue
            if sample.name.endswith("_bucket"):
                values[sample.labels["le"]] = sample.value
            elif sample.name.endswith("_count"):
                values["count"] = sample.value
    return values


def growth(before: str, after: str, name: str) -> dict[str, float]:
    """What a decode histogram gained between two scrapes of ``/metrics``."""
    earlier = histogram(before, name, "decode")
    return {key: value - earlier.get(key, 0.0) for key, value in histogram(after, name, "decode").items()}


def above(values: dict[str, float], bound: str) -> float:
    """Observations above ``bound``."""
    return values.get("count", 0.0) - values.get(bound, 0.0)


async def load(server: Running) -> tuple[list[str], list[dict[str, Any]]]:
    """Send every job at once; the reply texts, and every /health answer seen while they ran."""
    http_client = httpx.AsyncClient(limits=httpx.Limits(max_connections=REQUESTS + 10), timeout=TIME_CAP)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                http_client=http_client)
    health: list[dict[str, Any]] = []
    finished = asyncio.Event()

    async def one(kind: str, model: str, prompt: str, max_tokens: int) -> str:
        if kind == "chat":
            reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                         max_tokens=max_tokens, temperature=0)
            return reply.choices[0].message.content
        reply = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return reply.choices[0].text

    async def watch() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as probe:
            while not finished.is_set():
                response = await probe.get("/health")
                health.append({"status_code": response.status_code, **response.json()})
                await asyncio.sleep(0.02)

    async def run_all() -> list[str]:
        try:
            return await asyncio.gather(*(one(*job) for job in jobs(server.base)))
        finally:
            finished.set()

    async with http_client:
        texts, _ = await asyncio.gather(run_all(), watch())
    return texts, health


def test_concurrent_load_over_many_adapters(llama_server: Running, offline: Offline) -> None:
    work = jobs(llama_server.base)
    expected = [offline.chat(model, prompt, max_tokens) if kind == "chat" else
                offline.completion(model, prompt, max_tokens) for kind, model, prompt, max_tokens in work]
    before = httpx.get(f"{llama_server.url}/metrics").text

    started = time.monotonic()
    texts, health = asyncio.run(asyncio.wait_for(load(llama_server), TIME_CAP))
    elapsed = time.monotonic() - started

    wrong = [(job, text.strip(), want) for job, text, want in zip(work, texts, expected) if text.strip() != want]
    assert not wrong, f"{len(wrong)} of {len(work)} replies differ from offline generation, e.g. {wrong[:3]}"
    assert health and all(h["status_code"] == 200 and h["status"] == "ok" for h in health), health[:5]
    after = httpx.get(f"{llama_server.url}/health")
    assert after.status_code == 200 and after.json()["status"] == "ok" and after.json()["queue_depth"] == 0

    metrics = httpx.get(f"{llama_server.url}/metrics").text
    rows, adapters = (growth(before, metrics, name) for name in ("adapterkit_batch_size", "adapterkit_batch_adapters"))
    assert rows["count"] > 0 and adapters["count"] == rows["count"]
    assert above(rows, "8.0") > 0, f"no decoding step held more than 8 rows during the load ({elapsed:.1f} s): {rows}"
    assert above(adapters, "1.0") > 0, f"no decoding step mixed adapters: {adapters}"
    assert above(adapters, "4.0") > 0, f"no decoding step mixed more than 4 adapters: {adapters}"
    tokens = {s.labels["model"] for f in text_string_to_metric_families(metrics) for s in f.samples
              if f.name == "adapterkit_generated_tokens" and s.name.endswith("_total")}
    assert {"(base)", *LORA_RANKS} <= tokens
