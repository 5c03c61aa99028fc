"""SST-2 end to end: adapterkit vs PEFT + Trainer vs full fine-tuning, and every method.

    python bench/sst2_end_to_end.py [--train-size 67349] [--seeds 0 1 2] [--methods ...]
        [--peer-sampling grouped random] [--adapter-layers top:3 top:2] [--untrimmed] [--torch-dropout]
        [--pytorch-products]

One epoch over (a seeded sample of) ``../shared/datasets/sst2/train.tsv``,
accuracy on the full validation set (872 sentences). Wall time counts
tokenisation and training, not evaluation. All runs use MiniLM, batch 32,
max length 64, the same threads and float32 (``--precisions`` adds bf16/fp16
autocast runs of the adapterkit methods, trained and evaluated at that precision).
The peer is PEFT + ``Trainer`` at its best: length-grouped batches with dynamic
padding, the same linear schedule with 6% warm-up; every time is also shown as a
ratio to it. ``--adapter-layers top:K`` adds runs with the adapter in the top K
blocks only (the backward stops below them). Our runs compute the last block at
the classifier's position only (``TrainConfig.trim_last_block``, the default);
``--untrimmed`` adds each run with every position computed, as the peer does.
Our dropout masks come from a hash (``TrainConfig.hashed_dropout``, the
default); ``--torch-dropout`` adds each run with PyTorch's masks, as the peer's.
On AMD CPUs our frozen float32 products go through oneDNN
(``TrainConfig.cpu_matmul="auto"``, ``runtime/cpu_matmul.py``);
``--pytorch-products`` adds each run with PyTorch's own kernel (MKL), as the peer's.

The floor column (LoRA runs and the peer) is the time of the matrix products
the epoch cannot avoid at this CPU's measured float32 matmul rate (the faster
of PyTorch's ``torch.mm`` and oneDNN: what the CPU can do), as in
``bench/sst2_epochs.py``: every block's forward over the unpadded tokens,
plus one forward's worth of backward per adapted block; our cut last block
counts its q/k/v projections and attention at every position, the rest at one.

``--eval-every N`` evaluates every run on the validation set every N steps
(the peer through the ``Trainer``'s own ``eval_steps``) and reports the
training seconds each run took to first reach the grouped peer's final
accuracy of the same seed and precision; evaluation time is excluded on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sst2_epochs  # noqa: E402
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


class Curve:
    """Validation accuracy against training seconds, with the time spent evaluating taken out."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.evaluating = 0.0
        self.points: list[tuple[float, float]] = []  # (training seconds, accuracy)

    def timed_eval(self, run: Callable[[], float]) -> None:
        began = time.perf_counter()
        accuracy = run()
        self.points.append((began - self.start - self.evaluating, accuracy))
        self.evaluating += time.perf_counter() - began

    def training_seconds(self) -> float:
        return time.perf_counter() - self.start - self.evaluating


@contextlib.contextmanager
def adapterkit_curve(curve: Curve) -> Iterator[None]:
    """Time each of ``ak.train``'s evaluations (and the checkpoint bookkeeping that goes with it)."""
    from adapterkit.train import loop

    real = loop.evaluate_and_checkpoint

    def timed(tokenizer, prepared, eval_data, config, state, *rest):  # noqa: ANN001, ANN202
        curve.timed_eval(lambda: (real(tokenizer, prepared, eval_data, config, state, *rest),
                                  state.history[-1]["accuracy"])[1])

    loop.evaluate_and_checkpoint = timed
    try:
        yield
    finally:
        loop.evaluate_and_checkpoint = real


def run_adapterkit(method: str, train_rows: list[dict], val_rows: list[dict], seed: int,
                   precision: str = "fp32", quantize: str | None = None, adapter_layers: str | None = None,
                   eval_every: int | None = None, trim: bool = True, hashed: bool = True,
                   cpu_matmul: str = "auto") -> dict:
    factory, lr = METHODS[method]
    torch.manual_seed(seed)  # the new classification head: the same initial weights in every run of this seed
    model, tokenizer = ak.load_model("minilm", task="classification", labels=["0", "1"], quantize=quantize)
    config = factory()
    if config is not None:
        ak.add_adapter(model, "sst2", config)
    train_data = ak.load_data(train_rows, text_column="sentence", label_column="label")
    val_data = ak.load_data(val_rows, text_column="sentence", label_column="label", labels=train_data.labels)
    curve = Curve()
    with adapterkit_curve(curve) if eval_every else contextlib.nullcontext():
        ak.train(model, tokenizer, train_data, val_data if eval_every else None, ak.TrainConfig(
            epochs=1, batch_size=BATCH, lr=lr, max_length=MAX_LENGTH, seed=seed, progress=False,
            num_threads=torch.get_num_threads(), precision=precision, adapter_layers=adapter_layers,
            eval_every=eval_every, load_best=False, trim_last_block=trim,
            hashed_dropout=hashed, cpu_matmul=cpu_matmul))
    seconds = curve.training_seconds()
    summary = ak.trainable_summary(model)  # after training: --adapter-layers removes the lower blocks' weights
    accuracy = ak.evaluate(model, tokenizer, val_data, precision=precision)["accuracy"]
    size = 0
    if config is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ak.save_adapter(model, "sst2", tmp)
            size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {"accuracy": accuracy, "seconds": seconds, "percent": summary["percent"], "bytes": size,
            "curve": curve.points}


PEER_SAMPLING = {"grouped": "group_by_length", "random": "random"}


def run_peft_trainer(train_rows: list[dict], val_rows: list[dict], seed: int, sampling: str = "grouped",
                     precision: str = "fp32", eval_every: int | None = None) -> dict:
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
                              Trainer, TrainerCallback, TrainingArguments)

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

    curve = Curve()

    class Timed(TrainerCallback):
        """The Trainer evaluates right after ``on_step_end``; ``on_evaluate`` follows it."""

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.began = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001, ANN201
            curve.points.append((self.began - curve.start - curve.evaluating, metrics["eval_accuracy"]))
            curve.evaluating += time.perf_counter() - self.began

    def accuracy_of(prediction) -> dict:  # noqa: ANN001
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    with tempfile.TemporaryDirectory() as tmp:
        curve.start = time.perf_counter()
        evaluation = {"eval_strategy": "steps", "eval_steps": eval_every} if eval_every else {}
        args = TrainingArguments(output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=BATCH,
                                 learning_rate=1e-3, seed=seed, report_to=[], save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, use_cpu=True, warmup_steps=0.06,
                                 train_sampling_strategy=PEER_SAMPLING[sampling], bf16=precision == "bf16",
                                 **evaluation)
        validation = encode(val_rows)
        trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows),
                          eval_dataset=validation if eval_every else None, compute_metrics=accuracy_of,
                          data_collator=DataCollatorWithPadding(tokenizer), callbacks=[Timed()])
        trainer.train()
        seconds = curve.training_seconds()
        predictions = trainer.predict(validation)
    return {"accuracy": accuracy_of(predictions)["accuracy"], "seconds": seconds, "curve": curve.points}


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
    parser.add_argument("--untrimmed", action="store_true",
                        help="also train each adapterkit run with every position of the last block computed "
                             "(TrainConfig(trim_last_block=False)), to measure that lever alone")
    parser.add_argument("--torch-dropout", action="store_true",
                        help="also train each adapterkit run with PyTorch's dropout masks "
                             "(TrainConfig(hashed_dropout=False)), to measure that lever alone")
    parser.add_argument("--pytorch-products", action="store_true",
                        help="also train each adapterkit run with PyTorch's own kernel for the frozen products "
                             "(TrainConfig(cpu_matmul='default')), to measure the oneDNN lever alone")
    parser.add_argument("--eval-every", type=int, default=None, metavar="N",
                        help="evaluate every N steps and report the seconds to reach the grouped peer's accuracy")
    args = parser.parse_args()
    print(common.machine())
    rate = sst2_epochs.measured_rates()
    val_rows = read_sst2("validation.tsv", None, 0)
    tokens: dict[int, tuple[int, float]] = {}  # seed -> (unpadded training tokens, mean length)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        train_rows = read_sst2("train.tsv", args.train_size, seed)
        tokens[seed] = unpadded_tokens(train_rows)
        print(f"seed {seed}: {len(train_rows)} training sentences, {tokens[seed][0]} tokens", flush=True)
        for sampling in [] if args.skip_peft else args.peer_sampling:
            for precision in [p for p in args.precisions if p in ("fp32", "bf16")]:
                peer = f"peft lora + Trainer ({sampling})" + ("" if precision == "fp32" else f" {precision}")
                results.setdefault(peer, []).append(run_peft_trainer(train_rows, val_rows, seed, sampling, precision,
                                                                         args.eval_every))
                results[peer][-1].update(seed=seed, precision=precision)
                print(peer, results[peer][-1], flush=True)
        for method in args.methods:
            for precision in args.precisions:
                for scheme in args.quantize:
                    name = method if args.precisions == ["fp32"] else f"{method} {precision}"
                    name += "" if scheme == "none" else f" on {scheme} base"
                    quantize = None if scheme == "none" else scheme
                    variants = [("", True, True, "auto")] + [(" untrimmed", False, True, "auto")] * args.untrimmed
                    variants += [(" torch dropout", True, False, "auto")] * args.torch_dropout
                    variants += [(" pytorch products", True, True, "default")] * args.pytorch_products
                    runs = [(layers, v) for layers in [None, *args.adapter_layers] for v in variants]
                    for layers, (suffix, trim, hashed, products) in runs:
                        label = (name if layers is None else f"{name} {layers}") + suffix
                        results.setdefault(label, []).append(
                            run_adapterkit(method, train_rows, val_rows, seed, precision, quantize, layers,
                                           args.eval_every, trim, hashed, products))
                        results[label][-1].update(seed=seed, precision=precision)
                        print(label, results[label][-1], flush=True)
    full = statistics.mean(r["accuracy"] for r in results.get("full", [{"accuracy": float("nan")}]))
    peer_runs = results.get("peft lora + Trainer (grouped)")
    peer_seconds = statistics.mean(r["seconds"] for r in peer_runs) if peer_runs else None
    rows = []
    for name, runs in results.items():
        seconds = statistics.mean(r["seconds"] for r in runs)
        floor = floor_seconds(name, runs, tokens, rate)
        acc = [r["accuracy"] * 100 for r in runs]
        rows.append([name, f"{statistics.mean(acc):.2f}" + (f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""),
                     f"{statistics.mean(acc) - full * 100:+.2f}",
                     f"{runs[0].get('percent', float('nan')):.3f}" if "percent" in runs[0] else "-",
                     f"{runs[0]['bytes'] / 1024:.0f}" if runs[0].get("bytes") else "-",
                     f"{seconds:.0f}", f"{seconds / peer_seconds:.2f}" if peer_seconds else "-",
                     "-" if floor is None else f"{floor:.1f}", "-" if floor is None else f"{seconds / floor:.1f}"])
    print(common.table(["run", "val accuracy %", "vs full FT (points)", "trainable %", "adapter KiB",
                        "train seconds", "time vs PEFT grouped", "matmul floor s", "x floor"], rows))
    if args.eval_every:
        print(time_to_peer_accuracy(results))


def unpadded_tokens(rows: list[dict]) -> tuple[int, float]:
    """Training tokens as MiniLM's tokenizer cuts them at the benchmark's length, and tokens per sentence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.minilm_dir())
    lengths = [len(ids) for ids in tokenizer([r["sentence"] for r in rows], truncation=True,
                                             max_length=MAX_LENGTH)["input_ids"]]
    return sum(lengths), sum(lengths) / len(lengths)


def floor_seconds(name: str, runs: list[dict], tokens: dict[int, tuple[int, float]], rate: float) -> float | None:
    """Mean matmul floor of these runs: six block forwards plus one backward per adapted block.

    Our runs cut the last block to the position the classifier reads, except
    the ``untrimmed`` rows; the peer runs every position.

    Only for LoRA on query/value (ours and the peer's) in float32 on a float base: the rate is float32's.
    """
    lora_qv = name.startswith(("lora", "peft lora")) and not name.startswith("lora-all") and " base" not in name
    if not lora_qv or any(r["precision"] != "fp32" for r in runs):
        return None
    adapted = int(name.rsplit("top:", 1)[1].split()[0]) if "top:" in name else 6
    trimmed = not name.startswith("peft") and "untrimmed" not in name
    return statistics.mean(sst2_epochs.epoch_flops(*tokens[r["seed"]], 6, adapted, trimmed) / rate for r in runs)


def time_to_peer_accuracy(results: dict[str, list[dict]]) -> str:
    """Per run and seed: training seconds to first reach the grouped peer's final accuracy (same seed, precision)."""
    peers = {(r["seed"], r["precision"]): r for name, runs in results.items()
             if name.startswith("peft lora + Trainer (grouped)") for r in runs}
    rows = []
    for name, runs in results.items():
        for r in runs:
            peer = peers.get((r["seed"], r["precision"]))
            if peer is None:
                continue
            reached = next((t for t, acc in r["curve"] if acc >= peer["accuracy"] - 1e-9), None)
            rows.append([name, r["seed"], f"{peer['accuracy'] * 100:.2f}", f"{r['accuracy'] * 100:.2f}",
                         " ".join(f"{acc * 100:.1f}" for _, acc in r["curve"]),
                         "never" if reached is None else f"{reached:.1f}", f"{r['seconds']:.1f}",
                         "-" if reached is None else f"{reached / peer['seconds']:.2f}"])
    return common.table(["run", "seed", "peer's final %", "final %", "accuracy at each evaluation %",
                         "s to peer's final", "epoch s", "vs peer's epoch"], rows)


if __name__ == "__main__":
    main()
