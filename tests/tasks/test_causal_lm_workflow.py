"""causal-lm end to end on tiny models: train (packed) -> evaluate -> generate, in memory and via folders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adapterkit.core import add_adapter, adapters_disabled
from adapterkit.data import load_data
from adapterkit.evaluate import evaluate, predict
from adapterkit.methods import LoraConfig
from adapterkit.models import load_model, load_with_adapter
from adapterkit.tasks.causal_lm import Generation
from adapterkit.train import TrainConfig, train
from tests.tiny_lm import one_thread  # noqa: F401  (a fixture)
from tests.tiny_lm import BUILDERS, tiny_model_folder, tiny_tokenizer, toy_instructions
from tests.tolerances import assert_close_scaled, forward_ops

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_perplexity(actual: float, expected: float, model, tokenizer, data, max_length: int) -> None:
    """Two evaluations of one model's perplexity agree up to float32 rounding.

    Compared as log perplexity, the mean NLL: each token's NLL moves by at most
    twice its logits' rounding error (log-softmax is 2-Lipschitz in the max
    norm), so the scale is twice the largest logit; then a log-sum-exp over the
    vocabulary and a mean over the tokens.
    """
    from adapterkit.tasks import get_task

    features = get_task("causal-lm").encode(data, tokenizer, max_length)
    was_training = model.training
    with torch.no_grad():  # as evaluate() runs it: eval mode, no dropout
        model.eval()
        largest = max(float(model(input_ids=torch.tensor([f["input_ids"]])).logits.abs().max()) for f in features)
    model.train(was_training)
    tokens = sum(len(f["input_ids"]) for f in features)
    ops = forward_ops(model, tokens=max_length) + model.config.vocab_size + tokens
    assert_close_scaled(math.log(actual), math.log(expected), ops=ops,
                        scale=2 * max(largest, math.log(expected)), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_lora_training_learns_the_toy_instructions(kind: str) -> None:
    tokenizer = tiny_tokenizer()
    model = BUILDERS[kind](tokenizer)
    # The attention's query/value projections (LoRA's paper setting) keep this toy run stable at lr 3e-2.
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[kind]
    add_adapter(model, "it", LoraConfig(rank=8, alpha=16, targets=targets))
    for name, parameter in model.named_parameters():  # a random tiny model needs more than LoRA to learn
        if "lm_head" in name or "embed" in name or "wte" in name:
            parameter.requires_grad_(True)
    train_data = load_data(toy_instructions(64, seed=1), task="causal-lm")
    held_out = load_data(toy_instructions(12, seed=2), task="causal-lm", answer_column="output")
    before = evaluate(model, tokenizer, held_out, max_length=64)
    result = train(model, tokenizer, train_data, held_out,
                   TrainConfig(max_steps=40, batch_size=8, lr=3e-2, max_length=64, packing=True,
                               eval_every=40, warmup_ratio=0.0, progress=False, num_threads=1))
    after = evaluate(model, tokenizer, held_out, max_length=64)
    assert after["perplexity"] < before["perplexity"] / 5
    assert after["exact_match"] >= 0.8 > before["exact_match"]
    assert_same_perplexity(result.metrics["perplexity"], after["perplexity"], model, tokenizer, held_out, 64)
    with adapters_disabled(model):  # the base model is untouched
        assert evaluate(model, tokenizer, held_out, max_length=64)["perplexity"] != after["perplexity"]


def test_adapter_folder_round_trip_evaluates_and_generates(tmp_path: Path) -> None:
    folder = tiny_model_folder(tmp_path / "tiny-llama", "llama", chat_template=True)
    model, tokenizer = load_model(str(folder), task="causal-lm")
    add_adapter(model, "it", LoraConfig(rank=4, alpha=8))
    data = load_data(toy_instructions(24), task="causal-lm")
    result = train(model, tokenizer, data, None,
                   TrainConfig(max_steps=4, batch_size=8, lr=1e-2, max_length=48, packing=True,
                               output_dir=str(tmp_path / "run"), progress=False, num_threads=1))
    assert result.adapter_dir is not None
    reloaded, retokenizer, metadata = load_with_adapter(result.adapter_dir)
    assert metadata["task"] == "causal-lm"
    metrics = evaluate(reloaded, retokenizer, data, max_length=48)
    assert_same_perplexity(metrics["perplexity"], evaluate(model, tokenizer, data, max_length=48)["perplexity"],
                           model, tokenizer, data, 48)
    (generated,) = predict(reloaded, retokenizer, ["say red twice"])
    assert isinstance(generated, Generation) and isinstance(generated.text, str)
