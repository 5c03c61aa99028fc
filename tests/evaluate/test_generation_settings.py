"""``evaluate``'s generation settings on tiny models: what they change, what the metrics record."""

from __future__ import annotations

import pandas as pd
import pytest

import adapterkit as ak
from adapterkit.data.instructions import instructions_from_texts
from adapterkit.data.seq2seq import seq2seq_from_texts
from adapterkit.errors import UsageError
from adapterkit.evaluate.api import SETTINGS_KEY, evaluation_settings
from adapterkit.tasks import get_task
from adapterkit.tasks.generation import GenerationOptions, generation_settings
from tests.tiny_lm import one_thread  # noqa: F401  (a fixture)
from tests.tiny_lm import tiny_llama, tiny_t5, tiny_tokenizer, toy_arithmetic, toy_translation
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment

pytestmark = pytest.mark.usefixtures("one_thread")


def _arithmetic(n: int):
    """GSM8K-like examples: a prompt, a reply to score and a final answer to match."""
    rows = toy_arithmetic(n)
    data = instructions_from_texts([r["question"] for r in rows])
    for example, row in zip(data.examples, rows):
        example["response"] = row["answer"]
        example["answer"] = row["answer"].split("####")[-1].strip()
    return data


def _translations(n: int):
    english, german = toy_translation(n)
    data = seq2seq_from_texts(english)
    for example, target in zip(data.examples, german):
        example["target"] = target
    return data


@pytest.fixture(scope="module")
def llama():
    tokenizer = tiny_tokenizer(chat_template=True)
    return tiny_llama(tokenizer), tokenizer


def test_the_settings_used_are_recorded(llama) -> None:
    model, tokenizer = llama
    options = GenerationOptions(max_new_tokens=3, stop=("four",), batch_size=2)
    metrics = ak.evaluate(model, tokenizer, _arithmetic(5), generation=options)
    assert metrics[SETTINGS_KEY] == {"max_length": 256, "template": "chat template", "generation": {
        "generate": True, "max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "stop": ["four"], "seed": None,
        "batch_size": 2}}  # 256: the tiny model's context, the causal-lm default below 1024
    assert metrics["answered"] == 5 and "perplexity" in metrics
    # a dict of the options' fields works as well
    same = ak.evaluate(model, tokenizer, _arithmetic(5), generation={"max_new_tokens": 3, "stop": ["four"],
                                                                     "batch_size": 2})
    assert same == metrics
    with pytest.raises(UsageError, match="unknown generation settings \\['max_tokens'\\]"):
        ak.evaluate(model, tokenizer, _arithmetic(2), generation={"max_tokens": 3})


def test_generation_batches_do_not_change_greedy_figures(llama) -> None:
    model, tokenizer = llama
    figures = [ak.evaluate(model, tokenizer, _arithmetic(6), generation=GenerationOptions(max_new_tokens=4,
                                                                                        batch_size=size))
               for size in (1, 4, 16)]
    for metrics in figures:
        metrics.pop(SETTINGS_KEY)
    assert figures[0] == figures[1] == figures[2]


def test_no_generate_scores_perplexity_alone(llama) -> None:
    model, tokenizer = llama
    with_generation = ak.evaluate(model, tokenizer, _arithmetic(4), generation={"max_new_tokens": 2})
    alone = ak.evaluate(model, tokenizer, _arithmetic(4), generate=False)
    assert "exact_match" in with_generation and "exact_match" not in alone
    assert alone["perplexity"] == pytest.approx(with_generation["perplexity"])
    assert alone[SETTINGS_KEY]["generation"]["generate"] is False
    t5_tokenizer = tiny_tokenizer()
    t5 = tiny_t5(t5_tokenizer)
    translated = ak.evaluate(t5, t5_tokenizer, _translations(4), generation={"max_new_tokens": 3})
    untranslated = ak.evaluate(t5, t5_tokenizer, _translations(4), generate=False)
    assert {"bleu", "chrf"} <= set(translated) and not {"bleu", "chrf"} & set(untranslated)
    assert untranslated["perplexity"] == pytest.approx(translated["perplexity"])


def test_without_a_chat_template_the_plain_format_stops_are_recorded() -> None:
    tokenizer = tiny_tokenizer()
    task = get_task("causal-lm")
    assert evaluation_settings(task, tokenizer)["generation"]["stop"] == ["\n### Instruction:"]
    task.generation = GenerationOptions(stop=("STOP",))
    assert evaluation_settings(task, tokenizer)["generation"]["stop"] == ["STOP"]
    assert generation_settings(GenerationOptions(), generate=False)["generate"] is False


def test_generation_settings_are_refused_where_nothing_generates(tmp_path) -> None:
    model, tokenizer = tiny_lora_classifier(tiny_bert_folder(tmp_path / "bert"), ["neg", "pos"])
    data = ak.load_data(pd.DataFrame(toy_sentiment(6)), task="classification")
    metrics = ak.evaluate(model, tokenizer, data)
    # a classifier records its input length only: 8, the multiple of 8 that fits these short reviews
    assert metrics[SETTINGS_KEY] == {"max_length": 8}
    with pytest.raises(UsageError, match="causal-lm and seq2seq"):
        ak.evaluate(model, tokenizer, data, generation={"max_new_tokens": 4})
    with pytest.raises(UsageError, match="causal-lm and seq2seq"):
        ak.evaluate(model, tokenizer, data, generate=False)
