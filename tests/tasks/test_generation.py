"""Batched generation with stop strings on tiny models: transformers' ``stop_strings=`` (a
byte-level BPE tokenizer) and the tail-decoding fallback (the word-level test tokenizer),
checked against the hand-written criterion it replaced, and against a per-row model of when
each row must stop."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, StoppingCriteria, StoppingCriteriaList

from adapterkit.data import TaskData
from adapterkit.tasks import get_task
from adapterkit.tasks import generation
from adapterkit.tasks.generation import (
    GenerationOptions,
    StopOnGeneratedStrings,
    StopOnStringsTail,
    cut_at_stop,
    generate_batch,
    generate_from_ids,
    generate_ids,
    pad_prompts,
    stop_criterion,
    stop_token_ids,
    transformers_can_stop_on,
    trim_padding,
)
from tests.tiny_lm import one_thread  # noqa: F401  (a fixture)
from tests.tiny_lm import WORDS, tiny_gpt2, tiny_llama, tiny_t5, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread", "segment")


@pytest.fixture(params=[generation.SEGMENT_STEPS, 3], ids=["segments-default", "segments-of-3"])
def segment(request, monkeypatch) -> int:
    """Every test runs with the default segment length and with rows leaving the batch every 3 tokens."""
    monkeypatch.setattr(generation, "SEGMENT_STEPS", request.param)
    return request.param
PROMPTS = ["say red twice", "what is 2 plus 3 ?", "translate blue to German"]


def byte_bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) trained here on the test words."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class OldStopOnStrings(StoppingCriteria):
    """The criterion generation used before: decode every row's whole continuation at each step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, tuple(stops), prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool)


@torch.no_grad()
def old_generate_batch(model, tokenizer, input_ids, attention_mask, options: GenerationOptions,
                       max_new_tokens: int) -> list[str]:
    """The former ``generate_batch``, kept here as the reference for greedy decoding."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": stop_token_ids(model, tokenizer),
              "pad_token_id": tokenizer.pad_token_id, "do_sample": False}
    prompt_length = 0 if encoder_decoder else input_ids.shape[1]
    if options.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([OldStopOnStrings(tokenizer, options.stop, prompt_length)])
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
    return [cut_at_stop(text, options.stop).strip() for text in texts]


def _batch(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], left: bool = True):
    return pad_prompts([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id, left)


def _setups():
    bpe = byte_bpe_tokenizer()
    words = tiny_tokenizer()
    return {"llama-bpe": (tiny_llama(bpe), bpe), "gpt2-bpe": (tiny_gpt2(bpe, seed=1), bpe),
            "llama-words": (tiny_llama(words), words), "t5-words": (tiny_t5(words), words)}


SETUPS = _setups()


def _stops_from(texts: Sequence[str]) -> list[tuple[str, ...]]:
    """Stop strings cut out of reference generations: inside a word, across a space, absent."""
    longest = max(texts, key=len)
    middle = len(longest) // 2
    return [(), (longest[middle:middle + 2],), (longest[middle - 1:middle + 3], "zzz"), ("never generated",)]


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_greedy_outputs_equal_the_former_implementation(setup: str) -> None:
    model, tokenizer = SETUPS[setup]
    left = not model.config.is_encoder_decoder
    input_ids, mask = _batch(tokenizer, PROMPTS, left)
    plain = old_generate_batch(model, tokenizer, input_ids, mask, GenerationOptions(), 12)
    assert any(plain), "the model generates some text"
    cut = 0
    for stops in _stops_from(plain):
        options = GenerationOptions(stop=stops)
        expected = old_generate_batch(model, tokenizer, input_ids, mask, options, 12)
        assert generate_batch(model, tokenizer, input_ids, mask, options, 12) == expected, stops
        cut += expected != plain
    assert cut >= 2  # the stop strings cut out of the generations did stop them
    # the word-level tokenizer is the one transformers cannot read: there the fallback runs
    criterion = stop_criterion(tokenizer, ["a"])
    expected_class = StopOnGeneratedStrings if setup.endswith("bpe") else StopOnStringsTail
    assert type(criterion) is expected_class
    assert transformers_can_stop_on(tokenizer, ["a"]) == setup.endswith("bpe")


def _generated_tokens(tokenizer: PreTrainedTokenizerBase, row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == tokenizer.pad_token_id:
        ids.pop()
    return ids


def _spanning_stop(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> tuple[str, int]:
    """A stop string from the last character of one generated token to the first of the next
    (with the space between, if any), first seen when that next token is generated; and its index."""
    for k in range(1, len(ids)):
        before, after = tokenizer.decode(ids[:k]), tokenizer.decode(ids[:k + 1])
        added = after[len(before):]
        if not before or not after.startswith(before) or not added.strip():
            continue
        first = len(before) + len(added) - len(added.lstrip())  # the next token's first character
        stop = after[len(before) - 1:first + 1]
        if stop not in before:
            return stop, k
    raise AssertionError("no stop string spans two tokens of the reference generation")


@pytest.mark.parametrize("setup", ["llama-bpe", "llama-words"])
def test_a_stop_string_across_two_tokens_ends_generation_at_the_second(setup: str) -> None:
    model, tokenizer = SETUPS[setup]
    input_ids, mask = _batch(tokenizer, PROMPTS[:1])
    reference = _generated_tokens(tokenizer, generate_ids(model, tokenizer, input_ids, mask, GenerationOptions(), 16)[0])
    stop, k = _spanning_stop(tokenizer, reference)
    stopped = generate_ids(model, tokenizer, input_ids, mask, GenerationOptions(stop=(stop,)), 16)
    assert stopped.shape[1] == k + 1  # the batch ended with the token that completed the stop string
    assert stopped[0].tolist() == reference[:k + 1]
    text = generate_batch(model, tokenizer, input_ids, mask, GenerationOptions(stop=(stop,)), 16)[0]
    assert stop not in text and tokenizer.decode(reference).strip().startswith(text)


def _expected_stop_steps(tokenizer, reference: torch.Tensor, stops: Sequence[str], eos: set[int],
                         budgets: Sequence[int]) -> list[int]:
    """For each row of an unstopped greedy run, how many tokens it keeps when stopping is on."""
    steps = []
    for row, budget in zip(reference.tolist(), budgets):
        n = budget
        for t in range(1, min(budget, len(row)) + 1):
            text = tokenizer.decode(row[:t], skip_special_tokens=True)
            if row[t - 1] in eos or any(s in text for s in stops):
                n = t
                break
        steps.append(n)
    return steps


def _apart(tokenizer, reference: torch.Tensor, budget: int) -> tuple[tuple[str, str], int, list[int]]:
    """Two stop strings (a token of row 0, one of row 1) and an end token (one of row 2) that make
    the three rows stop at three different steps, all before ``budget``; and those steps."""
    rows = reference.tolist()

    def candidates(row: list[int]) -> list[str]:
        texts = [tokenizer.decode([i], skip_special_tokens=True).strip() for i in row]
        return [t for t in dict.fromkeys(texts) if t and t.isascii() and t.isprintable()]

    for first in candidates(rows[0]):
        for second in candidates(rows[1]):
            for end in dict.fromkeys(rows[2]):
                eos = {end, tokenizer.eos_token_id}
                steps = _expected_stop_steps(tokenizer, reference, [first, second], eos, [budget] * 3)
                if len(set(steps)) == 3 and max(steps) < budget:
                    return (first, second), end, steps
    raise AssertionError("no stop strings and end token make the rows stop at three different steps")


@pytest.mark.parametrize("setup", ["llama-bpe", "llama-words"])
def test_rows_stop_independently_and_the_batch_ends_when_all_have(setup: str) -> None:
    model, tokenizer = SETUPS[setup]
    input_ids, mask = _batch(tokenizer, PROMPTS)
    budget = 14
    reference = generate_ids(model, tokenizer, input_ids, mask, GenerationOptions(), budget)
    assert reference.shape[1] == budget
    stops, end, steps = _apart(tokenizer, reference, budget)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = end
    try:
        got = generate_ids(model, tokenizer, input_ids, mask, GenerationOptions(stop=stops), budget)
    finally:
        model.generation_config.eos_token_id = saved
    assert got.shape[1] == max(steps)  # the batch ended once its last row stopped
    for row, n in enumerate(steps):
        assert got[row, :n].tolist() == reference[row, :n].tolist()
        assert (got[row, n:] == tokenizer.pad_token_id).all()  # nothing after a row's own stop


def test_each_row_stops_at_its_own_budget() -> None:
    model, tokenizer = SETUPS["llama-bpe"]
    input_ids, mask = _batch(tokenizer, PROMPTS)
    reference = generate_ids(model, tokenizer, input_ids, mask, GenerationOptions(), 9)
    eos = set(stop_token_ids(model, tokenizer))
    budgets = [3, 9, 5]
    expected = _expected_stop_steps(tokenizer, reference, [], eos, budgets)
    got = generate_ids(model, tokenizer, input_ids, mask, GenerationOptions(), row_budgets=budgets)
    assert got.shape[1] == max(expected)
    for row, n in enumerate(expected):
        assert got[row, :n].tolist() == reference[row, :n].tolist()
        assert (got[row, n:] == tokenizer.pad_token_id).all()


def test_a_stop_string_begun_by_the_prompt_does_not_stop() -> None:
    """transformers' matcher alone would stop on "na" when the prompt ends in "n" and "an" comes next."""
    tokenizer = byte_bpe_tokenizer()
    criterion = StopOnGeneratedStrings(tokenizer, ["na"])
    prompt = tokenizer("to German", add_special_tokens=False)["input_ids"]
    an = tokenizer.convert_tokens_to_ids("an")
    assert criterion.matcher(torch.tensor([prompt + [an]]), None).all()  # the matcher on its own
    assert not criterion(torch.tensor([prompt + [an]]), None).any()
    assert criterion(torch.tensor([prompt + [an, an]]), None).all()  # "anan" holds "na"


def test_the_fallback_never_matches_the_prompt() -> None:
    tokenizer = tiny_tokenizer()
    criterion = StopOnStringsTail(tokenizer, ["red"])
    prompt = tokenizer("say red", add_special_tokens=False)["input_ids"]
    blue, red = tokenizer.convert_tokens_to_ids(["blue", "red"])
    assert not criterion(torch.tensor([prompt + [blue]]), None).any()  # "red" is in the prompt only
    assert criterion(torch.tensor([prompt + [blue, red]]), None).all()
    # the window: only the newest tokens are decoded, however long the continuation
    long = torch.tensor([prompt + [blue] * 50 + [red]])
    assert criterion(long, None).all() and criterion.window == len("red") + 2


def test_decoder_prompts_are_padded_on_the_left_and_trimmed_per_chunk() -> None:
    ids, mask = pad_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    trimmed = trim_padding(ids[1:], mask[1:])
    assert trimmed[0].tolist() == [[8]] and trimmed[1].tolist() == [[1]]
    ids, mask = pad_prompts([[5, 6, 7], [8]], pad_id=0, left=False)
    assert trim_padding(ids[1:], mask[1:], left=False)[0].tolist() == [[8]]


def _instructions(tokenizer, rows: Sequence[tuple[str, str]]) -> TaskData:
    from adapterkit.data.instructions import instructions_from_texts

    data = instructions_from_texts([q for q, _ in rows])
    for example, (_, answer) in zip(data.examples, rows):
        example["response"] = answer
        example["answer"] = answer.split()[-1]
    return data


def test_causal_lm_budgets_follow_reference_lengths_and_prompts_are_left_padded() -> None:
    tokenizer = tiny_tokenizer(chat_template=True)
    data = _instructions(tokenizer, [("what is 1 plus 2 ?", "the answer is 3 . #### 3"),
                                     ("say red twice", "red red")])
    task = get_task("causal-lm")
    features = task.encode(data, tokenizer, 64)
    replies = [sum(1 for label in f["labels"] if label != -100) for f in features]
    assert [f["_budget"] for f in features] == [min(int(n * 1.5) + 16, 512) for n in replies]
    batch = task.collate(features, tokenizer)
    assert batch["max_new_tokens"].tolist() == [f["_budget"] for f in features]
    shorter = 1 if len(features[1]["_prompt"]) < len(features[0]["_prompt"]) else 0
    assert batch["prompt_mask"][shorter, 0] == 0 and batch["prompt_mask"][shorter, -1] == 1
    fixed = get_task("causal-lm")
    fixed.generation = GenerationOptions(max_new_tokens=5)
    assert [f["_budget"] for f in fixed.encode(data, tokenizer, 64)] == [5, 5]


def _two_loras(tokenizer: PreTrainedTokenizerBase):
    """A tiny Llama with two LoRA adapters of random (non-zero) weights."""
    import adapterkit as ak

    model = tiny_llama(tokenizer)
    for name in ("a", "b"):
        ak.add_adapter(model, name, ak.LoraConfig(rank=2, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key:
                param.normal_(0, 0.5)
    return model


def test_rows_leaving_the_batch_keep_their_own_adapter(monkeypatch) -> None:
    """Routed generation, rows dropping out every 3 tokens, equals each prompt generated alone."""
    tokenizer = byte_bpe_tokenizer()
    model = _two_loras(tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS + ["say blue"]]
    names = ["a", None, "b", "a"]
    monkeypatch.setattr(generation, "SEGMENT_STEPS", 3)
    plain = [generate_from_ids(model, tokenizer, [p], GenerationOptions(max_new_tokens=12), adapter_names=[n])[0]
             for p, n in zip(prompts, names)]
    # two letters some generation holds: the rows holding them stop early, the others go on
    stop = next(t[i:i + 2] for t in plain for i in range(len(t) - 1) if t[i:i + 2].isascii() and t[i:i + 2].isalpha())
    options = GenerationOptions(max_new_tokens=12, stop=(stop,))
    sizes: list[int] = []
    routed = generation._routed_rows

    def spy(model, rows):
        sizes.append(len(rows))
        return routed(model, rows)

    monkeypatch.setattr(generation, "_routed_rows", spy)
    together = generate_from_ids(model, tokenizer, prompts, options, adapter_names=names)
    monkeypatch.setattr(generation, "_routed_rows", routed)
    assert sizes[0] == 4 and min(sizes) < 4  # some rows left the batch before the others ended
    alone = [generate_from_ids(model, tokenizer, [p], options, adapter_names=[n])[0] for p, n in zip(prompts, names)]
    assert together == alone
    assert len(set(together)) > 1  # the adapters made a difference


def test_only_layer_adapters_on_decoder_models_let_rows_leave() -> None:
    import adapterkit as ak

    tokenizer = tiny_tokenizer()
    assert generation.can_drop_finished_rows(tiny_llama(tokenizer))
    assert not generation.can_drop_finished_rows(tiny_t5(tokenizer))
    assert generation.can_drop_finished_rows(_two_loras(tokenizer))
    prefixed = tiny_llama(tokenizer)
    ak.add_adapter(prefixed, "p", ak.PrefixTuningConfig(num_virtual_tokens=3))
    assert not generation.can_drop_finished_rows(prefixed)
    # and a prefix-tuned model still generates, in one call
    input_ids, mask = _batch(tokenizer, PROMPTS)
    assert generate_ids(prefixed, tokenizer, input_ids, mask, GenerationOptions(), 20).shape[0] == 3
