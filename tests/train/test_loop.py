"""The training loop on a tiny BERT: it learns, it is reproducible, and its options do what they say."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adapterkit.core import head_parameters
from adapterkit.data import load_data
from adapterkit.evaluate import evaluate
from adapterkit.tasks import get_task
from adapterkit.train import TrainConfig, train
from adapterkit.train.optim import _fused_on_cpu, build_optimizer
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment

FAST = {"num_threads": 1, "progress": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def quiet_folder(tmp_path_factory):
    """The same tiny BERT without dropout, for exact gradient comparisons."""
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny0"), dropout=0.0)


@pytest.fixture(scope="module")
def toy():
    return load_data(toy_sentiment(160)), load_data(toy_sentiment(60, seed=1), labels=["neg", "pos"])


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_learns_the_toy_task(folder, toy):
    model, tokenizer = tiny_lora_classifier(folder, toy[0].labels)
    before = evaluate(model, tokenizer, toy[1])["accuracy"]
    result = train(model, tokenizer, *toy, TrainConfig(epochs=6, batch_size=16, lr=3e-2, eval_every=10, **FAST))
    assert result.step == 6 * 10  # 160 examples in batches of 16, six times
    assert before < 0.7 and result.best_metric >= 0.9
    assert result.metrics["accuracy"] == result.best_metric == max(h["accuracy"] for h in result.history)
    assert evaluate(model, tokenizer, toy[1])["accuracy"] == result.best_metric  # ends on the best weights


def test_same_seed_same_weights_other_seed_other_weights(folder, toy):
    runs = []
    for seed in (5, 5, 6):
        model, tokenizer = tiny_lora_classifier(folder, toy[0].labels)
        train(model, tokenizer, toy[0], None, TrainConfig(max_steps=6, batch_size=16, seed=seed, lr=1e-2, **FAST))
        runs.append(_trainable(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_gradient_accumulation_matches_a_bigger_batch(quiet_folder, toy):
    weights = []
    for batch_size, accum in ((16, 1), (8, 2)):
        model, tokenizer = tiny_lora_classifier(quiet_folder, toy[0].labels, dropout=0.0)
        train(model, tokenizer, toy[0], None, TrainConfig(max_steps=5, batch_size=batch_size, grad_accum_steps=accum,
                                                          group_by_length=False, lr=1e-2, **FAST))
        weights.append(_trainable(model))
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-6)


def test_head_gets_its_own_learning_rate(folder, toy):
    model, _ = tiny_lora_classifier(folder, toy[0].labels)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, head_lr=5e-2))
    head = {id(p) for p in head_parameters(model, "toy").values()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all adapter
        assert group["lr"] == (5e-2 if in_head.pop() else 1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        p.requires_grad for p in model.parameters())


def test_cpu_adapters_get_the_fused_adamw_kernel_with_the_reference_update(folder, toy):
    model, _ = tiny_lora_classifier(folder, toy[0].labels)
    model.cpu().double()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.01))
    assert optimizer.defaults["fused"] is True
    params = [p for g in optimizer.param_groups for p in g["params"]]
    reference = torch.optim.AdamW([{**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]]}
                                   for g in optimizer.param_groups], betas=(0.9, 0.999), eps=1e-8, foreach=False)
    copies = [p for g in reference.param_groups for p in g["params"]]
    torch.manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, q in zip(params, copies):
        # float64: the fused kernel rounds the same update in another order, a few eps per step
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    # other devices (and FSDP's shards) keep PyTorch's default choice
    assert _fused_on_cpu([torch.nn.Parameter(torch.zeros(2, device="meta"))]) is None
    assert _fused_on_cpu([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]) is None


def test_early_stopping_after_patience_evaluations(folder, toy):
    model, tokenizer = tiny_lora_classifier(folder, toy[0].labels)
    # a learning rate this small cannot change the predictions, so accuracy never improves
    result = train(model, tokenizer, *toy, TrainConfig(epochs=10, batch_size=16, lr=1e-12, head_lr=1e-12,
                                                       eval_every=2, early_stopping_patience=2, **FAST))
    assert result.stopped_early
    assert [h["step"] for h in result.history] == [2, 4, 6]
    assert result.step == 6 and result.best_step == 2


def test_metric_lower_is_better_for_loss(folder, toy):
    model, tokenizer = tiny_lora_classifier(folder, toy[0].labels)
    result = train(model, tokenizer, *toy, TrainConfig(max_steps=12, batch_size=16, lr=3e-2, eval_every=3,
                                                       metric="loss", **FAST))
    assert result.best_metric == min(h["loss"] for h in result.history)


def test_run_folder_contents(folder, toy, tmp_path):
    model, tokenizer = tiny_lora_classifier(folder, toy[0].labels)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=8, batch_size=16, lr=3e-2,
                         eval_every=4, log_every=2, **FAST)
    result = train(model, tokenizer, *toy, config)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8]
    assert all({"loss", "lr", "examples_per_s"} <= r.keys() for r in records if r["split"] == "train")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The file records the run as it ran: the length the task chose for this data filled in.
    saved = TrainConfig.from_dict(yaml.safe_load((run / "train_config.yaml").read_text()))
    chosen = get_task("classification").default_lengths(toy[0], tokenizer, model)["max_length"]
    assert saved == dataclasses.replace(config, max_length=chosen)
    # the model ends with the best checkpoint's weights, which is also on disk
    best = load_file(str(run / "checkpoints" / "best" / "trainable.safetensors"))
    assert all(torch.equal(best[n], p) for n, p in _trainable(model).items())
    kit = json.loads((run / "adapter" / "adapterkit.json").read_text())
    assert kit["task"] == "classification" and kit["labels"] == ["neg", "pos"]
    assert kit["metrics"]["validation"]["accuracy"] == pytest.approx(result.best_metric)
    assert result.adapter_dir == str(run / "adapter")


@pytest.mark.filterwarnings("ignore:bf16")
def test_bfloat16_autocast_trains(folder, toy):
    model, tokenizer = tiny_lora_classifier(folder, toy[0].labels)
    before = _trainable(model)
    result = train(model, tokenizer, *toy, TrainConfig(max_steps=3, batch_size=16, precision="bf16", **FAST))
    after = _trainable(model)
    assert result.step == 3 and any(not torch.equal(before[n], after[n]) for n in before)
    assert all(p.dtype == torch.float32 for p in after.values())  # autocast keeps float32 weights


def test_float16_autocast_trains_with_a_gradient_scaler_and_checkpoints_it(folder, toy, tmp_path):
    model, tokenizer = tiny_lora_classifier(folder, toy[0].labels)
    before = _trainable(model)
    run = tmp_path / "fp16"
    result = train(model, tokenizer, *toy, TrainConfig(max_steps=3, batch_size=16, precision="fp16",
                                                       output_dir=str(run), **FAST))
    after = _trainable(model)
    assert result.step == 3 and any(not torch.equal(before[n], after[n]) for n in before)
    assert all(p.dtype == torch.float32 for p in after.values())
    scaler = torch.load(run / "checkpoints" / "last" / "scaler.pt", weights_only=True)
    assert scaler["scale"] > 0  # the loss scale the run would resume with


def test_unknown_precision_device_or_strategy_is_refused_with_the_choices():
    from adapterkit.train import TrainConfigError

    for field, value, expected in (("precision", "fp8", "fp32"), ("strategy", "horovod", "fsdp"),
                                   ("device", "tpu", "cuda:N")):
        with pytest.raises(TrainConfigError, match=expected):
            TrainConfig(**{field: value})


def test_config_files_with_the_old_bf16_flag_still_read():
    assert TrainConfig.from_dict({"bf16": True}).precision == "bf16"
    assert TrainConfig.from_dict({"bf16": False}).precision == "fp32"


def test_gradient_checkpointing_trains_the_same_weights(quiet_folder, toy):
    runs = []
    for checkpointing in (False, True):
        model, tokenizer = tiny_lora_classifier(quiet_folder, toy[0].labels, dropout=0.0)
        train(model, tokenizer, toy[0], None, TrainConfig(max_steps=4, batch_size=16, lr=1e-2,
                                                          gradient_checkpointing=checkpointing, **FAST))
        runs.append(_trainable(model))
    for name, value in runs[0].items():  # the same arithmetic, recomputed: float32 rounding at most
        torch.testing.assert_close(runs[1][name], value, rtol=1e-5, atol=1e-7)
