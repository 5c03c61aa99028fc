"""SmolLM2-135M-Instruct + LoRA on Alpaca, GSM8K and Multi30k: the issue-5 real runs.

Each run takes a seeded random subset of a shared data set (train and held-out
parts disjoint), writes it to ``--out`` (never into the repository) so the
command line can evaluate the same examples, scores the base model (before),
trains LoRA on every linear layer with packed sequences, and scores again
(after). Figures land in ``OUT/results.json``.

    HF_HUB_OFFLINE=1 python examples/smollm2_lora.py alpaca --out /tmp/smol/alpaca
    HF_HUB_OFFLINE=1 python examples/smollm2_lora.py gsm8k --out /tmp/smol/gsm8k --phase before
    HF_HUB_OFFLINE=1 python examples/smollm2_lora.py gsm8k --out /tmp/smol/gsm8k --phase train
    HF_HUB_OFFLINE=1 python examples/smollm2_lora.py multi30k --out /tmp/smol/multi30k

Alpaca is scored by the perplexity of the held-out responses, GSM8K by the
exact match of the final number (generated greedily) and Multi30k (as
"Translate English to German: ..." instructions) by BLEU/chrF.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

import adapterkit as ak
from adapterkit.data import TaskData, load_data
from adapterkit.evaluate.runner import run_inference
from adapterkit.models import load_model
from adapterkit.tasks import get_task
from adapterkit.train import TrainConfig, train

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
# Per data set: default subset sizes, sequence length and learning rate.
DEFAULTS: dict[str, dict[str, Any]] = {
    "alpaca": {"train": 160, "eval": 80, "max_length": 192, "lr": 1e-3},
    "gsm8k": {"train": 48, "eval": 40, "max_length": 256, "lr": 1e-3},
    "multi30k": {"train": 200, "eval": 80, "max_length": 96, "lr": 1e-3},
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_subsets(name: str, root: Path, out: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Seeded disjoint train / held-out subsets of data set ``name``, written under ``out``."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    if name == "multi30k":
        pairs = {}
        for split in ("train", "val"):
            english = (root / "multi30k" / f"{split}.en").read_text(encoding="utf-8").splitlines()
            german = (root / "multi30k" / f"{split}.de").read_text(encoding="utf-8").splitlines()
            picked = sorted(rng.sample(range(len(english)), n_train if split == "train" else n_eval))
            pairs[split] = [(english[i], german[i]) for i in picked]
            for suffix, side in (("en", 0), ("de", 1)):
                (out / f"{split}.{suffix}").write_text("\n".join(p[side] for p in pairs[split]) + "\n", encoding="utf-8")
        return out / "train.en", out / "val.en"
    if name == "alpaca":
        rows = json.loads((root / "instructions" / "alpaca_5000.json").read_text(encoding="utf-8"))
    else:
        lines = (root / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    order = list(range(len(rows)))
    rng.shuffle(order)
    _write_jsonl(out / "train.jsonl", [rows[i] for i in order[:n_train]])
    _write_jsonl(out / "eval.jsonl", [rows[i] for i in order[n_train:n_train + n_eval]])
    return out / "train.jsonl", out / "eval.jsonl"


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("perplexity", "loss", "exact_match", "answered", "bleu", "chrf", "count", "response_tokens")
    return {k: metrics[k] for k in keys if k in metrics}


def score(model: Any, tokenizer: Any, data: TaskData, max_length: int, batch_size: int, path: Path) -> dict:
    """``evaluate``'s metrics, keeping the generations (if any) in ``path`` as JSON lines."""
    started = time.perf_counter()
    task = get_task("causal-lm")
    predictions, outputs = run_inference(model, tokenizer, task, data, max_length, batch_size)
    metrics = task.score(data, predictions, outputs)
    rows = [{"prompt": e["messages"][-1]["content"], "reference": e.get("answer") or e.get("reference"),
             "generated": p.text} for e, p in zip(data.examples, predictions) if p.text is not None]
    if rows:
        _write_jsonl(path, rows)
    return {**headline(metrics), "seconds": round(time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(DEFAULTS))
    parser.add_argument("--out", required=True, help="folder for the subsets, the run and results.json")
    parser.add_argument("--data-root", default=str(SHARED), help="the shared datasets folder")
    parser.add_argument("--phase", choices=["before", "train", "all"], default="all",
                        help="before: score the base model; train: train, then score; all: both")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train", type=int, help="training examples (default per data set)")
    parser.add_argument("--eval", type=int, help="held-out examples (default per data set)")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy 2-core machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = {**DEFAULTS[args.dataset], **{k: v for k, v in {"train": args.train, "eval": args.eval,
               "max_length": args.max_length, "lr": args.lr}.items() if v is not None}}
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train_path, eval_path = write_subsets(args.dataset, Path(args.data_root), out, options["train"],
                                          options["eval"], args.seed)
    train_data = load_data(train_path, task="causal-lm")
    eval_data = load_data(eval_path, task="causal-lm")
    print(f"{args.dataset}: train {len(train_data)} ({train_path}), held out {len(eval_data)} ({eval_path}); "
          f"max_length {options['max_length']}", flush=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["subsets"] = {"train": len(train_data), "eval": len(eval_data), "seed": args.seed, **options}

    model, tokenizer = load_model(args.model, task="causal-lm")
    if args.phase in ("before", "all"):
        results["before"] = score(model, tokenizer, eval_data, options["max_length"], args.eval_batch_size,
                                  out / "generations_before.jsonl")
        print("before:", results["before"], flush=True)
        results_path.write_text(json.dumps(results, indent=1))
    if args.phase in ("train", "all"):
        ak.add_adapter(model, args.dataset, ak.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets="all-linear"))
        print(ak.trainable_summary(model), flush=True)
        config = TrainConfig(output_dir=str(out / "run"), epochs=args.epochs, batch_size=args.batch_size,
                             lr=options["lr"], warmup_ratio=0.1, max_length=options["max_length"], packing=True,
                             eval_batch_size=args.eval_batch_size, num_threads=args.threads, log_every=1,
                             progress=False, seed=args.seed)
        result = train(model, tokenizer, train_data, None, config)
        results["training"] = {"steps": result.step, "seconds": round(result.wall_time_s),
                               "adapter": result.adapter_dir}
        print("trained:", results["training"], flush=True)
        results["after"] = score(model, tokenizer, eval_data, options["max_length"], args.eval_batch_size,
                                 out / "generations_after.jsonl")
        print("after:", results["after"], flush=True)
        results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
