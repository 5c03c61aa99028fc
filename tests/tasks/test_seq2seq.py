"""The seq2seq task on tiny T5 / BART models: teacher forcing, generation, BLEU/chrF, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sacrebleu
import torch

from adapterkit.core import add_adapter
from adapterkit.data import load_data
from adapterkit.runtime.inference import run_inference
from adapterkit.methods import LoraConfig
from adapterkit.tasks import get_task
from adapterkit.tasks.causal_lm import IGNORE
from adapterkit.train import TrainConfig, train
from tests.tiny_lm import one_thread  # noqa: F401  (a fixture)
from tests.tiny_lm import tiny_bart, tiny_t5, tiny_tokenizer, toy_translation
from tests.tolerances import assert_close_scaled, forward_ops

BUILD = {"t5": tiny_t5, "bart": tiny_bart}
pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n: int, seed: int = 0) -> list[dict]:
    english, german = toy_translation(n, seed)
    return [{"source": e, "target": g} for e, g in zip(english, german)]


def test_features_are_sources_and_target_labels() -> None:
    tokenizer = tiny_tokenizer()
    data = load_data(_pairs(3), task="seq2seq")
    task = get_task("seq2seq")
    features = task.encode(data, tokenizer, max_length=32)
    for example, feature in zip(data.examples, features):
        assert feature["input_ids"] == tokenizer(example["source"])["input_ids"]
        target = tokenizer(text_target=example["target"])["input_ids"]
        assert feature["labels"] == target + [tokenizer.eos_token_id]  # EOS added: this tokenizer adds none
    batch = task.collate(features, tokenizer)
    widths = [len(f["labels"]) for f in features]
    for row, width in enumerate(widths):
        assert (batch["labels"][row, width:] == IGNORE).all()


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_bleu_and_chrf_equal_sacrebleu_on_the_same_generations(kind: str) -> None:
    tokenizer = tiny_tokenizer()
    model = BUILD[kind](tokenizer)
    task = get_task("seq2seq")
    data = load_data(_pairs(5, seed=1), task="seq2seq")
    predictions, outputs = run_inference(model, tokenizer, task, data, max_length=32, batch_size=2)
    metrics = task.score(data, predictions, outputs)
    hypotheses = [p.text for p in predictions]
    references = [[e["target"] for e in data.examples]]
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, references).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, references).score)
    assert all(isinstance(h, str) for h in hypotheses)
    # And on partly right translations, where BLEU is far from 0.
    right = [e["target"] for e in data.examples]
    partly = [right[0], right[1].replace("rot", "blau"), "rot", right[3] + " rot", ""]
    fake = [p._replace(text=t) for p, t in zip(predictions, partly)]
    metrics = task.score(data, fake, outputs)
    assert 10 < metrics["bleu"] < 100
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(partly, [right]).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(partly, [right]).score)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_teacher_forced_perplexity_matches_the_model_loss(kind: str) -> None:
    tokenizer = tiny_tokenizer()
    model = BUILD[kind](tokenizer)
    task = get_task("seq2seq")
    data = load_data(_pairs(4, seed=2), task="seq2seq")
    predictions, outputs = run_inference(model, tokenizer, task, data, max_length=32, batch_size=4)
    metrics = task.score(data, predictions, outputs)
    total, count, largest = 0.0, 0, 0.0
    for feature in task.encode(data, tokenizer, 32):
        labels = torch.tensor([feature["labels"]])
        with torch.no_grad():
            output = model(input_ids=torch.tensor([feature["input_ids"]]), labels=labels)
        largest = max(largest, float(output.logits.abs().max()))
        total += float(output.loss) * labels.numel()
        count += labels.numel()
    assert metrics["target_tokens"] == count
    # Batched against one at a time: each NLL moves by at most twice its logits' rounding error,
    # plus a log-sum-exp over the vocabulary and a mean over the tokens; compared as log perplexity.
    ops = forward_ops(model, tokens=32) + model.config.vocab_size + count
    assert_close_scaled(math.log(metrics["perplexity"]), total / count, ops=ops,
                        scale=2 * max(largest, total / count), dtype=torch.float32)


def test_parallel_files_read_as_source_and_target(tmp_path: Path) -> None:
    english, german = toy_translation(4)
    (tmp_path / "train.en").write_text("\n".join(english) + "\n")
    (tmp_path / "train.de").write_text("\n".join(german) + "\n")
    data = load_data(tmp_path / "train.en", task="seq2seq")
    assert [e["source"] for e in data.examples] == english
    assert [e["target"] for e in data.examples] == german
    back = load_data(tmp_path / "train.de", task="seq2seq")
    assert [e["target"] for e in back.examples] == english


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_lora_training_lowers_the_loss_and_learns_to_translate(kind: str) -> None:
    tokenizer = tiny_tokenizer()
    model = BUILD[kind](tokenizer)
    add_adapter(model, "mt", LoraConfig(rank=8, alpha=16))  # the architecture's default targets
    for name, parameter in model.named_parameters():  # a random tiny model needs more than LoRA to learn
        if "lm_head" in name or "shared" in name or "embed" in name:
            parameter.requires_grad_(True)
    task = get_task("seq2seq")
    train_data = load_data(_pairs(64, seed=3), task="seq2seq")
    eval_data = load_data(_pairs(16, seed=4), task="seq2seq")
    before = task.score(eval_data, *run_inference(model, tokenizer, task, eval_data, 32, 16))
    result = train(model, tokenizer, train_data, eval_data,
                   TrainConfig(max_steps=60, batch_size=16, lr=3e-2, max_length=32, eval_every=60,
                               progress=False, num_threads=1, warmup_ratio=0.0))
    after = result.metrics
    assert after["loss"] < before["loss"] / 3
    assert after["chrf"] > 50 > before["chrf"]
    assert after["bleu"] > before["bleu"]
