"""The OpenAI contract, with the official ``openai`` client against a real server: every reply equals
offline generation with the same adapter (``generate_text``; greedy), streaming equals the whole reply,
and adapters come and go at runtime as vLLM's LoRA endpoints make them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from adapterkit.tasks.generation import decode_generated
from tests.serve.conftest import LORA_RANKS, Offline, Running, World

MODELS = ["base", *LORA_RANKS, "chatty", "prefix", "prompt"]
PROMPTS = ["say red twice", "what is 2 plus 3 ?", "translate blue to German", "hello", "the answer is four"]
QUESTION = "say green twice"


def name_of(model: str, server: Running) -> str:
    return server.base if model == "base" else model


@pytest.fixture(scope="module")
def client(llama_server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_shows_the_base_and_every_adapter(client: openai.OpenAI, llama_server: Running,
                                                      world: World) -> None:
    cards = {card.id: card for card in client.models.list().data}
    assert sorted(cards) == sorted([llama_server.base, *world.startup])
    base = cards[llama_server.base]
    assert base.root == llama_server.base and getattr(base, "parent", None) is None
    assert base.model_extra.get("max_model_len") == 256
    for name, folder in world.startup.items():
        card = cards[name]
        assert card.object == "model"
        assert card.parent == llama_server.base
        assert card.root == str(folder)
        assert card.model_extra.get("task") == "causal-lm"


@pytest.mark.parametrize("model", MODELS)
def test_completions_equal_offline(client: openai.OpenAI, llama_server: Running, offline: Offline,
                                   model: str) -> None:
    name = name_of(model, llama_server)
    for number, prompt in enumerate(PROMPTS[:3]):
        max_tokens = (6, 17, 32)[number]
        reply = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)
        ids = offline.completion_ids(prompt)
        tokens = offline.tokens(name, ids, max_tokens)
        assert reply.object == "text_completion" and reply.model == name and len(reply.choices) == 1
        assert reply.choices[0].text.strip() == offline.completion(name, prompt, max_tokens)
        assert reply.choices[0].finish_reason == offline.finish_reason(tokens, max_tokens)
        assert reply.usage.completion_tokens == len(tokens)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.total_tokens == len(ids) + len(tokens)


@pytest.mark.parametrize("model", [m for m in MODELS if m != "chatty"])
def test_chat_equals_offline(client: openai.OpenAI, llama_server: Running, offline: Offline, model: str) -> None:
    name = name_of(model, llama_server)
    for content, max_tokens in ((QUESTION, 12), (PROMPTS[1], 32)):
        messages = [{"role": "user", "content": content}]
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                               temperature=0)
        ids = offline.chat_ids(name, messages)
        tokens = offline.tokens(name, ids, max_tokens)
        assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content.strip() == offline.chat(name, content, max_tokens)
        assert reply.choices[0].finish_reason == offline.finish_reason(tokens, max_tokens)
        assert reply.usage.completion_tokens == len(tokens)
        assert reply.usage.prompt_tokens == len(ids)


def test_an_adapter_with_its_own_chat_template_uses_it(client: openai.OpenAI, offline: Offline) -> None:
    messages = [{"role": "system", "content": "say red twice"}, {"role": "user", "content": QUESTION}]
    own = offline.chat_ids("chatty", messages)
    assert own != offline.chat_ids("a1", messages), "the adapter's template renders like the base's"
    tokens = offline.tokens("chatty", own, 20)
    expected = decode_generated(offline.tokenizer, torch.tensor([tokens]), ())[0]
    reply = client.chat.completions.create(model="chatty", messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.prompt_tokens == len(own)
    assert reply.usage.completion_tokens == len(tokens)


def _sse_data(response: httpx.Response) -> list[str]:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[len("data: "):] for line in lines]


@pytest.mark.parametrize("model", ["a3", "base", "prefix"])
def test_streaming_equals_the_whole_reply(client: openai.OpenAI, llama_server: Running, model: str) -> None:
    name = name_of(model, llama_server)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump(exclude_none=True) == whole.usage.model_dump(exclude_none=True)

    whole = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert all(c.usage is None for c in chunks), "usage was sent without stream_options.include_usage"

    body = {"model": name, "prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{llama_server.url}/v1/completions", json=body, timeout=60) as response:
        data = _sse_data(response)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    events = [json.loads(item) for item in data[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole.choices[0].text
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    body = {"model": name, "messages": messages, "max_tokens": 24, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{llama_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        data = _sse_data(response)
    assert data[-1] == "[DONE]"
    assert all(json.loads(item)["object"] == "chat.completion.chunk" for item in data[:-1])


def test_n_choices_with_a_seed(client: openai.OpenAI, offline: Offline) -> None:
    sampled: dict[str, Any] = {"model": "a5", "prompt": PROMPTS[3], "max_tokens": 16, "temperature": 0.8}
    two = client.completions.create(n=2, seed=7, **sampled)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.completions.create(n=2, seed=7, **sampled)
    assert [c.text for c in again.choices] == [c.text for c in two.choices], "a seeded request is not repeatable"
    for index in (0, 1):  # choice i draws from seed + i
        one = client.completions.create(n=1, seed=7 + index, **sampled)
        assert one.choices[0].text == two.choices[index].text
    greedy = client.chat.completions.create(model="a6", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=16, temperature=0, n=2)
    assert [c.message.content.strip() for c in greedy.choices] == [offline.chat("a6", QUESTION, 16)] * 2
    tokens = offline.tokens("a6", offline.chat_ids("a6", [{"role": "user", "content": QUESTION}]), 16)
    assert greedy.usage.completion_tokens == 2 * len(tokens)


def test_stop_strings(client: openai.OpenAI, offline: Offline) -> None:
    for model, prompt in (("a2", PROMPTS[0]), ("a8", PROMPTS[1]), ("a4", PROMPTS[4])):
        words = offline.completion(model, prompt, 32).split()
        later = [w for w in words[1:] if w not in words[:1]]
        if later:
            break
    assert later, "no offline reply with a word to stop at"
    stop = later[0]
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0, stop=[stop])
    expected = offline.completion(model, prompt, 32, stop=(stop,))
    assert reply.choices[0].text.strip() == expected
    assert stop not in reply.choices[0].text and reply.choices[0].finish_reason == "stop"
    assert len(expected) < len(offline.completion(model, prompt, 32))


def test_a_list_of_prompts_and_token_ids(client: openai.OpenAI, offline: Offline) -> None:
    reply = client.completions.create(model="a7", prompt=PROMPTS[:3], max_tokens=10, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice, prompt in zip(reply.choices, PROMPTS[:3]):
        assert choice.text.strip() == offline.completion("a7", prompt, 10)
    assert reply.usage.prompt_tokens == sum(len(offline.completion_ids(p)) for p in PROMPTS[:3])
    assert reply.usage.completion_tokens == sum(len(offline.tokens("a7", offline.completion_ids(p), 10))
                                                for p in PROMPTS[:3])
    ids = offline.completion_ids(PROMPTS[1])
    by_ids = client.completions.create(model="a7", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == reply.choices[1].text


def test_adapters_load_and_unload_at_runtime(client: openai.OpenAI, llama_server: Running, world: World,
                                             offline: Offline) -> None:
    url = llama_server.url
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "runtime-rel", "lora_path": "spare"})
    assert loaded.status_code == 200 and "runtime-rel" in loaded.text
    assert loaded.headers["content-type"].startswith("text/plain")
    loaded = httpx.post(f"{url}/v1/load_lora_adapter",
                        json={"lora_name": "runtime-abs", "lora_path": str(world.spare)})
    assert loaded.status_code == 200
    cards = {card.id: card for card in client.models.list().data}
    for name in ("runtime-rel", "runtime-abs"):
        assert cards[name].parent == llama_server.base
        assert Path(cards[name].root) == world.spare.resolve()
        reply = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert reply.choices[0].text.strip() == offline.completion("spare", PROMPTS[0], 12)
    assert offline.completion("spare", PROMPTS[0], 12) != offline.completion("a1", PROMPTS[0], 12)

    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "runtime-rel"})
    assert gone.status_code == 200 and "runtime-rel" in gone.text
    assert "runtime-rel" not in {card.id for card in client.models.list().data}
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="runtime-rel", prompt=PROMPTS[0], max_tokens=4)
    assert missing.value.status_code == 404 and missing.value.body["code"] == "model_not_found"
    reply = client.completions.create(model="runtime-abs", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert reply.choices[0].text.strip() == offline.completion("spare", PROMPTS[0], 12)
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "runtime-abs"}).status_code == 200
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "runtime-abs"}).status_code == 404


def test_api_key(serve: Any, world: World, offline: Offline) -> None:
    with serve(api_key="sekret", adapters={"a1": world.loras["a1"]}) as server:
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-it", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=4)
        assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        bare = httpx.get(f"{server.url}/v1/models")
        assert bare.status_code == 401 and "Authorization: Bearer" in bare.json()["error"]["message"]

        right = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0)
        assert [card.id for card in right.models.list().data] == [server.base, "a1"]
        reply = right.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert reply.choices[0].text.strip() == offline.completion("a1", PROMPTS[0], 12)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["adapters"] == 1
