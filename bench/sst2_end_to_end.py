"""SST-2 end to end: adapterkit vs PEFT + Trainer vs full fine-tuning, and every method.

    python bench/sst2_end_to_end.py [--train-size 67349] [--seeds 0 1 2] [--methods ...]
        [--peer-sampling grouped random] [--adapter-layers top:3 top:2]

One epoch over (a seeded sample of) ``../shared/datasets/sst2/train.tsv``,
accuracy on the full validation set (872 sentences). Wall time counts
tokenisation and training, not evaluation. All runs use MiniLM, batch 32,
max length 64, the same threads and float32 (``--precisions`` adds bf16/fp16
autocast runs of the adapterkit methods, trained and evaluated at that precision).
The peer is PEFT + ``Trainer`` at its best: length-grouped batches with dynamic
padding, the same linear schedule with 6% warm-up; every time is also shown as a
ratio to it. ``--adapter-layers top:K`` adds runs with the adapter in the top K
blocks only (the backward stops below them).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

import adapterkit as ak  # noqa: E402

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "sst2"
BATCH, MAX_LENGTH = 32, 64

# method -> (config factory, learning rate); rates are our defaults per method family
METHODS: dict[str, tuple[Callable[[], ak.AdapterConfig | None], float]] = {
    "lora": (lambda: ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]), 1e-3),
    "lora-all": (lambda: ak.LoraConfig(rank=8, alpha=16, targets="all-linear"), 1e-3),
    "dora": (lambda: ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"], use_dora=True), 1e-3),
    "houlsby": (lambda: ak.BottleneckConfig(placement="houlsby"), 1e-3),
    "pfeiffer": (lambda: ak.BottleneckConfig(placement="pfeiffer"), 1e-3),
    "parallel": (lambda: ak.BottleneckConfig(placement="parallel"), 1e-3),
    "ia3": (lambda: ak.IA3Config(), 5e-3),
    "prefix": (lambda: ak.PrefixTuningConfig(num_virtual_tokens=20), 5e-3),
    "prompt": (lambda: ak.PromptTuningConfig(num_virtual_tokens=20), 3e-2),
    "bitfit": (lambda: ak.BitFitConfig(), 2e-3),
    "full": (lambda: None, 5e-5),
}


def read_sst2(name: str, limit: int | None, seed: int) -> list[dict]:
    with open(SST2 / name, newline="", encoding="utf-8") as f:
        rows = [{"sentence": r["sentence"].strip(), "label": r["label"]}
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if limit is not None and limit < len(rows):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = [rows[i] for i in order[:limit]]
    return rows


def run_adapterkit(method: str, train_rows: list[dict], val_rows: list[dict], seed: int,
                   precision: str = "fp32", quantize: str | None = None, adapter_layers: str | None = None) -> dict:
    factory, lr = METHODS[method]
    torch.manual_seed(seed)  # the new classification head: the same initial weights in every run of this seed
    model, tokenizer = ak.load_model("minilm", task="classification", labels=["0", "1"], quantize=quantize)
    config = factory()
    if config is not None:
        ak.add_adapter(model, "sst2", config)
    train_data = ak.load_data(train_rows, text_column="sentence", label_column="label")
    val_data = ak.load_data(val_rows, text_column="sentence", label_column="label", labels=train_data.labels)
    start = time.perf_counter()
    ak.train(model, tokenizer, train_data, None, ak.TrainConfig(
        epochs=1, batch_size=BATCH, lr=lr, max_length=MAX_LENGTH, seed=seed, progress=False,
        num_threads=torch.get_num_threads(), precision=precision, adapter_layers=adapter_layers))
    seconds = time.perf_counter() - start
    summary = ak.trainable_summary(model)  # after training: --adapter-layers removes the lower blocks' weights
    accuracy = ak.evaluate(model, tokenizer, val_data, precision=precision)["accuracy"]
    size = 0
    if config is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ak.save_adapter(model, "sst2", tmp)
            size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {"accuracy": accuracy, "seconds": seconds, "percent": summary["percent"], "bytes": size}


PEER_SAMPLING = {"grouped": "group_by_length", "random": "random"}


def run_peft_trainer(train_rows: list[dict], val_rows: list[dict], seed: int, sampling: str = "grouped",
                     precision: str = "fp32") -> dict:
    """PEFT LoRA (rank 8, query/value) with the Hugging Face Trainer, set up as its docs suggest.

    ``sampling="grouped"`` is the peer at its best: ``train_sampling_strategy="group_by_length"``
    (batches of similar lengths, dynamic padding), as a careful user sets it; ``"random"`` is the
    Trainer's default. Both: the schedule adapterkit trains with (linear, 6% warm-up), float32, batch 32,
    dynamic padding (``DataCollatorWithPadding``).
    """
    import numpy as np
    import peft
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    folder = common.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)  # the new classification head, as for the adapterkit runs
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                       task_type="SEQ_CLS"))

    def encode(rows: list[dict]) -> Dataset:
        data = Dataset.from_list([{"sentence": r["sentence"], "label": int(r["label"])} for r in rows])
        return data.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=MAX_LENGTH),
                        batched=True, remove_columns=["sentence"])

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        args = TrainingArguments(output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=BATCH,
                                 learning_rate=1e-3, seed=seed, report_to=[], save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, use_cpu=True, warmup_steps=0.06,
                                 train_sampling_strategy=PEER_SAMPLING[sampling], bf16=precision == "bf16")
        trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows),
                          data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train()
        seconds = time.perf_counter() - start
        predictions = trainer.predict(encode(val_rows))
    accuracy = float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())
    return {"accuracy": accuracy, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=None, help="sample this many training sentences")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--peer-sampling", nargs="+", default=["grouped"], choices=list(PEER_SAMPLING),
                        help="the PEFT + Trainer runs' batch sampling (grouped: length-grouped, the peer at its best)")
    parser.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "nf4", "fp4"],
                        help="also train the adapterkit runs on a base stored in these formats")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16", "auto"],
                        help="train and evaluate the adapterkit runs at each of these (autocast; default fp32)")
    parser.add_argument("--adapter-layers", nargs="+", default=[], metavar="top:K",
                        help="also train each adapterkit method with its adapter in these blocks only")
    args = parser.parse_args()
    print(common.machine())
    val_rows = read_sst2("validation.tsv", None, 0)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        train_rows = read_sst2("train.tsv", args.train_size, seed)
        print(f"seed {seed}: {len(train_rows)} training sentences", flush=True)
        for sampling in [] if args.skip_peft else args.peer_sampling:
            for precision in [p for p in args.precisions if p in ("fp32", "bf16")]:
                peer = f"peft lora + Trainer ({sampling})" + ("" if precision == "fp32" else f" {precision}")
                results.setdefault(peer, []).append(run_peft_trainer(train_rows, val_rows, seed, sampling, precision))
                print(peer, results[peer][-1], flush=True)
        for method in args.methods:
            for precision in args.precisions:
                for scheme in args.quantize:
                    name = method if args.precisions == ["fp32"] else f"{method} {precision}"
                    name += "" if scheme == "none" else f" on {scheme} base"
                    quantize = None if scheme == "none" else scheme
                    for layers in [None, *args.adapter_layers]:
                        label = name if layers is None else f"{name} {layers}"
                        results.setdefault(label, []).append(
                            run_adapterkit(method, train_rows, val_rows, seed, precision, quantize, layers))
                        print(label, results[label][-1], flush=True)
    full = statistics.mean(r["accuracy"] for r in results.get("full", [{"accuracy": float("nan")}]))
    peer_runs = results.get("peft lora + Trainer (grouped)")
    peer_seconds = statistics.mean(r["seconds"] for r in peer_runs) if peer_runs else None
    rows = []
    for name, runs in results.items():
        seconds = statistics.mean(r["seconds"] for r in runs)
        acc = [r["accuracy"] * 100 for r in runs]
        rows.append([name, f"{statistics.mean(acc):.2f}" + (f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""),
                     f"{statistics.mean(acc) - full * 100:+.2f}",
                     f"{runs[0].get('percent', float('nan')):.3f}" if "percent" in runs[0] else "-",
                     f"{runs[0]['bytes'] / 1024:.0f}" if runs[0].get("bytes") else "-",
                     f"{seconds:.0f}", f"{seconds / peer_seconds:.2f}" if peer_seconds else "-"])
    print(common.table(["run", "val accuracy %", "vs full FT (points)", "trainable %", "adapter KiB",
                        "train seconds", "time vs PEFT grouped"], rows))


if __name__ == "__main__":
    main()
