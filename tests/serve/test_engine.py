"""GenerationEngine without HTTP: what it generates equals offline generation, token for token.

The reference for every request is ``tasks.generation.generate_ids`` of its
prompt alone under ``ak.use(model, adapter or ak.Sum())``, cut after the first
end-of-sequence token (offline generation pads finished rows with the pad id,
which can also be generated, so only eos and the budget end a row). Requests
arrive staggered, so rows join a batch that is already decoding and leave it
while others go on, and every batch mixes adapters of different ranks.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from transformers import DynamicCache

import adapterkit as ak
from adapterkit.serve.engine import DoneEvent, ErrorEvent, FinishEvent, GenerationEngine, GenerationRequest, TextEvent
from adapterkit.serve.errors import Overloaded
from adapterkit.serve.kv_rows import RowBatch
from adapterkit.serve.sampling import SamplingParams
from adapterkit.tasks.generation import (
    GenerationOptions,
    _cache_keyword,
    cut_at_stop,
    generate_ids,
    pad_prompts,
    stop_token_ids,
)
from tests.serve.conftest import cut_after_eos, perturb
from tests.tiny_lm import BUILDERS, WORDS, tiny_tokenizer
from tests.tolerances import assert_close_scaled, forward_ops

LORAS = {"r1": 1, "r2": 2, "r3": 3, "r4": 4, "r8": 8, "r16": 16}
VIRTUAL = ("prefix", "prompt")
TIMEOUT = 60.0


@dataclass
class Tiny:
    """A tiny causal LM with six LoRA adapters (ranks 1 to 16) and two virtual-token adapters."""

    kind: str
    model: Any
    tokenizer: Any
    eos: set[int]
    memo: dict[tuple, list[int]] = field(default_factory=dict)

    def reference(self, adapter: str | None, prompt: Sequence[int], max_tokens: int,
                  stop: tuple[str, ...] = ()) -> list[int]:
        """Offline greedy ids of ``prompt`` alone, cut after the first eos."""
        key = (adapter, tuple(prompt), max_tokens, stop)
        if key not in self.memo:
            ids = torch.tensor([list(prompt)], dtype=torch.long)
            with ak.use(self.model, adapter if adapter is not None else ak.Sum()):
                out = generate_ids(self.model, self.tokenizer, ids, torch.ones_like(ids),
                                   GenerationOptions(max_new_tokens=max_tokens, stop=stop))
            self.memo[key] = cut_after_eos(out[0].tolist(), self.eos, max_tokens)
        return self.memo[key]

    def text(self, tokens: Sequence[int], stop: tuple[str, ...] = ()) -> str:
        return cut_at_stop(self.tokenizer.decode(list(tokens), skip_special_tokens=True), stop)

    def engine(self, **options: Any) -> GenerationEngine:
        return GenerationEngine(self.model, self.tokenizer, exclusive=lambda name: name in VIRTUAL, **options)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest, torch_one_thread: None) -> Tiny:
    tokenizer = tiny_tokenizer()
    model = BUILDERS[request.param](tokenizer)
    for seed, (name, rank) in enumerate(LORAS.items()):
        ak.add_adapter(model, name, ak.LoraConfig(rank=rank, alpha=2 * rank))
        perturb(model, name, seed)
    ak.add_adapter(model, "prefix", ak.PrefixTuningConfig(num_virtual_tokens=3))
    perturb(model, "prefix", 100)
    ak.add_adapter(model, "prompt", ak.PromptTuningConfig(num_virtual_tokens=3))
    perturb(model, "prompt", 101)
    model.eval()
    return Tiny(request.param, model, tokenizer, set(stop_token_ids(model, tokenizer)))


@pytest.fixture
def engines() -> Iterator[list[GenerationEngine]]:
    """Engines a test starts; closed (without waiting) afterwards even if the test fails."""
    started: list[GenerationEngine] = []
    yield started
    for engine in started:
        engine.close(wait=False, timeout=TIMEOUT)


def jobs_for(tokenizer: Any, count: int, seed: int, adapters: Sequence[str | None],
             longest: int = 30, budget: tuple[int, int] = (1, 24)) -> list[tuple[str | None, list[int], int]]:
    """(adapter, prompt ids, max_tokens) of ``count`` requests: prompts of 1 to ``longest`` tokens."""
    rng = random.Random(seed)
    ids = tokenizer.convert_tokens_to_ids(WORDS)
    return [(adapters[i % len(adapters)], [rng.choice(ids) for _ in range(rng.randint(1, longest))],
             rng.randint(*budget)) for i in range(count)]


@dataclass
class Outcome:
    """The events of one request."""

    texts: dict[int, str] = field(default_factory=dict)
    finishes: dict[int, FinishEvent] = field(default_factory=dict)
    done: DoneEvent | None = None
    errors: list[ErrorEvent] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: Any) -> None:
        if isinstance(event, TextEvent):
            self.texts[event.index] = self.texts.get(event.index, "") + event.text
        elif isinstance(event, FinishEvent):
            self.finishes[event.index] = event
        elif isinstance(event, DoneEvent):
            self.done = event
            self.ended.set()
        elif isinstance(event, ErrorEvent):
            self.errors.append(event)
            self.ended.set()

    def tokens(self, index: int = 0) -> list[int]:
        return list(self.finishes[index].tokens)


def submit(engine: GenerationEngine, adapter: str | None, prompt: list[int], params: SamplingParams,
           n: int = 1) -> tuple[GenerationRequest, Outcome]:
    outcome = Outcome()
    request = GenerationRequest(adapter, prompt, params, outcome.emit, n=n)
    engine.submit(request)
    return request, outcome


def wait_all(outcomes: Sequence[Outcome]) -> None:
    deadline = time.monotonic() + TIMEOUT
    for outcome in outcomes:
        assert outcome.ended.wait(max(0.0, deadline - time.monotonic())), "a request did not finish in time"
        assert not outcome.errors, outcome.errors[0].error.message


def run_staggered(engine: GenerationEngine, jobs: Sequence[tuple[str | None, list[int], int]],
                  gap: float = 0.003) -> tuple[list[Outcome], int]:
    """Submit ``jobs`` greedy, ``gap`` seconds apart; the outcomes and how many arrived while rows were decoding."""
    outcomes, joined = [], 0
    for adapter, prompt, max_tokens in jobs:
        joined += engine.running() > 0
        outcomes.append(submit(engine, adapter, prompt, SamplingParams(max_tokens=max_tokens))[1])
        time.sleep(gap)
    wait_all(outcomes)
    return outcomes, joined


def histogram(engine: GenerationEngine, metric: str, kind: str) -> tuple[float, dict[str, float]]:
    """(observation count, cumulative bucket counts by upper bound) of one of the engine's histograms."""
    registry = engine.metrics.registry
    count = registry.get_sample_value(f"{metric}_count", {"kind": kind}) or 0.0
    buckets = {}
    for metric_family in registry.collect():
        for sample in metric_family.samples:
            if sample.name == f"{metric}_bucket" and sample.labels.get("kind") == kind:
                buckets[sample.labels["le"]] = sample.value
    return count, buckets


def assert_equal_offline(tiny: Tiny, jobs: Sequence[tuple[str | None, list[int], int]],
                         outcomes: Sequence[Outcome]) -> None:
    for number, ((adapter, prompt, max_tokens), outcome) in enumerate(zip(jobs, outcomes)):
        expected = tiny.reference(adapter, prompt, max_tokens)
        got = outcome.tokens()
        assert got == expected, f"request {number} ({adapter}, {len(prompt)} prompt tokens): {got} != {expected}"
        assert outcome.texts.get(0, "") == tiny.text(expected)
        assert outcome.finishes[0].reason == ("stop" if expected[-1] in tiny.eos else "length")
        assert outcome.done is not None and outcome.done.completion_tokens == len(expected)
        assert outcome.done.prompt_tokens == len(prompt)


# --- greedy generation equals offline ------------------------------------------------------------------


def test_staggered_mixed_adapters_equal_offline(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    jobs = jobs_for(tiny.tokenizer, 36, seed=1, adapters=[*LORAS, None])
    for job in jobs:
        tiny.reference(*job)
    engine = tiny.engine(max_batch=64)
    engines.append(engine)
    outcomes, joined = run_staggered(engine, jobs)
    assert_equal_offline(tiny, jobs, outcomes)
    assert joined >= 5, f"only {joined} requests arrived while others were decoding; the test lost its point"
    count, buckets = histogram(engine, "adapterkit_batch_adapters", "decode")
    assert count > buckets["1.0"], "no decoding step mixed two adapters"
    prefills, _ = histogram(engine, "adapterkit_batch_size", "prefill")
    assert prefills > 1, "every request was admitted in one prefill: none joined a running batch"


@pytest.mark.parametrize("batching", ["same-adapter", "single"])
def test_batching_modes_give_the_same_tokens(tiny: Tiny, engines: list[GenerationEngine], batching: str) -> None:
    jobs = jobs_for(tiny.tokenizer, 14, seed=2, adapters=[*LORAS, None])
    engine = tiny.engine(batching=batching)
    engines.append(engine)
    outcomes, _ = run_staggered(engine, jobs, gap=0.001)
    assert_equal_offline(tiny, jobs, outcomes)
    count, buckets = histogram(engine, "adapterkit_batch_adapters", "decode")
    assert count > 0 and buckets["1.0"] == count, f"{batching}: a decoding step mixed adapters"
    if batching == "single":
        count, buckets = histogram(engine, "adapterkit_batch_size", "decode")
        assert buckets["1.0"] == count, "single: a decoding step held more than one row"


def test_max_batch_smaller_than_the_requests(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    jobs = jobs_for(tiny.tokenizer, 12, seed=3, adapters=[*LORAS, None], budget=(6, 16))
    engine = tiny.engine(max_batch=3)
    engines.append(engine)
    widest = []
    outcomes = []
    for adapter, prompt, max_tokens in jobs:  # all at once: nine of them wait
        outcome = Outcome()

        def emit(event: Any, outcome: Outcome = outcome) -> None:
            widest.append(engine.running())
            outcome.emit(event)
        engine.submit(GenerationRequest(adapter, prompt, SamplingParams(max_tokens=max_tokens), emit))
        outcomes.append(outcome)
    wait_all(outcomes)
    assert_equal_offline(tiny, jobs, outcomes)
    assert max(widest) == 3


def test_stop_string_ends_generation_and_is_cut(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    adapter, max_tokens = "r4", 20
    for prompt_seed in range(50):  # a prompt whose reply holds a word to stop at, not at its start
        (_, prompt, _), = jobs_for(tiny.tokenizer, 1, seed=100 + prompt_seed, adapters=[adapter])
        plain = tiny.reference(adapter, prompt, max_tokens)
        words = tiny.text(plain).split()
        candidates = [w for w in words[2:] if w not in words[:2] and len(w) > 1]
        if candidates:
            break
    stop = (candidates[0],)
    expected = tiny.reference(adapter, prompt, max_tokens, stop=stop)
    assert len(expected) < len(plain)
    engine = tiny.engine()
    engines.append(engine)
    _, outcome = submit(engine, adapter, prompt, SamplingParams(max_tokens=max_tokens, stop=stop))
    wait_all([outcome])
    assert outcome.tokens() == expected
    assert outcome.finishes[0].reason == "stop"
    assert stop[0] not in outcome.texts.get(0, "")
    assert outcome.texts.get(0, "").strip() == tiny.text(expected, stop).strip()
    assert tiny.text(plain).startswith(outcome.texts.get(0, ""))


def test_cancelled_request_leaves_and_others_are_unaffected(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    candidates = jobs_for(tiny.tokenizer, 40, seed=4, adapters=[*LORAS, None], budget=(20, 20))
    long = [job for job in candidates if len(tiny.reference(*job)) == 20][:5]
    assert len(long) == 5, "too few prompts whose reply runs to the budget"
    engine = tiny.engine()
    engines.append(engine)
    events_after_cancel: list[Any] = []
    victim = Outcome()
    box: dict[str, GenerationRequest] = {}

    def emit(event: Any) -> None:
        if box["request"].cancelled:
            events_after_cancel.append(event)
        victim.emit(event)
        if isinstance(event, TextEvent):
            box["request"].cancelled = True  # the client went away after its first text
    adapter, prompt, max_tokens = long[0]
    box["request"] = GenerationRequest(adapter, prompt, SamplingParams(max_tokens=max_tokens), emit)
    others = []
    for job in long[1:]:
        others.append(submit(engine, job[0], job[1], SamplingParams(max_tokens=job[2]))[1])
        if len(others) == 2:
            engine.submit(box["request"])
    wait_all(others)
    assert_equal_offline(tiny, long[1:], others)
    deadline = time.monotonic() + 5
    while engine.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running() == 0
    assert victim.done is None and not victim.finishes, "a cancelled request finished"
    assert not events_after_cancel, f"events after cancelling: {events_after_cancel}"
    assert box["request"].completion_tokens < max_tokens


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    (_, prompt, _), = jobs_for(tiny.tokenizer, 1, seed=5, adapters=["r2"])
    sampled = SamplingParams(max_tokens=16, temperature=0.8, seed=7)
    engine = tiny.engine()
    engines.append(engine)
    _, alone = submit(engine, "r2", prompt, sampled, n=2)
    wait_all([alone])
    crowd_jobs = jobs_for(tiny.tokenizer, 8, seed=6, adapters=[*LORAS, None], budget=(8, 16))
    crowd = []
    for number, (adapter, other, max_tokens) in enumerate(crowd_jobs):
        params = (SamplingParams(max_tokens=max_tokens) if number % 2 else
                  SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.9, seed=number))
        crowd.append(submit(engine, adapter, other, params)[1])
        if number == 3:
            _, mixed = submit(engine, "r2", prompt, sampled, n=2)
    wait_all([*crowd, mixed])
    assert [mixed.tokens(0), mixed.tokens(1)] == [alone.tokens(0), alone.tokens(1)]
    _, choice_one = submit(engine, "r2", prompt, SamplingParams(max_tokens=16, temperature=0.8, seed=8))
    wait_all([choice_one])
    assert choice_one.tokens() == alone.tokens(1), "choice i of a seeded request draws from seed + i"
    greedy = tiny.reference("r2", prompt, 16)
    assert alone.tokens(0) != greedy or alone.tokens(1) != greedy, "temperature 0.8 sampled the greedy reply twice"
    for number in range(0, len(crowd_jobs), 2):  # the greedy crowd is undisturbed by the sampled rows
        assert crowd[number + 1].tokens() == tiny.reference(*crowd_jobs[number + 1])


def test_virtual_token_adapters_run_alone_and_equal_offline(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    jobs = jobs_for(tiny.tokenizer, 12, seed=7, adapters=["prefix", "r3", "prompt", None, "r16", "prefix"])
    engine = tiny.engine()
    engines.append(engine)
    outcomes, _ = run_staggered(engine, jobs, gap=0.002)
    assert_equal_offline(tiny, jobs, outcomes)
    alone, _ = histogram(engine, "adapterkit_batch_size", "alone")
    assert alone == sum(adapter in VIRTUAL for adapter, _, _ in jobs)


def test_close_waits_for_accepted_requests(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    jobs = jobs_for(tiny.tokenizer, 8, seed=8, adapters=[*LORAS, None], budget=(10, 24))
    engine = tiny.engine()
    engines.append(engine)
    outcomes = [submit(engine, adapter, prompt, SamplingParams(max_tokens=m))[1] for adapter, prompt, m in jobs]
    engine.close(wait=True, timeout=TIMEOUT)
    assert all(outcome.ended.is_set() for outcome in outcomes), "close(wait=True) returned before requests ended"
    assert_equal_offline(tiny, jobs, outcomes)
    with pytest.raises(Overloaded):
        submit(engine, None, jobs[0][1], SamplingParams(max_tokens=2))


def test_overloaded_when_the_queue_is_full(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    engine = tiny.engine(max_queue=1)
    engines.append(engine)
    release = threading.Event()
    paused = engine.call(lambda: release.wait(TIMEOUT))  # the engine's thread waits here, between steps
    time.sleep(0.05)
    (adapter, prompt, max_tokens), = jobs_for(tiny.tokenizer, 1, seed=9, adapters=["r8"])
    _, first = submit(engine, adapter, prompt, SamplingParams(max_tokens=max_tokens))
    with pytest.raises(Overloaded) as refused:
        submit(engine, adapter, prompt, SamplingParams(max_tokens=max_tokens))
    assert refused.value.status == 503 and refused.value.headers.get("Retry-After", "").isdigit()
    assert "waiting" in refused.value.message
    release.set()
    assert paused.result(TIMEOUT) is True
    wait_all([first])
    assert first.tokens() == tiny.reference(adapter, prompt, max_tokens)


def test_extreme_sampling_values_decode_greedily(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    """A temperature too small to divide by, and a top_p that is 0 in float32, both leave the top token only."""
    jobs = jobs_for(tiny.tokenizer, 6, seed=10, adapters=["r1", "prefix", None, "r8", "prompt", "r4"])
    engine = tiny.engine()
    engines.append(engine)
    outcomes = []
    for number, (adapter, prompt, max_tokens) in enumerate(jobs):
        params = (SamplingParams(max_tokens=max_tokens, temperature=1e-300, seed=number) if number % 2 else
                  SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=5e-324, seed=number))
        outcomes.append(submit(engine, adapter, prompt, params)[1])
    wait_all(outcomes)
    assert_equal_offline(tiny, jobs, outcomes)


def test_a_request_failing_inside_the_engine_gets_an_error(tiny: Tiny, engines: list[GenerationEngine]) -> None:
    """A request that fails while it is admitted (here: an adapter the model lacks, run alone) is answered with
    an error event, not left waiting, and the engine goes on serving."""
    engine = GenerationEngine(tiny.model, tiny.tokenizer, exclusive=lambda name: name == "ghost")
    engines.append(engine)
    (_, prompt, max_tokens), = jobs_for(tiny.tokenizer, 1, seed=11, adapters=[None])
    _, ghost = submit(engine, "ghost", prompt, SamplingParams(max_tokens=max_tokens))
    assert ghost.ended.wait(TIMEOUT), "the failed request was never answered"
    assert len(ghost.errors) == 1 and ghost.errors[0].error.status == 500 and ghost.done is None
    _, after = submit(engine, "r2", prompt, SamplingParams(max_tokens=max_tokens))
    wait_all([after])
    assert after.tokens() == tiny.reference("r2", prompt, max_tokens)


# --- the shared KV cache -------------------------------------------------------------------------------


def _forward(model: Any, cache: DynamicCache | None, **inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(use_cache=cache is not None, **{_cache_keyword(): cache}, **inputs).logits[:, -1]


def _alone(model: Any, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([tokens])
    return _forward(model, None, input_ids=ids)[0]


def test_row_batch_join_and_keep_match_each_row_alone(tiny: Tiny) -> None:
    model, pad = tiny.model, tiny.tokenizer.pad_token_id
    groups = [[[5, 9, 12, 7]], [[8, 11, 13, 14, 6, 30, 31], [20, 21]]]  # a first row, then two join (one longer)
    rows = RowBatch()
    with ak.use(model, ak.Sum()):
        for prompts in groups:
            ids, mask = pad_prompts(prompts, pad, left=True)
            cache = DynamicCache(config=model.config)
            _forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
            rows.join(cache, mask)
        prompts = [p for group in groups for p in group]
        assert torch.equal(rows.mask, pad_prompts(prompts, pad, left=True)[1])
        assert rows.positions.tolist() == [len(p) for p in prompts] and len(rows) == 3

        def step(token: int) -> torch.Tensor:
            mask = torch.nn.functional.pad(rows.mask, (0, 1), value=1)
            logits = _forward(model, rows.cache, input_ids=torch.full((len(rows), 1), token),
                              attention_mask=mask, position_ids=rows.positions[:, None])
            rows.grow()
            return logits

        ops = forward_ops(model, tokens=8)
        logits = step(40)
        for row, prompt in enumerate(prompts):
            assert_close_scaled(logits[row], _alone(model, prompt + [40]), ops=ops, msg=f"row {row}: ")
        rows.keep([2, 0])  # the longest row leaves: its padding-only columns go too
        assert rows.mask.shape == (2, 5) and bool(rows.mask.any(dim=0).all())
        assert rows.positions.tolist() == [3, 5]
        logits = step(41)
        for row, prompt in enumerate([prompts[2], prompts[0]]):
            assert_close_scaled(logits[row], _alone(model, prompt + [40, 41]), ops=ops, msg=f"kept row {row}: ")
        rows.keep([])
        assert len(rows) == 0 and rows.cache is None
