"""Held-out perplexity of SmolLM2-135M after the same LoRA training on a float, int8 and nf4 base.

    python bench/quantized_quality.py [--steps 120] [--train 2000] [--held-out 300] [--targets qkvo|all-linear]

Alpaca instructions from ``../shared/datasets/instructions/alpaca_5000.json``
(the first ``--train`` for training, the last ``--held-out`` for evaluation),
LoRA r8 alpha 16 on q/k/v/o (``--targets all-linear``: on every linear layer of
the blocks, QLoRA's recipe), batch 8, length 128 (evaluation: 256), learning rate 2e-4, the
same seed and batch order for every base; each base trains in a fresh
process. Perplexity is over the held-out replies (teacher forcing), before
and after training. Goal (issue 15): the quantised bases' perplexity after
training within 3% of the float base's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "instructions" / "alpaca_5000.json"
TARGETS = {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear"}


def worker(scheme: str, steps: int, train_size: int, held_out: int, targets: str) -> None:
    import adapterkit as ak

    rows = json.loads(DATA.read_text())
    train = ak.load_data(rows[:train_size], task="causal-lm")
    test = ak.load_data(rows[-held_out:], task="causal-lm")
    start = time.perf_counter()
    model, tokenizer = ak.load_model("smollm2-135m", task="causal-lm", quantize=None if scheme == "fp32" else scheme)
    loaded = time.perf_counter() - start
    before = ak.evaluate(model, tokenizer, test, max_length=256)["perplexity"]
    ak.add_adapter(model, "q", ak.LoraConfig(rank=8, alpha=16, targets=TARGETS[targets]))
    start = time.perf_counter()
    ak.train(model, tokenizer, train, None, ak.TrainConfig(max_steps=steps, batch_size=8, max_length=128, lr=2e-4,
                                                           seed=0, progress=False, eval_every=None))
    trained = time.perf_counter() - start
    after = ak.evaluate(model, tokenizer, test, max_length=256)["perplexity"]
    print(json.dumps({"before": before, "after": after, "train_s": trained, "load_s": loaded}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", nargs="+", default=["fp32", "int8", "nf4"], choices=["fp32", "int8", "nf4"])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--targets", default="qkvo", choices=sorted(TARGETS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.train, args.held_out, args.targets)
        return
    print(common.machine())
    print(f"LoRA r8 on {args.targets}, {args.steps} steps")
    results = {}
    for scheme in args.schemes:
        results[scheme] = common.run_isolated(__file__, ["--worker", scheme, "--steps", str(args.steps), "--train",
                                                         str(args.train), "--held-out", str(args.held_out),
                                                         "--targets", args.targets])
        print(scheme, results[scheme], flush=True)
    base = results.get("fp32", {}).get("after")
    rows = [[s, f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['after'] / base - 1:+.2%}" if base else "-",
             f"{r['train_s']:.0f}", f"{r['load_s']:.1f}"] for s, r in results.items()]
    print(common.table(["base", "perplexity before", "after training", "vs float after", "train s", "load s"], rows))


if __name__ == "__main__":
    main()
