"""Several SST-2 epochs: what frozen-prefix caching and adapters in the top blocks save after the first.

    python bench/sst2_epochs.py [--train-size 20000] [--epochs 3] [--top 3]

MiniLM (6 blocks), LoRA r8 alpha 16 on query/value, batch 32, max length 64,
lr 1e-3, float32, one seeded sample of ``../shared/datasets/sst2/train.tsv``;
validation accuracy on all 872 sentences after the last epoch. Three runs,
each in a fresh process: adapters in every block; adapters in the top
``--top`` blocks (the backward stops below them); the same with
``cache_frozen_prefix`` (epochs after the first start at the lowest adapted
block). Each epoch's wall time comes from the run's ``metrics.jsonl``.

The floor column is the time the matrix products of an epoch cannot go
below at this CPU's measured float32 matmul rate (the faster of PyTorch's
``torch.mm`` and oneDNN, which ``cpu_matmul="auto"`` uses on AMD CPUs): the forward of every
block that runs (all of them, or only the adapted ones once cached) and the
backward of the adapted blocks, which is one forward's worth: the frozen
weights need the gradient of their input only, never their own (LoRA's
rank-8 products are left out), attention's two products included. Goal (issue 17): epochs 2
and 3 at least 2x faster than epoch 1 with caching and adapters in the top half.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = {"all blocks": (None, False), "top": ("top", False), "top + prefix cache": ("top", True)}


def matmul_rate(kernel: str = "best") -> float:
    """Float32 GEMM FLOP/s of this CPU at MiniLM's shapes (tokens x 384 @ 384 x 1536).

    ``kernel``: ``"pytorch"`` (``torch.mm``: MKL on x86), ``"onednn"`` (the
    kernel ``cpu_matmul="onednn"`` uses), or ``"best"``, the faster of the two:
    the rate the CPU can reach, which the physical floor uses.
    """
    import torch

    from adapterkit.runtime.cpu_matmul import frozen_linear, onednn_available

    if kernel == "best":
        return max(matmul_rate("pytorch"), matmul_rate("onednn") if onednn_available() else 0.0)
    a, w = torch.randn(2048, 384), torch.randn(1536, 384)
    product = (lambda: a @ w.t()) if kernel == "pytorch" else (lambda: frozen_linear(a, w))
    for _ in range(3):
        product()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        product()
    return 2 * 2048 * 384 * 1536 * n / (time.perf_counter() - start)


def measured_rates() -> float:
    """Print both kernels' float32 rates (each the best of three measurements); return the faster for the floors."""
    from adapterkit.runtime.cpu_matmul import onednn_available

    rates = {kernel: max(matmul_rate(kernel) for _ in range(3))
             for kernel in ("pytorch", *(["onednn"] if onednn_available() else []))}
    shown = ", ".join(f"{'PyTorch torch.mm' if k == 'pytorch' else 'oneDNN'} {r / 1e9:.1f}" for k, r in rates.items())
    print(f"float32 matmul rate, GFLOP/s: {shown}; the floors use the faster", flush=True)
    return max(rates.values())


def block_flops(tokens: int, length: float, hidden: int = 384, ffn: int = 1536) -> float:
    """Forward FLOPs of one BERT block over ``tokens`` tokens in sequences of mean ``length``."""
    dense = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 2 * 2 * tokens * length * hidden
    return dense + attention


def trimmed_block_flops(tokens: int, length: float, hidden: int = 384, ffn: int = 1536) -> float:
    """Forward FLOPs of the last block cut to the classifier's position (``tasks/head_reads.py``).

    Its q/k/v projections and attention run at every position, its output
    projection and feed-forward at one position per sentence.
    """
    every_position = 2 * tokens * 3 * hidden * hidden + 2 * 2 * tokens * length * hidden
    return every_position + 2 * (tokens / length) * (hidden * hidden + 2 * hidden * ffn)


def epoch_flops(tokens: int, length: float, forward_blocks: int, backward_blocks: int, trimmed: bool) -> float:
    """The matrix products of an epoch: block forwards plus block backwards (input gradients only).

    ``trimmed``: the top block of each is the cut last block (adapterkit's
    default for a classifier); its backward costs what its forward does.
    """
    full = block_flops(tokens, length)
    if not trimmed:
        return full * (forward_blocks + backward_blocks)
    return full * (forward_blocks + backward_blocks - 2) + 2 * trimmed_block_flops(tokens, length)


def worker(config: str, train_size: int, epochs: int, top: int) -> None:
    import torch

    import adapterkit as ak
    from sst2_end_to_end import read_sst2  # noqa: E402

    layers, cached = CONFIGS[config]
    train_rows = read_sst2("train.tsv", train_size, 0)
    val_rows = read_sst2("validation.tsv", None, 0)
    model, tokenizer = ak.load_model("minilm", task="classification", labels=["0", "1"])
    torch.manual_seed(0)
    ak.add_adapter(model, "sst2", ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    train_data = ak.load_data(train_rows, text_column="sentence", label_column="label")
    val_data = ak.load_data(val_rows, text_column="sentence", label_column="label", labels=train_data.labels)
    lengths = [len(tokenizer(r["sentence"], truncation=True, max_length=64)["input_ids"]) for r in train_rows]
    with tempfile.TemporaryDirectory() as tmp:
        ak.train(model, tokenizer, train_data, None, ak.TrainConfig(
            epochs=epochs, batch_size=32, lr=1e-3, max_length=64, seed=0, progress=False,
            num_threads=torch.get_num_threads(), adapter_layers=f"top:{top}" if layers else None,
            cache_frozen_prefix=cached, output_dir=f"{tmp}/run"))
        records = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    accuracy = ak.evaluate(model, tokenizer, val_data)["accuracy"]
    times = [r["wall_time_s"] for r in records if r["split"] == "epoch"]
    print(json.dumps({"epochs": times, "accuracy": accuracy, "tokens": sum(lengths),
                      "mean_length": sum(lengths) / len(lengths)}))


def floor_seconds(config: str, epoch: int, tokens: int, mean_length: float, rate: float, top: int) -> float:
    layers, cached = CONFIGS[config]
    adapted = top if layers else 6
    forward_blocks = adapted if (cached and epoch > 1) else 6
    return epoch_flops(tokens, mean_length, forward_blocks, adapted, trimmed=True) / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--top", type=int, default=3, help="adapted blocks of the top runs (MiniLM has 6)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.train_size, args.epochs, args.top)
        return
    print(common.machine())
    rate = measured_rates()
    rows = []
    for config in CONFIGS:
        result = common.run_isolated(__file__, ["--worker", config, "--train-size", str(args.train_size),
                                                "--epochs", str(args.epochs), "--top", str(args.top)])
        print(config, result, flush=True)
        times = result["epochs"]
        for epoch, seconds in enumerate(times, start=1):
            floor = floor_seconds(config, epoch, result["tokens"], result["mean_length"], rate, args.top)
            accuracy = f"{100 * result['accuracy']:.2f}" if epoch == len(times) else ""
            rows.append([config.replace("top", f"top:{args.top}"), epoch, f"{seconds:.1f}",
                         f"{times[0] / seconds:.2f}", f"{floor:.1f}", f"{seconds / floor:.1f}", accuracy])
    print(common.table(["run", "epoch", "seconds", "epoch 1 / this", "matmul floor s", "x floor",
                        "val accuracy %"], rows))


if __name__ == "__main__":
    main()
