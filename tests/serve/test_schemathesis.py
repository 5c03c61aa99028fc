"""Schemathesis 4 against the server's own OpenAPI schema, with requests sent to a real uvicorn server.

Every built-in check runs (``max_response_time`` with a 10 s limit) in the
examples, coverage and fuzzing phases, with a fixed seed, derandomized, at
most 12 generated examples per operation. Half the fuzzed requests name
a loaded adapter (LoRAs, a prefix-tuning adapter), as do the coverage phase's
positive cases (an adapter named ``"0"``), and half the ``lora_path`` values
a real folder, so generation and loading themselves run;
the server generates at most 8 tokens and takes at most 4 sequences per
request, which keeps random requests cheap.

Refusals the static schema cannot express
-----------------------------------------
``positive_data_acceptance`` expects a schema-valid request to succeed (or
401/403/404/409/429/5xx). Some schema-valid requests are refused by design,
with a 400 or 413 that depends on the tokenizer, the files on disk or the
server's flags, none of which a static JSON Schema can state:

- ``context_length_exceeded``: prompt tokens plus ``max_tokens`` over the
  model's context (a count of tokens, not characters);
- a prompt that tokenizes to nothing (``" "`` with this word-level tokenizer),
  and ``invalid_tokens``: token ids past the vocabulary;
- ``max_tokens_too_large`` (``--max-tokens``) and ``too_many_sequences`` (413:
  prompts x ``n`` above ``--max-inputs`` / ``--max-batch``, a product of two fields);
- ``unsupported``: OpenAI fields declared so OpenAI's clients validate
  (penalties, ``echo``, ``logprobs``, ``best_of``, ``suffix``) but refused
  unless neutral, rather than silently ignored;
- loading: ``adapter_exists`` (a name already loaded), ``invalid_adapter`` /
  ``wrong_task`` (a folder holding no usable adapter) and ``invalid_adapter_path``
  (a path the file system cannot take, such as a 4096-character name).

For those two operations the check also accepts 400 and 413, and the extra
check :func:`refusals_are_by_design` then requires each such refusal to carry
one of the codes above (with its ``param``), so any other 400 still fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import schemathesis

from adapterkit.serve.config import ServerConfig
from tests.serve.conftest import Running, World

MAX_EXAMPLES = 12
LIMITS = {"max_tokens": 8, "max_inputs": 4, "max_batch": 8, "max_queue": 64, "max_body_bytes": 64 * 1024}
MODELS = ["a1", "a6", "prefix"]
POSITIVE = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis' default
#: (code, param) of the refusals of schema-valid requests each operation makes by design (see the module notes).
BY_DESIGN = {
    "/v1/completions": {("context_length_exceeded", "prompt"), ("context_length_exceeded", "max_tokens"),
                        (None, "prompt"), ("invalid_tokens", "prompt"), ("max_tokens_too_large", "max_tokens"),
                        ("too_many_sequences", "n"), ("unsupported", "presence_penalty"),
                        ("unsupported", "frequency_penalty"), ("unsupported", "echo"), ("unsupported", "logprobs"),
                        ("unsupported", "best_of"), ("unsupported", "suffix")},
    "/v1/chat/completions": {("context_length_exceeded", "messages"), ("context_length_exceeded", "max_tokens"),
                             ("max_tokens_too_large", "max_tokens"), ("too_many_sequences", "n"),
                             ("unsupported", "presence_penalty"), ("unsupported", "frequency_penalty"),
                             ("unsupported", "logprobs")},
    # A generative server declares the encoder routes too (one contract for every server) and refuses them.
    "/v1/classify": {("wrong_endpoint", None), (None, "input"), ("too_many_inputs", "input")},
    "/v1/tag": {("wrong_endpoint", None), (None, "input"), ("too_many_inputs", "input")},
    "/v1/answer": {("wrong_endpoint", None)},
    "/v1/load_lora_adapter": {("adapter_exists", "lora_name"), ("invalid_adapter", "lora_path"),
                              ("wrong_task", "lora_path"), ("invalid_adapter_path", "lora_path")},
}


def _openapi() -> dict[str, Any]:
    """The OpenAPI schema of a generative server with ``LIMITS`` (the schema needs no model: a stand-in host).

    Schemathesis parametrizes tests when they are collected, before any fixture
    runs, and its lazy ``from_fixture`` loader does not work with pytest 9 (it
    reads ``request.node._nodeid``, which pytest 9 removed); so the schema is
    built here and the requests go to the real server of the ``api_server`` fixture.
    """
    from adapterkit.serve.app import create_app

    return create_app(ServerConfig(model="base", **LIMITS), host=SimpleNamespace(kind="generative")).openapi()


CONFIG = schemathesis.Config.from_dict({
    "seed": 20240601,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
               "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
    "checks": {"enabled": True, "max_response_time": 10},
    "operations": [{"include-path": path, "checks": {"positive_data_acceptance": {
        "expected-statuses": [*POSITIVE, "400", "413"]}}} for path in BY_DESIGN],
    "dictionaries": {"models": {"values": MODELS}, "folders": {"values": ["spare", "a2", "foreign", "/tmp"]}},
    "parameters": {"body.model": {"dictionary": "models", "probability": 0.5},
                   "body.lora_path": {"dictionary": "folders", "probability": 0.5}},
    "request-timeout": 30,
})
schema = schemathesis.openapi.from_dict(_openapi(), config=CONFIG)


def refusals_are_by_design(ctx: Any, response: Any, case: Any) -> None:
    """A 400 or 413 to a schema-valid request must be one of the operation's refusals by design."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code not in (400, 413):
        return
    error = response.json()["error"]
    assert (error["code"], error["param"]) in BY_DESIGN.get(case.path, set()), (
        f"{case.method} {case.path}: a schema-valid request was refused with {response.status_code} "
        f"code={error['code']!r} param={error['param']!r}, not one of the refusals by design: {error['message']}")


@pytest.fixture(scope="module")
def api_server(serve: Any, world: World) -> Iterator[Running]:
    # "0": the coverage phase names this model in its positive cases (it takes the shortest string for
    # ``model`` and ignores the parameter overrides), so those cases generate too.
    adapters = {"0": world.loras["a3"], "a1": world.loras["a1"], "a6": world.loras["a6"], "prefix": world.prefix}
    with serve(adapters=adapters, **LIMITS) as server:
        yield server


@schema.parametrize()
def test_api_conforms_to_its_schema(case: Any, api_server: Running) -> None:
    case.call_and_validate(base_url=api_server.url, additional_checks=[refusals_are_by_design])
    if case.path == "/v1/unload_lora_adapter" and "0" not in {m["id"] for m in httpx.get(
            f"{api_server.url}/v1/models").json()["data"]}:  # its coverage cases unload "0": load it again
        assert httpx.post(f"{api_server.url}/v1/load_lora_adapter",
                          json={"lora_name": "0", "lora_path": "a3"}).status_code == 200
