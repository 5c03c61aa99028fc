"""Two sentiment adapters, their average and their TIES merge, each tested on both test sets.

    python bench/merge_sentiment.py [--out /tmp/merge_sentiment] [--train-size 8000] [--steps 250]

Adapter ``sst2``: LoRA on MiniLM trained on a seeded sample of SST-2's train
split (``../shared/datasets/sst2``); adapter ``rt``: LoRA on MiniLM trained on
the built-in Rotten Tomatoes train split. Both use labels ``negative`` /
``positive`` so their heads line up. Then, on one base model:

- ``Average({"sst2": .5, "rt": .5})`` as a plan (outputs of both, weighted);
- ``merge_adapters(..., method="cat")`` (exact: the averaged update as one adapter);
- ``merge_adapters(..., method="ties", density=0.5)`` (TIES, factorised back to rank 8).

Each is evaluated on SST-2 validation (872 sentences) and on the Rotten
Tomatoes test split; the table printed is the one in docs/composition.md.
Trained adapters are kept in ``--out`` and reused on a second run.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

import adapterkit as ak  # noqa: E402

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "sst2"
LABELS = ["negative", "positive"]
MAX_LENGTH = 64


def sst2_rows(name: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    with open(SST2 / name, newline="", encoding="utf-8") as f:
        rows = [{"text": r["sentence"].strip(), "label": LABELS[int(r["label"])]}
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if limit is not None and limit < len(rows):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = [rows[i] for i in order[:limit]]
    return rows


def rt_rows(split: str) -> list[dict]:
    data = ak.load_data("rotten_tomatoes", split=split)
    names = {"fresh": "positive", "rotten": "negative"}
    return [{"text": e["text"], "label": names[data.labels[e["label"]]]} for e in data.examples]


def as_data(rows: list[dict]) -> object:
    return ak.load_data(rows, text_column="text", label_column="label", labels=LABELS)


def train_adapter(name: str, rows: list[dict], out: Path, steps: int) -> Path:
    folder = out / name
    if (folder / "adapter_model.safetensors").exists():
        print(f"{name}: reusing {folder}")
        return folder
    model, tokenizer = ak.load_model("minilm", task="classification", labels=LABELS)
    ak.add_adapter(model, name, ak.LoraConfig())
    start = time.perf_counter()
    ak.train(model, tokenizer, as_data(rows), None, ak.TrainConfig(
        max_steps=steps, batch_size=32, max_length=MAX_LENGTH, seed=0, progress=False))
    print(f"{name}: trained {steps} steps on {len(rows)} examples in {time.perf_counter() - start:.0f} s")
    ak.save_adapter(model, name, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/merge_sentiment"))
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args()
    print(common.machine())
    tests = {"SST-2 validation": as_data(sst2_rows("validation.tsv")), "Rotten Tomatoes test": as_data(rt_rows("test"))}
    folders = {
        "sst2": train_adapter("sst2", sst2_rows("train.tsv", args.train_size), args.out, args.steps),
        "rt": train_adapter("rt", rt_rows("train")[: args.train_size], args.out, args.steps),
    }
    model, tokenizer = ak.load_model("minilm", task="classification", labels=LABELS)
    for folder in folders.values():
        ak.load_adapter(model, folder)
    reports = {
        "cat": ak.merge_adapters(model, {"sst2": 0.5, "rt": 0.5}, "avg_cat", method="cat"),
        "ties": ak.merge_adapters(model, {"sst2": 0.5, "rt": 0.5}, "ties", method="ties", density=0.5),
    }
    for label, report in reports.items():
        print(f"merge {label}: {report}")
    candidates = {
        "sst2 adapter": "sst2",
        "rt adapter": "rt",
        "Average plan (0.5/0.5)": ak.Average({"sst2": 0.5, "rt": 0.5}),
        "merge cat (exact average, rank 16)": "avg_cat",
        "merge ties (density 0.5, rank 8)": "ties",
    }
    rows = []
    for label, plan in candidates.items():
        scores = []
        for data in tests.values():
            with ak.use(model, plan):
                scores.append(f"{ak.evaluate(model, tokenizer, data, max_length=MAX_LENGTH)['accuracy']:.3f}")
        rows.append([label, *scores])
    print(common.table(["adapter", *tests], rows))


if __name__ == "__main__":
    main()
