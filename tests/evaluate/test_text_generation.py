"""generate_text and ChatSession on a tiny Llama with a ChatML template."""

from __future__ import annotations

import pytest

from adapterkit.evaluate.generation import ChatSession, generate_text
from adapterkit.tasks import chat_format
from adapterkit.tasks.generation import GenerationOptions, generate_from_ids
from tests.tiny_lm import one_thread  # noqa: F401  (a fixture)
from tests.tiny_lm import tiny_llama, tiny_t5, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = GenerationOptions(max_new_tokens=4)


def test_prompts_are_wrapped_in_the_chat_template_unless_raw() -> None:
    tokenizer = tiny_tokenizer(chat_template=True)
    model = tiny_llama(tokenizer)
    wrapped = chat_format.prompt_ids(tokenizer, [{"role": "user", "content": "say red twice"}])
    assert generate_text(model, tokenizer, ["say red twice"], OPTIONS) == \
        generate_from_ids(model, tokenizer, [wrapped], OPTIONS)
    raw = tokenizer("say red twice")["input_ids"]
    assert generate_text(model, tokenizer, ["say red twice"], OPTIONS, raw=True) == \
        generate_from_ids(model, tokenizer, [raw], OPTIONS)


def test_chat_keeps_the_conversation_and_drops_the_oldest_when_full() -> None:
    tokenizer = tiny_tokenizer(chat_template=True)
    model = tiny_llama(tokenizer)
    session = ChatSession(model, tokenizer, OPTIONS, system="say")
    first = session.reply("say red twice")
    second = session.reply("say blue twice")
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first and session.history[3]["content"] == second
    # The second reply saw the first exchange: it equals generating from the whole conversation.
    ids = chat_format.prompt_ids(tokenizer, session.messages()[:-1])
    assert generate_from_ids(model, tokenizer, [ids], session.options)[0] == second
    small = ChatSession(model, tokenizer, OPTIONS, max_context=24)
    for text in ("say red twice", "say blue twice", "say pink twice"):
        small.reply(text)
    assert small.history[0]["content"] != "say red twice"
    session.reset()
    assert session.messages() == [{"role": "system", "content": "say"}]


def test_chat_refuses_an_encoder_decoder() -> None:
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="decoder-only"):
        ChatSession(tiny_t5(tokenizer), tokenizer)
