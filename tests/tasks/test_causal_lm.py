"""The causal-lm task on tiny Llama / GPT-2 models: masking, packing, perplexity, generation."""

from __future__ import annotations

import math

import pytest
import torch

from adapterkit.core import add_adapter, adapters_disabled
from adapterkit.data import load_data
from adapterkit.runtime.inference import run_inference
from adapterkit.methods import LoraConfig
from adapterkit.tasks import chat_format, get_task
from adapterkit.tasks.causal_lm import IGNORE, CausalLMTask
from adapterkit.tasks.generation import GenerationOptions, cut_at_stop, generate_from_ids
from tests.tiny_lm import one_thread  # noqa: F401  (a fixture)
from tests.tiny_lm import tiny_gpt2, tiny_llama, tiny_tokenizer, toy_arithmetic, toy_instructions
from tests.tolerances import assert_close_scaled, forward_ops

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chatml"])
def test_loss_sees_only_the_response_tokens(chat: bool) -> None:
    tokenizer = tiny_tokenizer(chat_template=chat)
    data = load_data(toy_instructions(3), task="causal-lm")
    features = get_task("causal-lm").encode(data, tokenizer, max_length=64)
    for example, feature in zip(data.examples, features):
        prompt = chat_format.prompt_ids(tokenizer, example["messages"])
        reply = tokenizer(example["response"], add_special_tokens=False)["input_ids"]
        end = tokenizer.convert_tokens_to_ids("<|im_end|>" if chat else "</s>")
        assert feature["input_ids"] == prompt + reply + [end]
        for position, (token, label) in enumerate(zip(feature["input_ids"], feature["labels"])):
            assert label == (IGNORE if position < len(prompt) else token), f"position {position}"
    tokens = tokenizer.convert_ids_to_tokens(features[0]["input_ids"])
    header = ["<|im_start|>", "user"] if chat else ["###", "Instruction", ":"]
    assert tokens[: len(header)] == header


def test_long_examples_keep_the_reply_cue_and_part_of_the_reply() -> None:
    tokenizer = tiny_tokenizer()
    rows = [{"instruction": " ".join(["red"] * 40), "output": " ".join(["blue"] * 40)}]
    feature = get_task("causal-lm").encode(load_data(rows, task="causal-lm"), tokenizer, max_length=32)[0]
    assert len(feature["input_ids"]) == 32
    labelled = [t for t in feature["labels"] if t != IGNORE]
    assert len(labelled) == 16  # the reply keeps half the room
    assert tokenizer.convert_ids_to_tokens(feature["_prompt"])[-3:] == ["###", "Response", ":"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_logits_as_separate_examples(kind: str, attn: str) -> None:
    tokenizer = tiny_tokenizer()
    model = BUILD[kind](tokenizer, attn=attn)
    task = get_task("causal-lm")
    rows = toy_instructions(5) + toy_arithmetic(5)
    features = task.encode(load_data(rows[:5], task="causal-lm"), tokenizer, 64)
    features += task.encode(load_data(rows[5:], task="causal-lm"), tokenizer, 64)
    packed = task.pack(features, max_length=40)
    assert len(packed) < len(features)
    assert sorted(i for row in packed for i in row["_examples"]) == sorted(f["_example"] for f in features)
    batch = task.collate(packed, tokenizer)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    lookup = {id(f): f for f in features}
    for row_index, row in enumerate(packed):
        start = 0
        # Segments follow the order they were packed in; recover each from its length.
        for example in row["_examples"]:
            candidates = [f for f in lookup.values() if f["_example"] == example
                          and f["input_ids"] == row["input_ids"][start:start + len(f["input_ids"])]]
            alone = candidates[0]["input_ids"]
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([alone])).logits[0]
            actual = logits[row_index, start:start + len(alone)]
            # a packed row attends over up to 40 positions, the example alone over its own
            assert_close_scaled(actual, expected, ops=forward_ops(model, tokens=40))
            assert row["labels"][start] == IGNORE  # never predicted from the previous example
            start += len(alone)


def test_perplexity_is_exp_of_the_mean_response_nll_computed_by_hand() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    task = get_task("causal-lm")
    data = load_data(toy_instructions(6, seed=3), task="causal-lm")
    predictions, outputs = run_inference(model, tokenizer, task, data, max_length=64, batch_size=4)
    metrics = task.score(data, predictions, outputs)
    total, count, largest = 0.0, 0, 0.0
    for feature in task.encode(data, tokenizer, 64):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0]
        largest = max(largest, float(logits.abs().max()))
        log_probs = torch.log_softmax(logits, -1)
        for t in range(1, len(feature["input_ids"])):
            if feature["labels"][t] != IGNORE:
                total -= float(log_probs[t - 1, feature["labels"][t]])
                count += 1
    assert metrics["response_tokens"] == count
    # Batched against one at a time: each NLL moves by at most twice its logits' rounding error
    # (log-softmax is 2-Lipschitz in the max norm), plus a log-sum-exp over the vocabulary and a
    # mean over the tokens. The perplexity is compared as its log, the mean NLL.
    ops = forward_ops(model, tokens=64) + model.config.vocab_size + count
    scale = 2 * max(largest, total / count)
    assert_close_scaled(metrics["loss"], total / count, ops=ops, scale=scale, dtype=torch.float32)
    assert_close_scaled(math.log(metrics["perplexity"]), total / count, ops=ops, scale=scale, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_generation_equals_one_prompt_at_a_time(kind: str) -> None:
    tokenizer = tiny_tokenizer()
    model = BUILD[kind](tokenizer)
    prompts = [tokenizer("say red twice")["input_ids"], tokenizer("what is 1 plus 2 ? the answer")["input_ids"]]
    options = GenerationOptions(max_new_tokens=6)
    together = generate_from_ids(model, tokenizer, prompts, options)
    alone = [generate_from_ids(model, tokenizer, [p], options)[0] for p in prompts]
    assert together == alone
    assert all(text for text in together)


def test_stop_strings_end_and_cut_the_generation() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=1)
    prompt = [tokenizer("say blue twice")["input_ids"]]
    free = generate_from_ids(model, tokenizer, prompt, GenerationOptions(max_new_tokens=12))[0]
    words = free.split()
    assert len(words) >= 4
    stop = words[2]
    stopped = generate_from_ids(model, tokenizer, prompt, GenerationOptions(max_new_tokens=12, stop=(stop,)))[0]
    assert stopped == cut_at_stop(free, [stop]).strip()
    assert stop not in stopped
    assert cut_at_stop("a b STOP c", ["c", "STOP"]) == "a b "


def test_sampling_is_seeded_and_differs_from_greedy() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    prompt = [tokenizer("say pink twice")["input_ids"]] * 4
    sample = GenerationOptions(max_new_tokens=8, temperature=1.5, seed=7)
    first = generate_from_ids(model, tokenizer, prompt, sample)
    assert first == generate_from_ids(model, tokenizer, prompt, sample)
    assert len(set(first)) > 1  # four samples of the same prompt differ
    greedy = generate_from_ids(model, tokenizer, prompt, GenerationOptions(max_new_tokens=8))
    assert len(set(greedy)) == 1


def test_generation_routes_each_prompt_to_its_adapter() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    add_adapter(model, "a", LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if "lora_B" in _:
                parameter.normal_(0, 2.0)
    prompt = tokenizer("say red twice")["input_ids"]
    options = GenerationOptions(max_new_tokens=6)
    with_adapter = generate_from_ids(model, tokenizer, [prompt], options)[0]
    with adapters_disabled(model):
        base = generate_from_ids(model, tokenizer, [prompt], options)[0]
    assert with_adapter != base
    assert generate_from_ids(model, tokenizer, [prompt, prompt], options, adapter_names=["a", None]) == [with_adapter, base]


def test_exact_match_generates_and_compares_final_answers() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    task = CausalLMTask()
    data = load_data(toy_arithmetic(4), task="causal-lm")
    assert [e["answer"] for e in data.examples] == [r["answer"].split("#### ")[1] for r in toy_arithmetic(4)]
    predictions, outputs = run_inference(model, tokenizer, task, data, max_length=64, batch_size=3)
    assert all(p.text is not None for p in predictions)
    metrics = task.score(data, predictions, outputs)
    assert metrics["answered"] == 4 and 0.0 <= metrics["exact_match"] <= 1.0
    # Scoring by hand with made-up generations: right, right via the last number, wrong.
    fake = [p._replace(text=t) for p, t in zip(predictions, [
        f"the answer is {data[0]['answer']} . #### {data[0]['answer']}", f"so it is {data[1]['answer']} .",
        "#### 99", ""])]
    assert task.score(data, fake, outputs)["exact_match"] == 0.5


def test_predict_generates_for_prompts_without_responses() -> None:
    tokenizer = tiny_tokenizer(chat_template=True)
    model = tiny_llama(tokenizer)
    task = get_task("causal-lm")
    task.generation = GenerationOptions(max_new_tokens=10)
    data = task.from_texts(["say red twice", "hello"], None)
    predictions, _ = run_inference(model, tokenizer, task, data, max_length=64, batch_size=8)
    assert [p.tokens for p in predictions] == [0, 0]
    assert all(isinstance(p.text, str) for p in predictions)
    assert task.format(predictions[0]) == predictions[0].text
