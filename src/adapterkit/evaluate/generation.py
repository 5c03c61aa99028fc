"""Free text generation and chat with a model and its active adapter(s).

``generate_text`` answers independent prompts; ``ChatSession`` keeps a
conversation, so each reply sees the turns before it. Prompts to a
decoder-only model are wrapped as a user turn in its chat template (or the
plain instruction format) unless ``raw``; an encoder-decoder reads them as
its source text.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.errors import UsageError
from adapterkit.tasks import chat_format
from adapterkit.tasks.generation import GenerationOptions, generate_from_ids

Message = dict[str, str]
DEFAULT_CONTEXT = 2048  # tokens of conversation kept when the tokenizer sets no limit


def _is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _with_format_stops(tokenizer: PreTrainedTokenizerBase, options: GenerationOptions) -> GenerationOptions:
    stops = tuple(options.stop) + tuple(s for s in chat_format.default_stops(tokenizer) if s not in options.stop)
    return GenerationOptions(**{**vars(options), "stop": stops})


def generate_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                  options: GenerationOptions | None = None, system: str | None = None,
                  raw: bool = False) -> list[str]:
    """One generated reply per prompt.

    Args:
        prompts: user messages (or, with ``raw``, texts to continue as they are).
        options: decoding settings (default greedy, 128 new tokens).
        system: a system message put before each prompt (decoder-only models).
        raw: continue the prompt text itself, with no chat template or instruction format.
    """
    options = options or GenerationOptions()
    if _is_encoder_decoder(model) or raw:
        ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
        return generate_from_ids(model, tokenizer, ids, options)
    turns = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompts]
    ids = [chat_format.prompt_ids(tokenizer, t) for t in turns]
    return generate_from_ids(model, tokenizer, ids, _with_format_stops(tokenizer, options))


class ChatSession:
    """A conversation with a decoder-only model; ``reply`` adds a user turn and the model's answer.

    When the conversation outgrows ``max_context`` tokens, the oldest
    exchanges are dropped (a system message stays).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 options: GenerationOptions | None = None, system: str | None = None,
                 max_context: int | None = None) -> None:
        if _is_encoder_decoder(model):
            raise UsageError("chat needs a decoder-only (causal-lm) model; use `adapterkit generate` "
                             "with an encoder-decoder")
        self.model, self.tokenizer = model, tokenizer
        self.options = _with_format_stops(tokenizer, options or GenerationOptions())
        limit = getattr(tokenizer, "model_max_length", None)
        self.max_context = max_context or (limit if limit and limit < 10**6 else DEFAULT_CONTEXT)
        self.system = system
        self.history: list[Message] = []

    def messages(self) -> list[Message]:
        """The conversation so far, system message first."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = []

    def reply(self, text: str) -> str:
        """The model's answer to ``text``, given everything said before."""
        self.history.append({"role": "user", "content": text})
        budget = self.max_context - (self.options.max_new_tokens or 128)
        ids = chat_format.prompt_ids(self.tokenizer, self.messages())
        while len(ids) > budget and len(self.history) > 1:
            self.history = self.history[2:]  # drop the oldest exchange
            ids = chat_format.prompt_ids(self.tokenizer, self.messages())
        answer = generate_from_ids(self.model, self.tokenizer, [ids], self.options)[0]
        self.history.append({"role": "assistant", "content": answer})
        return answer
