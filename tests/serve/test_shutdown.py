"""Graceful shutdown: requests accepted before the server is told to stop finish, whole and correct."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.serve.conftest import LORA_RANKS, Offline, World

PROMPTS = ["say red twice", "what is 2 plus 3 ?", "translate blue to German", "hello"]


def test_in_flight_requests_finish_when_the_server_stops(serve: Any, offline: Offline, world: World) -> None:
    names = list(LORA_RANKS)
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(24)]
    replies: dict[int, httpx.Response] = {}

    def send(index: int, url: str) -> None:
        model, prompt = jobs[index]
        replies[index] = httpx.post(f"{url}/v1/completions", timeout=60,
                                    json={"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0})

    # one request at a time, so most are still queued or decoding when the stop comes
    with serve(batching="single") as running:
        engine = running.app.state.server.host.engine
        threads = [threading.Thread(target=send, args=(i, running.url)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        # stop once every request has reached the engine (queued, decoding or answered): all were accepted
        while engine.running() + engine.queue_depth() + len(replies) < len(jobs):
            assert time.monotonic() < deadline, "the requests did not all reach the engine within 30 s"
            time.sleep(0.001)
        in_flight = len(jobs) - len(replies)
    # leaving the block stopped the server (as SIGTERM does) and joined it
    for thread in threads:
        thread.join(60)
    assert in_flight > 0, "every request had finished before the stop: the test proved nothing"
    assert not engine._thread.is_alive(), "the generation engine still runs after shutdown"
    assert sorted(replies) == list(range(len(jobs)))
    for index, (model, prompt) in enumerate(jobs):
        reply = replies[index]
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"].strip() == offline.completion(model, prompt, 32)
