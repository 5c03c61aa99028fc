"""Fixtures of the serving tests: tiny models and adapters saved in the session, offline references,
and real uvicorn servers on 127.0.0.1.

The models are tiny (hidden 32, two layers), so one torch thread runs them
fastest: with two, thread hand-offs between the engine's thread, uvicorn's and
the test's own reference computations cost ten times the arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.evaluate.generation import generate_text  # noqa: E402
from adapterkit.serve.config import ServerConfig  # noqa: E402
from adapterkit.tasks import chat_format  # noqa: E402
from adapterkit.tasks.generation import GenerationOptions, generate_ids, stop_token_ids  # noqa: E402
from tests.tiny_lm import tiny_model_folder, tiny_tokenizer  # noqa: E402

#: LoRA adapters loaded at start on the tiny Llama: name -> rank (ranks differ, so do targets).
LORA_RANKS = {"a1": 1, "a2": 2, "a3": 3, "a4": 4, "a5": 6, "a6": 8, "a7": 12, "a8": 16}
LORA_TARGETS = {"a3": ["q_proj", "v_proj"], "a7": ["down_proj", "up_proj"]}
#: A chat template of the "chatty" adapter's own (words of the tiny vocabulary only).
CHATTY_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                   "{% if add_generation_prompt %}assistant :{% endif %}")
CONTEXT = 256  # the tiny models' position table


@pytest.fixture(scope="session")
def torch_one_thread() -> Iterator[None]:
    """Tiny models on one intra-op thread for the session (see the module notes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb(model: torch.nn.Module, name: str, seed: int, scale: float = 0.5) -> None:
    """Noise on every parameter of adapter ``name``, so it changes the model's output (LoRA's B starts at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name, include_head=False).values():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


@dataclass
class World:
    """The tiny models and adapter folders of the session."""

    root: Path  # the adapter root every server allows runtime loading from
    llama: Path  # base: tiny Llama with a ChatML chat template
    loras: dict[str, Path]  # the eight LoRA adapters of LORA_RANKS
    chatty: Path  # a LoRA adapter with its own chat_template.jinja
    prefix: Path  # prefix tuning (virtual tokens: runs alone)
    prompt: Path  # prompt tuning (virtual tokens: runs alone)
    spare: Path  # a LoRA adapter not loaded at start (runtime loading)
    foreign: Path  # a LoRA adapter made for a tiny Llama of another hidden size
    outside: Path  # a valid adapter folder outside the root

    @property
    def startup(self) -> dict[str, Path]:
        """Adapters the shared server loads at start."""
        return {**self.loras, "chatty": self.chatty, "prefix": self.prefix, "prompt": self.prompt}


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, torch_one_thread: None) -> World:
    """Build the tiny Llama and save every adapter the serving tests use (about a second)."""
    tmp = tmp_path_factory.mktemp("serve")
    root = tmp / "adapters"
    llama = tiny_model_folder(tmp / "llama", "llama", chat_template=True)
    model, _ = ak.load_model(str(llama), task="causal-lm")
    configs: dict[str, ak.AdapterConfig] = {
        name: ak.LoraConfig(rank=rank, alpha=2 * rank, targets=LORA_TARGETS.get(name))
        for name, rank in LORA_RANKS.items()}
    configs["chatty"] = ak.LoraConfig(rank=4, alpha=8)
    configs["spare"] = ak.LoraConfig(rank=5, alpha=5)
    configs["prefix"] = ak.PrefixTuningConfig(num_virtual_tokens=3)
    configs["prompt"] = ak.PromptTuningConfig(num_virtual_tokens=3)
    for seed, (name, config) in enumerate(configs.items()):
        ak.add_adapter(model, name, config)
        perturb(model, name, seed)
        ak.save_adapter(model, name, root / name)
    (root / "chatty" / "chat_template.jinja").write_text(CHATTY_TEMPLATE, encoding="utf-8")
    ak.save_adapter(model, "spare", tmp / "outside" / "spare")

    tokenizer = tiny_tokenizer(tmp / "llama48", chat_template=True)
    torch.manual_seed(1)
    other = LlamaForCausalLM(LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    other.save_pretrained(tmp / "llama48")
    other, _ = ak.load_model(str(tmp / "llama48"), task="causal-lm")
    ak.add_adapter(other, "foreign", ak.LoraConfig(rank=2, alpha=4))
    ak.save_adapter(other, "foreign", root / "foreign")
    return World(root=root, llama=llama, loras={name: root / name for name in LORA_RANKS}, chatty=root / "chatty",
                 prefix=root / "prefix", prompt=root / "prompt", spare=root / "spare", foreign=root / "foreign",
                 outside=tmp / "outside" / "spare")


# --- offline references ------------------------------------------------------------------------------


def cut_after_eos(tokens: Sequence[int], eos: set[int], budget: int) -> list[int]:
    """Generated ids up to and including the first end-of-sequence token, at most ``budget`` of them.

    Offline generation fills rows that finished with the pad id; the pad id can
    also be generated, so only the end-of-sequence token and the budget end a row.
    """
    kept: list[int] = []
    for token in list(tokens)[:budget]:
        kept.append(int(token))
        if token in eos:
            break
    return kept


class Offline:
    """Offline generation (``adapterkit.evaluate.generation`` / ``tasks.generation``) with the same base and
    adapters the servers load, one prompt alone at a time; results are memoised."""

    def __init__(self, world: World) -> None:
        self.model, self.tokenizer = ak.load_model(str(world.llama), task="causal-lm")
        for name, folder in {**world.startup, "spare": world.spare}.items():
            ak.load_adapter(self.model, folder, name=name)
        self.model.eval()
        self.base = str(world.llama)
        self.eos = set(stop_token_ids(self.model, self.tokenizer))
        self.templates = {"chatty": CHATTY_TEMPLATE}
        self._memo: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def plan(self, model: str) -> Any:
        """The plan of a request's ``model`` (the base runs with no adapter)."""
        return ak.Sum() if model == self.base else model

    def _cached(self, key: tuple, compute: Any) -> Any:
        with self._lock:
            if key not in self._memo:
                self._memo[key] = compute()
            return self._memo[key]

    def completion_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def chat_ids(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        """The prompt offline chat builds: the base's template, or the adapter's own."""
        template = self.templates.get(model)
        if template is None:
            return chat_format.prompt_ids(self.tokenizer, messages)
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokens(self, model: str, prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Greedy generated ids of one prompt alone (``generate_ids``), cut after the first eos."""
        def compute() -> list[int]:
            ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
            with ak.use(self.model, self.plan(model)):
                out = generate_ids(self.model, self.tokenizer, ids, torch.ones_like(ids),
                                   GenerationOptions(max_new_tokens=max_tokens))
            return cut_after_eos(out[0].tolist(), self.eos, max_tokens)
        return self._cached(("ids", model, tuple(prompt_ids), max_tokens), compute)

    def completion(self, model: str, prompt: str, max_tokens: int, stop: Sequence[str] = ()) -> str:
        """``generate_text(..., raw=True)``: the prompt continued as it is (stripped, stop strings cut)."""
        def compute() -> str:
            with ak.use(self.model, self.plan(model)):
                return generate_text(self.model, self.tokenizer, [prompt],
                                     GenerationOptions(max_new_tokens=max_tokens, stop=tuple(stop)), raw=True)[0]
        return self._cached(("completion", model, prompt, max_tokens, tuple(stop)), compute)

    def chat(self, model: str, content: str, max_tokens: int) -> str:
        """``generate_text`` of one user message in the base's chat template (stripped)."""
        def compute() -> str:
            with ak.use(self.model, self.plan(model)):
                return generate_text(self.model, self.tokenizer, [content],
                                     GenerationOptions(max_new_tokens=max_tokens))[0]
        return self._cached(("chat", model, content, max_tokens), compute)

    def finish_reason(self, tokens: Sequence[int], max_tokens: int) -> str:
        return "stop" if tokens and tokens[-1] in self.eos else ("length" if len(tokens) >= max_tokens else "stop")


@pytest.fixture(scope="session")
def offline(world: World) -> Offline:
    """Offline references for the servers built from ``world``."""
    return Offline(world)


# --- servers -----------------------------------------------------------------------------------------


@dataclass
class Running:
    """A server started by :func:`running_server`: its base URL, its app and its configuration."""

    url: str
    app: Any
    config: ServerConfig

    @property
    def base(self) -> str:
        """The base model's id (what ``model`` names to use no adapter)."""
        return self.config.model


@contextlib.contextmanager
def running_server(config: ServerConfig, startup_timeout: float = 60.0) -> Iterator[Running]:
    """``create_app(config)`` served by uvicorn in a thread on 127.0.0.1 (a free port, bound before it starts);
    on exit the server stops as on SIGTERM (in-flight requests finish) and its thread is joined."""
    import uvicorn

    from adapterkit.serve.app import create_app

    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server exited before it started")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start within {startup_timeout} s")
            time.sleep(0.01)
        yield Running(f"http://127.0.0.1:{port}", app, config)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop within 60 s"


@pytest.fixture(scope="session")
def serve(world: World) -> Any:
    """The server factory: ``with serve(max_queue=1) as srv:`` starts a server on the tiny Llama with
    ``world.startup``'s adapters and the adapter root (override any ServerConfig field)."""
    def start(**overrides: Any) -> contextlib.AbstractContextManager[Running]:
        settings: dict[str, Any] = {"model": str(world.llama), "adapters": world.startup, "adapter_root": world.root,
                                    "max_tokens": 32, "max_inputs": 8, "max_batch": 32}
        settings.update(overrides)
        return running_server(ServerConfig(**settings))
    return start


@pytest.fixture(scope="session")
def llama_server(serve: Any) -> Iterator[Running]:
    """The shared server: tiny Llama, 8 LoRA adapters plus chatty, prefix and prompt, the adapter root,
    max_tokens 32, max_inputs 8, max_batch 32. Tests that load adapters use names of their own."""
    with serve() as running:
        yield running
