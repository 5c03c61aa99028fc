"""Interrupted runs: resuming gives exactly the uninterrupted weights; a bad loss keeps the last good checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapterkit.data import load_data
from adapterkit.errors import ResumeError
from adapterkit.train import NonFiniteLossError, TrainConfig, train
from tests.tiny_text import tiny_bert_folder, tiny_lora_classifier, toy_sentiment

# 100 examples in batches of 8 -> 13 micro-batches per epoch; two per step -> 7 steps
# per epoch (the last step has one micro-batch); 2 epochs -> 14 steps; a checkpoint
# every 3 steps. Dropout is on, so the RNG state has to be restored as well.
SETTINGS = dict(epochs=2, batch_size=8, grad_accum_steps=2, lr=2e-2, eval_every=3, seed=11,
                load_best=False, num_threads=1, progress=False)


class Crash(RuntimeError):
    """Stands in for a killed process."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tiny_bert_folder(tmp_path_factory.mktemp("tiny"))
    train_data = load_data(toy_sentiment(100))
    eval_data = load_data(toy_sentiment(30, seed=1), labels=train_data.labels)
    return folder, train_data, eval_data


def _count_training_forwards(model, crash_at: int | None = None) -> list[int]:
    """Count forward passes in training mode; raise ``Crash`` on number ``crash_at``."""
    calls = [0]

    def hook(module, args, kwargs):
        if module.training:
            calls[0] += 1
            if calls[0] == crash_at:
                raise Crash(f"killed during training forward {crash_at}")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_ends_with_the_uninterrupted_weights(setup, tmp_path):
    folder, train_data, eval_data = setup
    model, tokenizer = tiny_lora_classifier(folder, train_data.labels)
    calls = _count_training_forwards(model)
    reference = train(model, tokenizer, train_data, eval_data,
                      TrainConfig(output_dir=str(tmp_path / "straight"), **SETTINGS))
    expected = _trainable(model)
    assert reference.step == 14 and calls[0] == 26

    # Killed in step 8 (forward 15): the last checkpoint is the one of step 6.
    model, tokenizer = tiny_lora_classifier(folder, train_data.labels)
    _count_training_forwards(model, crash_at=15)
    run = tmp_path / "interrupted"
    with pytest.raises(Crash):
        train(model, tokenizer, train_data, eval_data, TrainConfig(output_dir=str(run), **SETTINGS))
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    assert state["loop"]["step"] == 6

    # A new process: a freshly built model (its adapter initialised from another seed) resumes.
    model, tokenizer = tiny_lora_classifier(folder, train_data.labels, seed=123)
    calls = _count_training_forwards(model)
    resumed = train(model, tokenizer, train_data, eval_data,
                    TrainConfig(output_dir=str(run), resume=True, **SETTINGS))
    assert calls[0] == 26 - 12  # only steps 7..14 ran
    got = _trainable(model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert resumed.history == reference.history
    assert resumed.best_step == reference.best_step
    saved = [load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (tmp_path / "straight", run)]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    eval_steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if '"eval"' in line]
    assert eval_steps == [3, 6, 9, 12, 14]  # no duplicated records after the resume


def test_resume_refuses_other_settings_and_missing_checkpoints(setup, tmp_path):
    folder, train_data, eval_data = setup
    model, tokenizer = tiny_lora_classifier(folder, train_data.labels)
    train(model, tokenizer, train_data, eval_data,
          TrainConfig(output_dir=str(tmp_path / "run"), **{**SETTINGS, "epochs": 1}))
    model, tokenizer = tiny_lora_classifier(folder, train_data.labels)
    with pytest.raises(ResumeError, match=r"train\.batch_size: 8 -> 4\. Resume with"):
        train(model, tokenizer, train_data, eval_data,
              TrainConfig(output_dir=str(tmp_path / "run"), resume=True, **{**SETTINGS, "epochs": 1, "batch_size": 4}))
    with pytest.raises(ResumeError, match="holds no training run to continue"):
        train(model, tokenizer, train_data, eval_data,
              TrainConfig(output_dir=str(tmp_path / "empty"), resume=True, **SETTINGS))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    folder, train_data, eval_data = setup
    model, tokenizer = tiny_lora_classifier(folder, train_data.labels)
    calls = [0]

    def poison(module, args, output):
        # from the 9th training forward (step 5) on, the logits are NaN
        if model.training:
            calls[0] += 1
            if calls[0] >= 9:
                return output * float("nan")
        return output

    model.classifier.register_forward_hook(poison)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(model, tokenizer, train_data, eval_data, TrainConfig(output_dir=str(run), **SETTINGS))
    message = str(err.value)
    assert "nan" in message and "step 5" in message and "step 3" in message and "--resume" in message
    last = run / "checkpoints" / "last"
    assert json.loads((last / "state.json").read_text())["loop"]["step"] == 3
    weights = load_file(str(last / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
