"""Does ``torch.compile`` of the training forward pay on this machine? adapterkit with and without it.

    python bench/train_compile.py [--steps 300] [--adapter-layers top:3]

MiniLM, LoRA r8 alpha 16 on query/value, batch 32, max length 64, lr 1e-3,
float32, SST-2 sentences (``../shared/datasets/sst2/train.tsv``, a seeded
sample), length-grouped batches; each run in a fresh process. Reported:
the whole run's wall time (compilation included), and the steady-state
examples/s (median of the logged windows after the first 60 steps, so
compilation and recompilations for new shapes are left out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def worker(compiled: bool, steps: int, layers: str | None) -> None:
    import torch

    import adapterkit as ak
    from sst2_end_to_end import read_sst2  # noqa: E402

    rows = read_sst2("train.tsv", steps * 32, 0)
    torch.manual_seed(0)
    model, tokenizer = ak.load_model("minilm", task="classification", labels=["0", "1"])
    ak.add_adapter(model, "sst2", ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    data = ak.load_data(rows, text_column="sentence", label_column="label")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ak.train(model, tokenizer, data, None, ak.TrainConfig(
            max_steps=steps, batch_size=32, lr=1e-3, max_length=64, seed=0, progress=False, compile=compiled,
            adapter_layers=layers, num_threads=torch.get_num_threads(), output_dir=f"{tmp}/run"))
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    steady = [r["examples_per_s"] for r in records if r["split"] == "train" and r["step"] > 60]
    print(json.dumps({"seconds": seconds, "steady_examples_per_s": statistics.median(steady)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--adapter-layers", default=None)
    parser.add_argument("--worker", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker == "compiled", args.steps, args.adapter_layers)
        return
    print(common.machine())
    results = {}
    for kind in ("eager", "compiled"):
        extra = ["--adapter-layers", args.adapter_layers] if args.adapter_layers else []
        results[kind] = common.run_isolated(__file__, ["--worker", kind, "--steps", str(args.steps), *extra])
        print(kind, results[kind], flush=True)
    eager = results["eager"]
    rows = [[kind, f"{r['seconds']:.1f}", f"{r['seconds'] / eager['seconds']:.2f}",
             f"{r['steady_examples_per_s']:.0f}", f"{r['steady_examples_per_s'] / eager['steady_examples_per_s']:.2f}"]
            for kind, r in results.items()]
    print(common.table(["run", "wall s (compile included)", "vs eager", "steady examples/s", "vs eager"], rows))


if __name__ == "__main__":
    main()
