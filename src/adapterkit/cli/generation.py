"""``adapterkit generate`` and ``adapterkit chat``: text from a model and its adapter."""

from __future__ import annotations

import json as json_lib
import sys
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.errors import UsageError
from adapterkit.evaluate.generation import ChatSession, generate_text
from adapterkit.models import load_model, load_with_adapter
from adapterkit.tasks.generation import GenerationOptions

GenerativeTask = Literal["causal-lm", "seq2seq"]
EXIT_COMMANDS = ("/exit", "/quit")


def _load(adapter: Path | None, model: str | None, task: str, device: str = "auto",
          quantize: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if adapter is not None:
        loaded, tokenizer, _ = load_with_adapter(adapter, device=device, quantize=quantize)
        return loaded, tokenizer
    if model is None:
        raise UsageError("give --adapter DIR/adapter, or --model NAME for the base model alone")
    loaded, tokenizer = load_model(model, task=task, device=device, quantize=quantize)
    return loaded.eval(), tokenizer


def evaluation_generation(task: str, batch_size: int | None = None, **flags: Any) -> GenerationOptions | None:
    """The ``GenerationOptions`` that ``adapterkit evaluate``'s flags ask for.

    ``flags`` are the generation flags (``max_new_tokens``, ``temperature``,
    ``top_p``, ``stop``, ``seed``), ``None`` where not given. For a
    generative task, ``--batch-size`` also sets how many prompts generate
    together. For any other task: ``None`` when no generation flag was given
    (``evaluate`` then refuses nothing), else the options, which ``evaluate``
    refuses with a message naming the tasks they apply to.
    """
    from adapterkit.evaluate.api import is_generative
    from adapterkit.tasks import get_task

    given = {k: (tuple(v) if k == "stop" else v) for k, v in flags.items() if v is not None}
    if not is_generative(get_task(task)):
        return GenerationOptions(**given) if given else None
    if batch_size is not None:
        given["batch_size"] = batch_size
    return GenerationOptions(**given)


def generate(
    prompts: list[str],
    *,
    adapter: Path | None = None,
    model: str | None = None,
    task: GenerativeTask = "causal-lm",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: str | None = None,
    seed: int | None = None,
    system: str | None = None,
    raw: bool = False,
    device: str = "auto",
    quantize: Literal["int8", "nf4", "fp4"] | None = None,
    json: bool = False,
) -> int:
    """Generate a reply to each prompt (greedy unless --temperature); reads stdin lines without prompts.

    Args:
        prompts: prompts (user messages) to answer.
        adapter: the adapter folder (a run's adapter/); its base model is loaded with it.
        model: a base model alias or folder, used without an adapter when --adapter is not given.
        task: the task to load --model for.
        max_new_tokens: most tokens generated per prompt.
        temperature: 0 decodes greedily; above 0 samples at this temperature.
        top_p: nucleus sampling probability mass (with --temperature).
        stop: a string that ends the generation (cut from the output).
        seed: random seed for sampling.
        system: a system message before each prompt.
        raw: continue the prompt text as it is, without the chat template.
        device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps.
        quantize: store the base's linear layers as int8, nf4 or fp4.
        json: print a JSON list of {"prompt", "text"}.
    """
    loaded, tokenizer = _load(adapter, model, task, device, quantize)
    texts = list(prompts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=(stop,) if stop else (), seed=seed)
    replies = generate_text(loaded, tokenizer, texts, options, system=system, raw=raw)
    if json:
        print(json_lib.dumps([{"prompt": p, "text": r} for p, r in zip(texts, replies)], indent=1))
    else:
        print("\n".join(replies))
    return 0


def chat(
    *,
    adapter: Path | None = None,
    model: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: str | None = None,
    seed: int | None = None,
    system: str | None = None,
    device: str = "auto",
) -> int:
    """Chat with a causal LM: one message per line on stdin, until end of input or /exit; /reset forgets.

    Args:
        adapter: the adapter folder (a run's adapter/); its base model is loaded with it.
        model: a base model alias or folder, used without an adapter when --adapter is not given.
        max_new_tokens: most tokens per reply.
        temperature: 0 decodes greedily; above 0 samples at this temperature.
        top_p: nucleus sampling probability mass (with --temperature).
        stop: a string that ends a reply.
        seed: random seed for sampling.
        system: a system message that opens the conversation.
        device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps.
    """
    loaded, tokenizer = _load(adapter, model, "causal-lm", device)
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=(stop,) if stop else (), seed=seed)
    session = ChatSession(loaded, tokenizer, options, system=system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in EXIT_COMMANDS:
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session.reset()
            continue
        print(session.reply(line.strip()), flush=True)
