"""Request and response bodies, in the shapes OpenAI's and vLLM's clients send and read.

Fields OpenAI defines that the server does not implement are refused when
set to anything but their neutral value (``logprobs``, penalties, ``echo``,
``best_of``), rather than silently ignored. Unknown extra fields are ignored,
as OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_STOPS = 16


def _integral(value: object) -> object:
    """1.0 is an integer to JSON Schema; strict validation takes only ``int``, so integral floats become ints."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Bounds come before the validator, so that they reach the JSON schema (as minimum / maximum).
Int = Annotated[int, BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
# Not 2**63 - 1: JSON numbers are exact only up to 2**53 (RFC 7493), and validators that read them as
# doubles cannot tell 2**63 - 1 from 2**63 + 191, so a larger bound cannot be checked the same everywhere.
Seed = Annotated[int, Field(ge=0, le=2**53 - 1), BeforeValidator(_integral)]
NonEmpty = Annotated[str, Field(min_length=1)]
Stop = NonEmpty | Annotated[list[NonEmpty], Field(max_length=MAX_STOPS)]
TokenIds = Annotated[list[Int], Field(min_length=1)]
Prompt = str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class _Request(BaseModel):
    # Strict: a JSON value of the wrong type (``"5"`` or ``true`` for an integer) is refused, as the schema says,
    # not coerced.
    model_config = ConfigDict(extra="ignore", strict=True)


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every refused request."""

    error: ErrorDetail


# --- models ------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    """One servable model: the base, or an adapter on it (``parent`` = the base)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adapterkit"
    root: str
    parent: str | None = None
    task: str | None = None
    method: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadAdapterRequest(_Request):
    """``POST /v1/load_lora_adapter`` (any adapterkit method, not only LoRA)."""

    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(_Request):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str = Field(min_length=1, max_length=200)
    lora_int_id: Int | None = None


# --- generation --------------------------------------------------------------------------------


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: PositiveInt = 1
    stop: Stop | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: continue a text (or a list of texts, or token ids)."""

    prompt: Prompt
    echo: bool = False
    logprobs: Int | None = None
    best_of: Int | None = None
    suffix: str | None = None


class TextContent(_Request):
    """One text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One turn of a conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContent]

    def text(self) -> str:
        """The message's text (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """A completion (or, streamed, one chunk of it: then ``usage`` is absent until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    """``chat.completion``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# --- encoder tasks -----------------------------------------------------------------------------


class ClassifyRequest(_Request):
    """``POST /v1/classify`` (vLLM's shape): one text or a list."""

    model: str = Field(min_length=1)
    input: str | list[str]


class ClassifyItem(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyItem]
    usage: Usage


class TagRequest(_Request):
    """``POST /v1/tag``: named entities of one text or a list."""

    model: str = Field(min_length=1)
    input: str | list[str]


class Entity(BaseModel):
    """One entity: its type, its text, where it sits in the input (characters) and the model's confidence."""

    type: str
    text: str
    start: int
    end: int
    score: float


class TagItem(BaseModel):
    index: int
    entities: list[Entity]


class TagResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[TagItem]
    usage: Usage


class AnswerRequest(_Request):
    """``POST /v1/answer``: the span of ``context`` that answers ``question``."""

    model: str = Field(min_length=1)
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)


class AnswerResponse(BaseModel):
    id: str
    object: Literal["answer"] = "answer"
    created: int
    model: str
    answer: str
    start: int
    end: int
    score: float
    usage: Usage


class Health(BaseModel):
    """``GET /health``."""

    status: Literal["ok", "stopping"]
    model: str
    adapters: int
    queue_depth: int
