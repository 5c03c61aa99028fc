"""How a conversation becomes the text a causal LM reads: its chat template, or a plain format.

A tokenizer with a chat template (SmolLM2's ChatML) renders the turns with
it. Without one, turns are written in the Alpaca style::

    ### Instruction:
    What is 2 + 2?

    ### Response:
    4</s>

Either way the prompt text ends exactly where the reply begins, so the
reply's tokens (the only ones the loss sees) are the tokens after the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from adapterkit.errors import UsageError

Message = dict[str, str]
PLAIN_HEADERS = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}
# Without a template, a model that goes on to write the next instruction has finished its reply.
PLAIN_STOPS = ("\n### Instruction:",)


def uses_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer brings its own chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _plain(messages: Sequence[Message]) -> str:
    return "".join(f"{PLAIN_HEADERS[m['role']]}{m['content']}\n\n" for m in messages)


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """The conversation so far, ending with the cue for the assistant's reply."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return _plain(messages) + PLAIN_HEADERS["assistant"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids of ``prompt_text``. A template writes its own special tokens; the
    plain format gets the tokenizer's usual ones (e.g. a beginning-of-sequence token)."""
    text = prompt_text(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"])


def reply_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], reply: str) -> list[int]:
    """Token ids of the reply and whatever ends it (the template's end-of-turn, else EOS).

    With a template, the reply text is what the full conversation adds after
    the prompt text, e.g. ``"4<|im_end|>\\n"`` for ChatML.
    """
    if uses_chat_template(tokenizer):
        before = prompt_text(tokenizer, messages)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}],
                                             tokenize=False)
        if not full.startswith(before):
            raise UsageError("the chat template renders the reply differently from the generation "
                             "prompt, so response tokens cannot be told apart from prompt tokens")
        return list(tokenizer(full[len(before):], add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(reply, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def default_stops(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Stop strings implied by the format (none with a template: its end-of-turn token stops)."""
    return () if uses_chat_template(tokenizer) else PLAIN_STOPS
