"""Every refusal of the HTTP server: its status, OpenAI's error shape, an informative message.

Every response these tests receive goes through one check (an httpx event
hook): it is never a 500, and its status is declared for that route in the
app's own OpenAPI schema (routes that do not exist answer 404 / 405).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serve.conftest import CONTEXT, Offline, Running, World

ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "server_overloaded"}


class Declared:
    """The response check every client of this module runs (see the module notes)."""

    def __init__(self, app: Any) -> None:
        self.paths = app.openapi()["paths"]
        # Routes this host does not serve (a generative server's encoder endpoints) stay out of its schema.
        self.hidden = {route.path for route in app.routes if not getattr(route, "include_in_schema", True)}
        self.seen: set[tuple[str, str, int]] = set()

    def check(self, response: httpx.Response) -> None:
        method, path, status = response.request.method.lower(), response.request.url.path, response.status_code
        self.seen.add((method, path, status))
        assert status != 500, f"{method.upper()} {path} answered 500"
        operation = self.paths.get(path, {}).get(method)
        if path in self.hidden:
            assert status in (400, 401, 413, 422), f"{method.upper()} {path} (not served here) answered {status}"
        elif operation is None:
            assert status in (404, 405), f"{method.upper()} {path} is no operation, yet answered {status}"
        else:
            assert str(status) in operation["responses"], (
                f"{method.upper()} {path} answered {status}, which its OpenAPI responses "
                f"{sorted(operation['responses'])} do not declare")

    def client(self, url: str, **options: Any) -> httpx.Client:
        return httpx.Client(base_url=url, timeout=60, event_hooks={"response": [self.check]}, **options)

    def async_client(self, url: str, **options: Any) -> httpx.AsyncClient:
        async def check(response: httpx.Response) -> None:
            self.check(response)
        return httpx.AsyncClient(base_url=url, timeout=60, event_hooks={"response": [check]}, **options)


@pytest.fixture(scope="module")
def declared(llama_server: Running) -> Declared:
    return Declared(llama_server.app)


@pytest.fixture(scope="module")
def http(llama_server: Running, declared: Declared) -> Iterator[httpx.Client]:
    with declared.client(llama_server.url) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None,
                 mentions: tuple[str, ...] = ()) -> dict[str, Any]:
    """``response`` is a refusal with ``status`` in OpenAI's error shape; returns its error object."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and len(error["message"]) > 15, error
    assert error["type"] in ERROR_TYPES, error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    for word in mentions:
        assert word in error["message"], error
    return error


def completion(model: str = "a1", **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "say red twice", "max_tokens": 4, **fields}


def chat(model: str = "a1", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "say red twice"}], "max_tokens": 4, **fields}


# --- requests the server cannot read -------------------------------------------------------------------


def test_malformed_json_is_400(http: httpx.Client) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"):
        response = http.post(path, content=b'{"model": "a1", "prompt": ', headers={"content-type": "application/json"})
        assert_error(response, 400, mentions=("JSON",))


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", completion(temperature=5), "temperature"),
    ("/v1/chat/completions", chat(temperature=5), "temperature"),
    ("/v1/chat/completions", {"model": "a1", "max_tokens": 4}, "messages"),
    ("/v1/chat/completions", chat(messages=[]), "messages"),
    ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
    ("/v1/completions", completion(n=0), "n"),
    ("/v1/completions", completion(max_tokens=0), "max_tokens"),
    ("/v1/completions", completion(top_p=0), "top_p"),
    ("/v1/completions", {"model": "a1"}, "prompt"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, "lora_path"),
])
def test_schema_violations_are_422(http: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    error = assert_error(http.post(path, json=body), 422, code="invalid_request", mentions=("schema",))
    assert error["param"] == param and param.split(".")[0] in error["message"]


def test_json_that_is_not_an_object_is_422(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json=[1, 2, 3]), 422)


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "5"), ("max_tokens", True), ("n", 1.5), ("n", False), ("seed", 2**53), ("seed", -1),
    ("temperature", "0"), ("stream", 1), ("stream", "true"), ("stop", ""), ("stop", ["red", ""]),
    ("stop", ["red"] * 17), ("prompt", []), ("prompt", [[5], []]), ("prompt", [5, "red"]),
])
def test_values_of_the_wrong_type_or_range_are_422_not_coerced(http: httpx.Client, field: str, value: Any) -> None:
    error = assert_error(http.post("/v1/completions", json=completion(**{field: value})), 422, code="invalid_request")
    assert error["param"].split(".")[0] == field


def test_integral_numbers_are_integers(http: httpx.Client, offline: Offline) -> None:
    """JSON Schema counts 2.0 as an integer, so the server does too."""
    response = http.post("/v1/completions", json=completion(max_tokens=6.0, n=2.0, temperature=0, seed=3.0))
    assert response.status_code == 200, response.text
    assert [c["text"].strip() for c in response.json()["choices"]] == [offline.completion("a1", "say red twice", 6)] * 2


def test_extreme_sampling_values_decode_greedily(http: httpx.Client, offline: Offline) -> None:
    """A temperature too small to divide by, or a top_p that is 0 in float32, leave only the top token."""
    for model in ("a4", "prefix"):
        for extreme in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 5e-324}):
            response = http.post("/v1/completions", json=completion(model=model, max_tokens=12, **extreme))
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"].strip() == offline.completion(model, "say red twice", 12)


# --- requests the server reads but will not do ---------------------------------------------------------


def test_unknown_model_is_404(http: httpx.Client, llama_server: Running) -> None:
    for path, body in (("/v1/completions", completion("nope")), ("/v1/chat/completions", chat("nope"))):
        error = assert_error(http.post(path, json=body), 404, code="model_not_found", param="model",
                             mentions=("'nope'", "a1", llama_server.base))
        assert error["type"] == "not_found_error"
    assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404, code="model_not_found")


def test_too_many_sequences_is_413(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json=completion(n=9)), 413, code="too_many_sequences", param="n")
    assert_error(http.post("/v1/chat/completions", json=chat(n=100)), 413, code="too_many_sequences")
    prompts = ["say red twice"] * 3
    assert_error(http.post("/v1/completions", json=completion(prompt=prompts, n=3)), 413, mentions=("n=3",))
    assert_error(http.post("/v1/completions", json=completion(prompt=["hello"] * 9)), 413)


def test_max_tokens_above_the_server_limit_is_400(http: httpx.Client) -> None:
    for path, body in (("/v1/completions", completion(max_tokens=33)),
                       ("/v1/chat/completions", chat(max_tokens=33)),
                       ("/v1/chat/completions", chat(max_tokens=None, max_completion_tokens=1000))):
        assert_error(http.post(path, json=body), 400, code="max_tokens_too_large", param="max_tokens",
                     mentions=("32", "--max-tokens"))


def test_context_length_exceeded_is_400(http: httpx.Client, offline: Offline) -> None:
    long = " ".join(["red"] * (CONTEXT + 10))
    assert len(offline.completion_ids(long)) > CONTEXT
    assert_error(http.post("/v1/completions", json=completion(prompt=long)), 400, code="context_length_exceeded",
                 param="prompt", mentions=(str(CONTEXT),))
    assert_error(http.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": long}])), 400,
                 code="context_length_exceeded", param="messages")
    nearly = " ".join(["red"] * (CONTEXT - 5))
    assert_error(http.post("/v1/completions", json=completion(prompt=nearly, max_tokens=10)), 400,
                 code="context_length_exceeded", param="max_tokens")
    ids = [10] * (CONTEXT + 1)
    assert_error(http.post("/v1/completions", json=completion(prompt=ids)), 400, code="context_length_exceeded")


def test_token_ids_outside_the_vocabulary_are_400(http: httpx.Client, offline: Offline) -> None:
    size = len(offline.tokenizer)
    assert_error(http.post("/v1/completions", json=completion(prompt=[1, size + 5])), 400, code="invalid_tokens",
                 mentions=(str(size + 5),))


def test_unsupported_fields_are_400_not_ignored(http: httpx.Client) -> None:
    for path, body, param in (("/v1/completions", completion(echo=True), "echo"),
                              ("/v1/completions", completion(logprobs=2), "logprobs"),
                              ("/v1/completions", completion(presence_penalty=0.5), "presence_penalty"),
                              ("/v1/chat/completions", chat(logprobs=True), "logprobs"),
                              ("/v1/chat/completions", chat(frequency_penalty=1.0), "frequency_penalty")):
        assert_error(http.post(path, json=body), 400, param=param, mentions=("not supported",))


def test_encoder_endpoints_on_a_generative_server_are_400(http: httpx.Client) -> None:
    for path, body in (("/v1/classify", {"model": "a1", "input": "a good film"}),
                       ("/v1/tag", {"model": "a1", "input": "John lives in Paris"}),
                       ("/v1/answer", {"model": "a1", "question": "who?", "context": "John"})):
        assert_error(http.post(path, json=body), 400, code="wrong_endpoint", mentions=("/v1/completions",))


# --- loading adapters ----------------------------------------------------------------------------------


def _models(http: httpx.Client) -> list[str]:
    response = http.get("/v1/models")
    assert response.status_code == 200
    return [card["id"] for card in response.json()["data"]]


def test_adapter_paths_outside_the_root_are_403(http: httpx.Client, world: World) -> None:
    before = _models(http)
    link = world.root / "escape-link"
    if not link.exists():
        os.symlink(world.outside, link, target_is_directory=True)
    for path in (str(world.outside), "/tmp", "../outside/spare", "loras/../../outside/spare", "escape-link",
                 str(link)):
        assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": path}), 403,
                     code="adapter_path_forbidden", param="lora_path", mentions=("outside the adapter root",))
    assert _models(http) == before


def test_an_adapter_for_another_base_is_403(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "alien", "lora_path": "foreign"}),
                         403, code="base_model_mismatch", param="lora_path", mentions=("another base",))
    assert error["type"] == "permission_error"
    assert "alien" not in _models(http)


def test_a_path_the_file_system_cannot_use_is_400(http: httpx.Client) -> None:
    for path in ("x" * 4000, "spare\x00evil", "a/" + "b" * 300 + "/c" * 10):
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "odd", "lora_path": path})
        if response.status_code == 404:  # some file systems just report that no such folder exists
            assert_error(response, 404, code="adapter_not_found")
        else:
            assert_error(response, 400, code="invalid_adapter_path", param="lora_path")
    error = assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "odd", "lora_path": "x" * 4000}), 400)
    assert len(error["message"]) < 400, "the message repeats the whole path"


def test_a_missing_folder_under_the_root_is_404(http: httpx.Client) -> None:
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "ghost", "lora_path": "no-such-adapter"}),
                 404, code="adapter_not_found", param="lora_path", mentions=("no-such-adapter",))


def test_a_folder_that_holds_no_adapter_is_400(http: httpx.Client, world: World) -> None:
    (world.root / "empty-folder").mkdir(exist_ok=True)
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "empty", "lora_path": "empty-folder"}),
                 400, param="lora_path")


def test_loading_an_existing_name_is_400(http: httpx.Client, llama_server: Running) -> None:
    for name in ("a1", llama_server.base):
        assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "spare"}), 400,
                     code="adapter_exists", param="lora_name", mentions=("already loaded",))


# --- a server with a key, a small body limit and no adapter root -------------------------------------


def test_key_body_limit_and_no_adapter_root(serve: Any, world: World) -> None:
    with serve(api_key="sekret", adapter_root=None, max_body_bytes=2048, adapters={"a1": world.loras["a1"]}) as srv:
        checker = Declared(srv.app)
        with checker.client(srv.url) as anonymous:
            error = assert_error(anonymous.post("/v1/completions", json=completion()), 401, code="invalid_api_key",
                                 mentions=("Authorization: Bearer",))
            assert error["type"] == "authentication_error"
            assert_error(anonymous.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401,
                         mentions=("not valid",))
            assert_error(anonymous.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "spare"}), 401)
            assert anonymous.get("/health").status_code == 200
        with checker.client(srv.url, headers={"authorization": "Bearer sekret"}) as keyed:
            assert keyed.post("/v1/completions", json=completion()).status_code == 200
            assert_error(keyed.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(world.spare)}),
                         403, code="adapter_root_not_set", mentions=("--adapter-root",))
            big = completion(prompt=" ".join(["red"] * 600))
            assert len(json.dumps(big)) > 2048
            assert_error(keyed.post("/v1/completions", json=big), 413, code="body_too_large",
                         mentions=("2048", "--max-body-bytes"))

            def chunks() -> Iterator[bytes]:
                payload = json.dumps(big).encode()
                for start in range(0, len(payload), 500):
                    yield payload[start:start + 500]
            response = keyed.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            assert "content-length" not in response.request.headers
            assert response.request.headers.get("transfer-encoding") == "chunked"
            assert_error(response, 413, code="body_too_large")
            assert keyed.post("/v1/completions", json=completion()).status_code == 200


# --- overload ------------------------------------------------------------------------------------------


def test_a_full_queue_is_503_with_retry_after(serve: Any, world: World, offline: Offline) -> None:
    async def flood(url: str, checker: Declared) -> list[httpx.Response]:
        async with checker.async_client(url) as client:
            bodies = [completion(model=("a1", "a2")[i % 2], max_tokens=32, temperature=0) for i in range(24)]
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))

    with serve(max_queue=1, max_batch=1, adapters={"a1": world.loras["a1"], "a2": world.loras["a2"]}) as srv:
        checker = Declared(srv.app)
        responses = asyncio.run(asyncio.wait_for(flood(srv.url, checker), 90))
        refused = [r for r in responses if r.status_code == 503]
        served = [(i, r) for i, r in enumerate(responses) if r.status_code == 200]
        assert len(refused) + len(served) == len(responses), [r.status_code for r in responses]
        assert refused and served, [r.status_code for r in responses]
        for response in refused:
            assert_error(response, 503, mentions=("waiting",))
            assert response.headers["retry-after"].isdigit()
        for number, response in served:
            model = ("a1", "a2")[number % 2]
            assert response.json()["choices"][0]["text"].strip() == offline.completion(model, "say red twice", 32)
        with checker.client(srv.url) as client:
            assert client.get("/health").json()["queue_depth"] == 0


# --- routes --------------------------------------------------------------------------------------------


def test_unknown_routes_and_wrong_methods(http: httpx.Client) -> None:
    error = assert_error(http.get("/v1/nope"), 404, mentions=("/v1/nope",))
    assert error["type"] == "not_found_error"
    assert_error(http.post("/completions", json=completion()), 404)
    for method, path in (("GET", "/v1/completions"), ("GET", "/v1/chat/completions"), ("POST", "/health"),
                         ("DELETE", "/v1/models"), ("PUT", "/v1/load_lora_adapter")):
        assert_error(http.request(method, path), 405, mentions=(method, path))


def test_bad_requests_alongside_good_ones_do_not_disturb_them(llama_server: Running, declared: Declared,
                                                               offline: Offline) -> None:
    good = [("/v1/completions", completion(model=m, prompt=p, max_tokens=16, temperature=0))
            for m in ("a2", "a5", "a8", "prefix") for p in ("say red twice", "hello")]
    good += [("/v1/chat/completions", chat(model=m, max_tokens=16, temperature=0)) for m in ("a3", "a6", "prompt")]
    bad: list[tuple[str, Any, int]] = [
        ("/v1/completions", b'{"model": ', 400), ("/v1/completions", completion("nope"), 404),
        ("/v1/chat/completions", chat(temperature=9), 422), ("/v1/completions", completion(max_tokens=500), 400),
        ("/v1/completions", completion(prompt=" ".join(["red"] * 300)), 400),
        ("/v1/completions", completion(n=50), 413), ("/v1/chat/completions", chat(messages=[]), 422),
        ("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "/etc"}, 403),
    ]

    async def send(client: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
        if isinstance(body, bytes):
            return await client.post(path, content=body, headers={"content-type": "application/json"})
        return await client.post(path, json=body)

    async def mixed() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with declared.async_client(llama_server.url) as client:
            jobs = [send(client, path, body) for path, body in good]
            jobs += [send(client, path, body) for path, body, _ in bad * 2]
            order = list(range(len(jobs)))
            order = order[::2] + order[1::2]  # interleave good and bad
            results = await asyncio.gather(*(jobs[i] for i in order))
            by_index = dict(zip(order, results))
            return [by_index[i] for i in range(len(good))], [by_index[i] for i in range(len(good), len(jobs))]

    served, refused = asyncio.run(asyncio.wait_for(mixed(), 90))
    for (path, body), response in zip(good, served):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        if path == "/v1/completions":
            assert choice["text"].strip() == offline.completion(body["model"], body["prompt"], 16)
        else:
            assert choice["message"]["content"].strip() == offline.chat(body["model"], "say red twice", 16)
    for (_, _, status), response in zip(bad * 2, refused):
        assert_error(response, status)
