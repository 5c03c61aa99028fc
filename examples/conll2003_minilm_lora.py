"""CoNLL-2003 NER with MiniLM + LoRA: validation entity F1 (the issue-4 real run).

Trains LoRA on the attention and feed-forward projections plus the token
classification head on (a seeded random subset of) ``train.txt``, then scores
entity precision/recall/F1 on the whole of ``valid.txt``. The data is read
where it lies; nothing is copied into the repository.

    HF_HUB_OFFLINE=1 python examples/conll2003_minilm_lora.py \
        --data ../shared/datasets/conll2003 --out /tmp/ner/run --train-sentences 6000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import adapterkit as ak
from adapterkit.data import load_data
from adapterkit.evaluate import evaluate
from adapterkit.models import load_model
from adapterkit.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with CoNLL-2003 train.txt and valid.txt")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, metrics, adapter)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--train-sentences", type=int, default=None, help="random subset size (default: all)")
    parser.add_argument("--validation-sentences", type=int, default=None, help="random subset size (default: all)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    # One thread: on a shared 2-core machine two OpenMP threads spin against other
    # processes and run an order of magnitude slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    folder = Path(args.data)
    train_data = load_data(folder / "train.txt", task="token-classification")
    valid_data = load_data(folder / "valid.txt", task="token-classification", labels=train_data.labels)
    rng = random.Random(args.seed)
    if args.train_sentences is not None and args.train_sentences < len(train_data):
        train_data = train_data.subset(sorted(rng.sample(range(len(train_data)), args.train_sentences)))
    if args.validation_sentences is not None and args.validation_sentences < len(valid_data):
        valid_data = valid_data.subset(sorted(rng.sample(range(len(valid_data)), args.validation_sentences)))
    print(f"train {len(train_data)} sentences, validation {len(valid_data)} sentences, labels {train_data.labels}")

    model, tokenizer = load_model(args.model, task="token-classification", labels=train_data.labels)
    ak.add_adapter(model, "conll2003", ak.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets="all-linear"))
    print(ak.trainable_summary(model))
    config = TrainConfig(output_dir=str(Path(args.out) / "run"), epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, warmup_ratio=0.1, max_length=args.max_length, eval_batch_size=64,
                         num_threads=args.threads, log_every=10, progress=False, seed=args.seed)
    result = train(model, tokenizer, train_data, None, config)
    print(f"trained {result.step} steps ({result.epochs:.3f} epochs) in {result.wall_time_s:.0f} s")
    metrics = evaluate(model, tokenizer, valid_data, max_length=args.max_length, batch_size=64,
                       output_dir=Path(args.out) / "eval")
    summary = {k: metrics[k] for k in ("precision", "recall", "f1", "accuracy", "loss", "entities", "count")}
    summary["per_type_f1"] = {t: round(v["f1"], 4) for t, v in metrics["per_class"].items()}
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
