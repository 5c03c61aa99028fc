"""One process of a distributed training test, started by ``torchrun`` (or alone, for the reference).

    python -m torch.distributed.run --nproc-per-node 2 tests/train/distributed_worker.py \
        MODEL_DIR TRAIN.jsonl EVAL.jsonl OUT STRATEGY GRAD_ACCUM [TASK]

Trains LoRA on the tiny BERT (or, with TASK ``causal-lm``, the tiny Llama,
whose loss is the fused chunked one) with ``ak.train`` and writes ``OUT.rank<R>.pt``:
whether the frozen base is bitwise what it was before, the whole trainable
weights (gathered from FSDP shards), and the run's metrics and history.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.runtime.distributed import whole_parameters


def main() -> None:
    model_dir, train_file, eval_file, out, strategy, accum = sys.argv[1:7]
    task = sys.argv[7] if len(sys.argv) > 7 else "classification"
    torch.set_num_threads(1)
    if task == "causal-lm":
        train_data = ak.load_data(train_file, task="causal-lm")
        eval_data = ak.load_data(eval_file, task="causal-lm")
        model, tokenizer = ak.load_model(model_dir, task="causal-lm")
        targets = ["q_proj", "v_proj"]
    else:
        train_data = ak.load_data(train_file)
        eval_data = ak.load_data(eval_file, labels=train_data.labels)
        model, tokenizer = ak.load_model(model_dir, labels=train_data.labels)
        targets = ["query", "value"]
    torch.manual_seed(0)  # the same head and adapter in every process
    ak.add_adapter(model, "toy", ak.LoraConfig(rank=4, alpha=8, targets=targets))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    config = ak.TrainConfig(output_dir=out, max_steps=6, batch_size=8, grad_accum_steps=int(accum), lr=1e-2,
                            eval_every=3, strategy=strategy, precision="fp32", device="cpu", progress=False,
                            seed=0)
    result = ak.train(model, tokenizer, train_data, eval_data, config)
    with whole_parameters(model):
        base_same = all(torch.equal(base_before[n], p.detach()) for n, p in model.named_parameters()
                        if n in base_before)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"base_unchanged": base_same, "trainable": trainable, "metrics": result.metrics,
                "history": result.history, "output_dir": result.output_dir}, Path(f"{out}.rank{rank}.pt"))


if __name__ == "__main__":
    main()
