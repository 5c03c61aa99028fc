"""The FastAPI application: vLLM's OpenAI-compatible LoRA contract, encoder tasks, health and metrics.

Handlers only translate: they check a request, hand it to the host (the
generation engine or the encoder batcher), and shape what comes back as
OpenAI does. Every refusal is an :class:`~adapterkit.serve.errors.APIError`
in OpenAI's error shape; every status a route can answer is declared in the
OpenAPI schema (``/openapi.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterkit.serve.adapter_paths import allowed_adapter_path
from adapterkit.serve.body_limit import BodySizeLimit
from adapterkit.serve.config import ServerConfig
from adapterkit.serve.engine import (
    DoneEvent,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    TextEvent,
    request_id,
)
from adapterkit.serve.errors import APIError, BadRequest, NotFound, TooLarge, Unauthorized
from adapterkit.serve.metrics import ServerMetrics
from adapterkit.serve.encoder_batching import Results
from adapterkit.serve.sampling import SamplingParams
from adapterkit.serve.schemas import (
    MAX_STOPS,
    AnswerRequest,
    AnswerResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    TagRequest,
    TagResponse,
    UnloadAdapterRequest,
)

log = logging.getLogger(__name__)


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Malformed JSON, or a request the server cannot do as given"),
    401: _error("Missing or wrong API key"),
    413: _error("Request body too large"),
    422: _error("The body does not match the schema"),
    500: _error("An internal error (never caused by the request's content)"),
}
MODEL_ERRORS = {**COMMON_ERRORS, 404: _error("Unknown model (adapter or base name)")}
QUEUED_ERRORS = {**MODEL_ERRORS, 503: _error("Overloaded or stopping; see Retry-After")}
# With stream=true: server-sent events, each a JSON chunk in ``data``, the last ``data: [DONE]``. Before
# OpenAPI 3.2 (``itemSchema``) an event stream's ``schema`` describes one event, as clients parse it.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": "A JSON chunk, or [DONE] last"},
                            "event": {"type": "string"}}}
STREAM = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                "description": "The response, or with stream=true, server-sent events ending with data: [DONE]"}}


class _Collector:
    """Receives a request's engine events on the engine's thread and hands them to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def emit(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Server:
    """The state behind the routes: the host, the limits, the metrics."""

    def __init__(self, config: ServerConfig, host: Any, metrics: ServerMetrics) -> None:
        self.config, self.host, self.metrics = config, host, metrics
        self.created = int(time.time())
        self.stopping = False

    # --- models --------------------------------------------------------------------------------

    def cards(self) -> list[ModelCard]:
        base = ModelCard(id=self.host.base_name, created=self.created, root=self.host.base_name,
                         task=getattr(self.host, "task", "encoder"),
                         max_model_len=getattr(self.host, "context_limit", None))
        adapters = [ModelCard(id=name, created=self.created, root=info["path"], parent=self.host.base_name,
                              task=info.get("task"), method=info.get("method"))
                    for name, info in sorted(self.host.adapters().items())]
        return [base, *adapters]

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (``None``: the base)."""
        if model == self.host.base_name:
            return None
        if model in self.host.adapters():
            return model
        names = [self.host.base_name, *sorted(self.host.adapters())]
        raise NotFound(f"the model {model!r} does not exist; this server has {names[:20]}"
                       f"{' ...' if len(names) > 20 else ''}", param="model", code="model_not_found")

    # what each kind of server answers, for the message that names the right endpoints
    ENDPOINTS = {"generative": "/v1/completions or /v1/chat/completions",
                 "encoder": "/v1/classify, /v1/tag or /v1/answer"}

    def require(self, kind: str, endpoint: str) -> Any:
        """The host, if it is of ``kind`` (``generative`` or ``encoder``); else 400 ``wrong_endpoint``."""
        if self.host.kind != kind:
            raise BadRequest(f"{endpoint} needs {'a generative' if kind == 'generative' else 'an encoder'} base "
                             f"model; this server runs the {self.host.kind} model {self.host.base_name!r}: use "
                             f"{self.ENDPOINTS[self.host.kind]}", code="wrong_endpoint")
        return self.host

    # --- generation ------------------------------------------------------------------------------

    def sampling(self, body: CompletionRequest | ChatCompletionRequest, prompt_tokens: int,
                 max_tokens: int | None, default: int, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        """The decoding settings of a request, checked against the server's limits and the context."""
        limit = self.config.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise BadRequest(f"max_tokens is {max_tokens}; this server generates at most {limit} tokens per "
                             "request (--max-tokens)", param="max_tokens", code="max_tokens_too_large")
        room = self.host.context_limit - prompt_tokens
        if room < 1:
            raise BadRequest(f"the prompt has {prompt_tokens} tokens; the model reads at most "
                             f"{self.host.context_limit}", param="messages" if isinstance(
                                 body, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
        wanted = max_tokens if max_tokens is not None else min(default, limit, room)
        if wanted > room:
            raise BadRequest(f"the prompt ({prompt_tokens} tokens) and max_tokens ({wanted}) exceed the model's "
                             f"context of {self.host.context_limit} tokens", param="max_tokens",
                             code="context_length_exceeded")
        stops = body.stops()
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise BadRequest(f"stop takes 1 to {MAX_STOPS} non-empty strings, got {list(stops)!r}", param="stop")
        for field, value in (("presence_penalty", body.presence_penalty),
                             ("frequency_penalty", body.frequency_penalty)):
            if value:
                raise BadRequest(f"{field} is not supported by this server; leave it at 0", param=field,
                                 code="unsupported")
        return SamplingParams(max_tokens=wanted, temperature=body.temperature, top_p=body.top_p,
                              stop=stops + tuple(s for s in extra_stops if s not in stops), seed=body.seed)

    def submit(self, adapter: str | None, prompts: list[list[int]], params: SamplingParams,
               n: int) -> tuple[_Collector, list[GenerationRequest]]:
        """Queue one engine request per prompt; their events all arrive in one collector."""
        if n * len(prompts) > min(self.config.max_inputs, self.config.max_batch):
            raise TooLarge(f"{len(prompts)} prompt(s) x n={n} is more sequences than one request may ask for "
                           f"({min(self.config.max_inputs, self.config.max_batch)})", param="n",
                           code="too_many_sequences")
        collector = _Collector(asyncio.get_running_loop())
        requests = []
        for number, prompt in enumerate(prompts):
            def emit(event: Event, offset: int = number * n) -> None:
                collector.emit((offset, event))
            request = GenerationRequest(adapter, prompt, params, emit, n=n)
            self.host.engine.submit(request)
            requests.append(request)
        return collector, requests

    async def events(self, collector: _Collector, requests: list[GenerationRequest]) -> AsyncIterator[
            tuple[int, Event]]:
        """The events of a submitted group until every request is done; cancels them if the client leaves."""
        remaining = len(requests)
        try:
            while remaining:
                offset, event = await collector.queue.get()
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, DoneEvent):
                    remaining -= 1
                yield offset, event
        finally:
            for request in requests:
                request.cancelled = True  # no effect once done; stops work nobody will read


def _authorize(server: Server) -> Callable[[Request], Awaitable[None]]:
    # async: FastAPI runs a plain ``def`` dependency on its thread pool, a thread hop per request
    async def check(request: Request) -> None:
        key = server.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {key}":
            raise Unauthorized("this server needs an API key: send the header 'Authorization: Bearer KEY'"
                               if not given else "the API key is not valid", code="invalid_api_key")
    return check


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _validation_message(err: RequestValidationError) -> tuple[int, str, str | None]:
    """(status, message, param) of a request FastAPI could not parse or validate."""
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON", None
    first = errors[0] if errors else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                         for e in errors[:5])
    return 422, f"the request does not match the schema: {problems}", param


def create_app(config: ServerConfig, host: Any = None, metrics: ServerMetrics | None = None) -> FastAPI:
    """The application for ``config``; ``host`` may be given ready-made (tests), else it is built here."""
    metrics = metrics or ServerMetrics()
    if host is None:
        from adapterkit.serve.run import build_host

        host = build_host(config, metrics)
    server = Server(config, host, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.stopping = True
        await asyncio.to_thread(host.close, True)  # in-flight requests finish first

    app = FastAPI(title="adapterkit", version=_version(), lifespan=lifespan,
                  description="Many adapters on one base model, behind OpenAI's API (vLLM's LoRA contract) "
                              "plus /v1/classify, /v1/tag and /v1/answer.")
    app.state.server = server
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    auth = [Depends(_authorize(server))]

    def error_response(request: Request, status: int, body: dict[str, Any],
                       headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(request.url.path, str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(request, err.status, err.body(), err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        status, message, param = _validation_message(err)
        return error_response(request, status, APIError(message, param=param, code="invalid_request").body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(err.status_code, "invalid_request_error")
        message = {404: f"no route {request.url.path}; see /docs for the API",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code,
                                                                                       str(err.detail))
        body = {"error": {"message": message, "type": kind, "param": None, "code": str(err.status_code)}}
        return error_response(request, err.status_code, body, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        body = APIError(f"internal server error: {type(err).__name__}: {err}", code="internal_error").body()
        body["error"]["type"] = "server_error"
        return error_response(request, 500, body)

    def done(endpoint: str, model: str) -> None:
        metrics.requests.labels(endpoint, model, "200").inc()

    # --- health, metrics, models ------------------------------------------------------------

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        """Whether the server is up, with its model, adapter count and queue depth."""
        return Health(status="stopping" if server.stopping else "ok", model=host.base_name,
                      adapters=len(host.adapters()), queue_depth=_queue_depth(host))

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus exposition format"}})
    async def prometheus() -> Response:
        """Counters and histograms in Prometheus' text format."""
        metrics.queue_depth.labels("all").set(_queue_depth(host))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses=COMMON_ERRORS, tags=["models"])
    async def models() -> ModelList:
        """The base model and every loaded adapter (``parent`` = the base)."""
        return ModelList(data=server.cards())

    @app.post("/v1/load_lora_adapter", dependencies=auth, tags=["models"], response_class=Response,
              responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                               "description": "Loaded"},
                         **COMMON_ERRORS, 403: _error("Path outside --adapter-root, or made for another base"),
                         404: _error("No such folder under the adapter root")})
    async def load_lora_adapter(body: LoadAdapterRequest) -> Response:
        """Load an adapter (any adapterkit method) from a folder under ``--adapter-root``."""
        folder = allowed_adapter_path(body.lora_path, config.adapter_root)
        await asyncio.to_thread(host.load_adapter, body.lora_name, folder)
        done("load_lora_adapter", body.lora_name)
        return Response(f"Success: adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter", dependencies=auth, tags=["models"], response_class=Response,
              responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                               "description": "Unloaded"}, **MODEL_ERRORS})
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> Response:
        """Unload an adapter; requests already accepted for it still finish."""
        await asyncio.to_thread(host.unload_adapter, body.lora_name)
        done("unload_lora_adapter", body.lora_name)
        return Response(f"Success: adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    # --- generation --------------------------------------------------------------------------

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=auth, tags=["generation"],
              responses={**STREAM, **QUEUED_ERRORS})
    async def completions(body: CompletionRequest) -> Any:
        """Continue a prompt (a text, a list of texts, or token ids); ``stream`` sends server-sent events."""
        gen = server.require("generative", "/v1/completions")
        adapter = server.adapter_of(body.model)
        for field, value, neutral in (("echo", body.echo, False), ("logprobs", body.logprobs, None),
                                      ("suffix", body.suffix, None)):
            if value != neutral:
                raise BadRequest(f"{field} is not supported by this server", param=field, code="unsupported")
        if body.best_of not in (None, 1, body.n):
            raise BadRequest("best_of is not supported by this server", param="best_of", code="unsupported")
        prompts = _prompts(gen, body.prompt)
        params = server.sampling(body, max(len(p) for p in prompts), body.max_tokens, default=16)
        collector, requests = server.submit(adapter, prompts, params, body.n)
        rid, created = request_id("cmpl"), int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream_completion(server, collector, requests, rid, created, body.model,
                                                        prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        texts, reasons, completion = await _gather(server, collector, requests)
        done("completions", body.model)
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                            for i in sorted(texts)],
                "usage": _usage(prompt_tokens, completion)}

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=auth,
              tags=["generation"], responses={**STREAM, **QUEUED_ERRORS})
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        """Answer a conversation in the adapter's (or the base's) chat template."""
        gen = server.require("generative", "/v1/chat/completions")
        adapter = server.adapter_of(body.model)
        if body.logprobs or body.top_logprobs:
            raise BadRequest("logprobs are not supported by this server", param="logprobs", code="unsupported")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = gen.chat_ids(adapter, messages)
        except Exception as err:  # a template that cannot render these turns
            raise BadRequest(f"the chat template cannot render these messages: {err}", param="messages") from err
        params = server.sampling(body, len(prompt), body.max_completion_tokens or body.max_tokens,
                                 default=config.max_tokens, extra_stops=gen.chat_stops())
        collector, requests = server.submit(adapter, [prompt], params, body.n)
        rid, created = request_id("chatcmpl"), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream_chat(server, collector, requests, rid, created, body.model,
                                                  len(prompt), include_usage), media_type="text/event-stream")
        texts, reasons, completion = await _gather(server, collector, requests)
        done("chat_completions", body.model)
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                             "finish_reason": reasons[i]} for i in sorted(texts)],
                "usage": _usage(len(prompt), completion)}

    # --- encoder tasks -------------------------------------------------------------------------

    def texts_of(value: str | list[str]) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise BadRequest("input must hold at least one text", param="input")
        if len(texts) > config.max_inputs:
            raise TooLarge(f"input holds {len(texts)} texts; one request may send at most {config.max_inputs}",
                           param="input", code="too_many_inputs")
        return texts

    async def encode(kind: str, endpoint: str, model: str, items: list[tuple]) -> Results:
        enc = server.require("encoder", endpoint)
        adapter = server.adapter_of(model)
        if adapter is None:
            raise BadRequest(f"the base model {model!r} has no trained {kind} head; name one of the adapters "
                             f"{sorted(enc.adapters())}", param="model", code="no_task_head")
        future = enc.batcher.submit(kind, [(adapter, *item) for item in items])
        return await asyncio.wrap_future(future)

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=auth, tags=["encoder"],
              responses=QUEUED_ERRORS)
    async def classify(body: ClassifyRequest) -> Any:
        """Label each text with a classification adapter (vLLM's ``/classify`` shape)."""
        texts = texts_of(body.input)
        results = await encode("classify", "/v1/classify", body.model, [(t,) for t in texts])
        done("classify", body.model)
        return {"id": request_id("classify"), "object": "list", "created": int(time.time()), "model": body.model,
                "data": [{"index": i, "label": r["label"], "probs": r["probs"], "num_classes": len(r["probs"])}
                         for i, r in enumerate(results)],
                "usage": _usage(results.tokens, 0)}

    @app.post("/v1/tag", response_model=TagResponse, dependencies=auth, tags=["encoder"], responses=QUEUED_ERRORS)
    async def tag(body: TagRequest) -> Any:
        """Named entities of each text (type, text, character span, score) with an NER adapter."""
        texts = texts_of(body.input)
        results = await encode("tag", "/v1/tag", body.model, [(t,) for t in texts])
        done("tag", body.model)
        return {"id": request_id("tag"), "object": "list", "created": int(time.time()), "model": body.model,
                "data": [{"index": i, "entities": entities} for i, entities in enumerate(results)],
                "usage": _usage(results.tokens, 0)}

    @app.post("/v1/answer", response_model=AnswerResponse, dependencies=auth, tags=["encoder"],
              responses=QUEUED_ERRORS)
    async def answer(body: AnswerRequest) -> Any:
        """The span of the context that answers the question, with an extractive QA adapter."""
        results = await encode("answer", "/v1/answer", body.model, [(body.question, body.context)])
        result = results[0]
        done("answer", body.model)
        return {"id": request_id("answer"), "object": "answer", "created": int(time.time()), "model": body.model,
                **{k: result[k] for k in ("answer", "start", "end", "score")},
                "usage": _usage(results.tokens, 0)}

    return app


# --- helpers --------------------------------------------------------------------------------------


def _version() -> str:
    from adapterkit import __version__

    return __version__


def _queue_depth(host: Any) -> int:
    if host.kind == "generative":
        return host.engine.queue_depth()
    return host.batcher.queue_depth()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _prompts(host: Any, prompt: Any) -> list[list[int]]:
    """Token ids of each prompt of a completion request."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise BadRequest("prompt must not be empty", param="prompt")
    prompts = []
    for item in items:
        ids = host.completion_ids(item)
        if not isinstance(item, str):
            host.check_vocabulary(ids, "prompt")
        if not ids:
            raise BadRequest("a prompt has no tokens; send at least one", param="prompt")
        prompts.append(ids)
    return prompts


async def _gather(server: Server, collector: _Collector,
                  requests: list[GenerationRequest]) -> tuple[dict[int, str], dict[int, str], int]:
    """Texts and finish reasons by choice index, and the completion token count, of a non-streamed request."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    completion = 0
    async for offset, event in server.events(collector, requests):
        if isinstance(event, TextEvent):
            texts[offset + event.index] = texts.get(offset + event.index, "") + event.text
        elif isinstance(event, FinishEvent):
            texts.setdefault(offset + event.index, "")
            reasons[offset + event.index] = event.reason
        elif isinstance(event, DoneEvent):
            completion += event.completion_tokens
    return texts, reasons, completion


async def _stream_events(server: Server, collector: _Collector, requests: list[GenerationRequest],
                         chunk: Callable[[int, str | None, str | None], dict[str, Any]],
                         usage_chunk: Callable[[dict[str, int]], dict[str, Any]] | None,
                         prompt_tokens: int, endpoint: str, model: str) -> AsyncIterator[bytes]:
    completion = 0
    try:
        async for offset, event in server.events(collector, requests):
            if isinstance(event, TextEvent):
                yield _sse(chunk(offset + event.index, event.text, None))
            elif isinstance(event, FinishEvent):
                yield _sse(chunk(offset + event.index, None, event.reason))
            elif isinstance(event, DoneEvent):
                completion += event.completion_tokens
        if usage_chunk is not None:
            yield _sse(usage_chunk(_usage(prompt_tokens, completion)))
        server.metrics.requests.labels(endpoint, model, "200").inc()
    except APIError as err:  # failed after the stream began: the error goes in the stream
        yield _sse(err.body())
    yield _sse("[DONE]")


def _stream_completion(server: Server, collector: _Collector, requests: list[GenerationRequest], rid: str,
                       created: int, model: str, prompt_tokens: int, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}]}

    def usage(counts: dict[str, int]) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                "usage": counts}

    return _stream_events(server, collector, requests, chunk, usage if include_usage else None, prompt_tokens,
                          "completions", model)


def _stream_chat(server: Server, collector: _Collector, requests: list[GenerationRequest], rid: str,
                 created: int, model: str, prompt_tokens: int, include_usage: bool) -> AsyncIterator[bytes]:
    started: set[int] = set()

    def chunk(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if index not in started:
            started.add(index)
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    def usage(counts: dict[str, int]) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                "usage": counts}

    return _stream_events(server, collector, requests, chunk, usage if include_usage else None, prompt_tokens,
                          "chat_completions", model)
