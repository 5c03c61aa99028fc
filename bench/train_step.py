"""Training-step throughput and peak memory: adapterkit vs PEFT vs full fine-tuning.

    python bench/train_step.py [--repeats 5] [--seq 64 128] [--precision fp32 bf16] [--gradient-checkpointing]
                               [--smollm]

For each configuration both libraries wrap the same freshly loaded model with
the same modules (PEFT gets the exact module paths adapterkit resolved), train
with AdamW on the same batch, and take turns; tokens/s are medians. Our
classifier steps cut the last block to the position the head reads, and every
step draws dropout masks from a hash (``runtime/hashed_dropout.py``), as
``ak.train`` does by default (``tasks/head_reads.py``); the "every position
computed" column times the same adapterkit model without the cut, the "torch's
dropout masks" column without the hashed masks. The frozen float32 products go
through oneDNN where ``ak.train``'s ``cpu_matmul="auto"`` sends them
(``runtime/cpu_matmul.py``: AMD CPUs); the "PyTorch's products" column times
our model with PyTorch's own kernel (MKL) for them, as the peer runs. Peak RSS
is the median over fresh processes per (configuration, library).

``--precision fp32 bf16`` measures each configuration at each precision
(bf16: autocast on the CPU, where it has AVX512-BF16/AMX; both libraries the
same way). ``--gradient-checkpointing`` adds rows with activation
checkpointing on: adapterkit's ``--gradient-checkpointing`` (non-reentrant)
against PEFT with transformers' ``gradient_checkpointing_enable`` and
``use_reentrant=False``, the setting PEFT documents for adapters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.core.layers import AdapterLayer  # noqa: E402
from adapterkit.runtime.cpu_matmul import resolve_cpu_matmul, use_onednn_linear  # noqa: E402

METHODS = ("lora-qv", "lora-all", "ia3", "full")


def our_config(method: str, kind: str) -> ak.AdapterConfig:
    if method == "lora-qv":
        targets = ["query", "value"] if kind == "minilm" else ["q_proj", "k_proj", "v_proj", "o_proj"]
        return ak.LoraConfig(rank=8, alpha=16, targets=targets)
    if method == "lora-all":
        return ak.LoraConfig(rank=8, alpha=16, targets="all-linear")
    if method == "ia3":
        return ak.IA3Config()
    raise ValueError(method)


def build(kind: str, method: str, library: str, batch: int, seq: int,
          checkpointing: bool = False) -> tuple[torch.nn.Module, dict]:
    """A model ready to train with ``library`` and a fixed batch."""
    torch.manual_seed(0)
    if kind == "minilm":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(common.minilm_dir(), num_labels=2)
        vocab = model.config.vocab_size
        labels = torch.randint(0, 2, (batch,))
    else:
        from adapterkit.models import load_model

        model, _ = load_model("smollm2-135m", task="causal-lm")
        vocab = model.config.vocab_size
        labels = None
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": labels if labels is not None else ids.clone()}
    if method == "full":
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train(), inputs
    config = our_config(method, kind)
    ak.add_adapter(model, "bench", config)
    if library.startswith("adapterkit"):
        if checkpointing:
            from adapterkit.train.memory import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        return model.train(), inputs
    # PEFT on a fresh copy of the base, told exactly which modules adapterkit wrapped
    paths = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and m.method != "head"]
    peft_model = peft_wrap(kind, method, paths, model)
    if checkpointing:
        peft_model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model.train(), inputs


def peft_wrap(kind: str, method: str, paths: list[str], ours: torch.nn.Module) -> torch.nn.Module:
    import peft

    base = ak.unload(ours)
    task = "SEQ_CLS" if kind == "minilm" else "CAUSAL_LM"
    if method.startswith("lora"):
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=paths, task_type=task)
    else:
        ffn = [p for p in paths if p.endswith("output.dense") and "attention" not in p or p.endswith("down_proj")]
        config = peft.IA3Config(target_modules=paths, feedforward_modules=ffn, task_type=task)
    return peft.get_peft_model(base, config)


def stepper(model: torch.nn.Module, inputs: dict, bf16: bool, library: str = "adapterkit") -> Callable[[], None]:
    """One training step as each library's trainer takes it (adapterkit's causal-LM loss is chunked, and
    a classifier's last block is cut to the position its head reads, and dropout masks are hashed, as
    ``ak.train`` does by default; ``adapterkit whole`` is the same model with every position computed,
    ``adapterkit torch-dropout`` the same with PyTorch's dropout masks, ``adapterkit mkl`` the same with
    PyTorch's own kernel for the frozen products wherever ``cpu_matmul="auto"`` would pick oneDNN; gated MLPs
    keep two activations, not three, as in ``ak.train``)."""
    from adapterkit.runtime.gated_mlp import use_fused_gated_mlp
    from adapterkit.runtime.hashed_dropout import use_hashed_dropout
    from adapterkit.tasks.head_reads import first_position_only
    from adapterkit.tasks.lm_loss import chunked_lm_loss, uses_chunked_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ours = library.startswith("adapterkit")
    chunked = ours and uses_chunked_lm_loss(model)  # False for classifiers: no output embedding
    cut, hashed = ours and library != "adapterkit whole", ours and library != "adapterkit torch-dropout"
    onednn = ours and library != "adapterkit mkl" and not bf16 and resolve_cpu_matmul("auto")
    without_labels = {k: v for k, v in inputs.items() if k != "labels"}

    def step() -> None:
        with first_position_only(model) if cut else contextlib.nullcontext(), \
                use_hashed_dropout(model) if hashed else contextlib.nullcontext(), \
                use_onednn_linear(model, onednn), \
                use_fused_gated_mlp(model) if ours else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = chunked_lm_loss(model, without_labels, inputs["labels"]) if chunked else model(**inputs).loss
            loss.backward()  # within the contexts, as in ak.train: checkpointing recomputes blocks in them
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker(kind: str, method: str, library: str, batch: int, seq: int, bf16: bool, checkpointing: bool) -> None:
    """Fresh-process memory measurement: peak RSS over three training steps."""
    model, inputs = build(kind, method, library, batch, seq, checkpointing)
    step = stepper(model, inputs, bf16, library)
    with common.PeakRSS() as rss:
        for _ in range(3):
            step()
    print(json.dumps({"peak_rss_mib": rss.peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="precisions to measure (bf16: CPU autocast)")
    parser.add_argument("--bf16", action="store_true", help="same as --precision fp32 bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="also measure with activation checkpointing on")
    parser.add_argument("--smollm", action="store_true", help="also run SmolLM2-135M, batch 8, length 256")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-runs", type=int, default=3, help="fresh processes per library for peak RSS (median)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, method, library, batch, seq, bf16, checkpointing = args.worker
        worker(kind, method, library, int(batch), int(seq), bf16 == "1", checkpointing == "1")
        return
    torch.set_num_threads(torch.get_num_threads())
    print(common.machine())
    precisions = [p == "bf16" for p in (["fp32", "bf16"] if args.bf16 else args.precision)]
    if any(precisions) and not common.bf16_supported():
        print("note: this CPU has no native bf16 (avx512_bf16/amx_bf16); bf16 rows run emulated")
    checkpointing_options = [False, True] if args.gradient_checkpointing else [False]
    jobs = [("minilm", m, 32, s) for s in args.seq for m in args.methods]
    if args.smollm:
        jobs.append(("smollm2-135m", "lora-qv", 8, 256))
    rows = []
    settings = [(bf16, ckpt) for bf16 in precisions for ckpt in checkpointing_options]
    for kind, method, batch, seq in jobs:
        for bf16, ckpt in settings:
            libraries = ["full"] if method == "full" else ["adapterkit", "peft"]
            timed = libraries + (["adapterkit whole"] if kind == "minilm" and method != "full" else [])
            timed += ["adapterkit torch-dropout"] if method != "full" else []
            products = method != "full" and not bf16 and resolve_cpu_matmul("auto")
            timed += ["adapterkit mkl"] if products else []
            steps = {lib: stepper(*build(kind, method, lib, batch, seq, ckpt), bf16, lib) for lib in timed}
            seconds = common.interleaved(steps, args.repeats)
            tps = {lib: batch * seq / s for lib, s in seconds.items()}
            mem = {}
            if not args.no_memory:
                flag = "1" if bf16 else "0"
                samples: dict[str, list[float]] = {lib: [] for lib in libraries}
                for _ in range(args.memory_runs):  # RSS moves by ~50 MiB between processes: median
                    for lib in libraries:
                        worker_args = ["--worker", kind, method, lib, str(batch), str(seq), flag,
                                       "1" if ckpt else "0"]
                        samples[lib].append(common.run_isolated(__file__, worker_args)["peak_rss_mib"])
                mem = {lib: statistics.median(v) for lib, v in samples.items()}
            label = f"{kind} {method} b{batch} L{seq} {'bf16' if bf16 else 'fp32'}{' ckpt' if ckpt else ''}"
            whole = f"{tps['adapterkit whole'] / tps['peft']:.3f}" if "adapterkit whole" in tps else "-"
            torch_masks = f"{tps['adapterkit torch-dropout'] / tps['peft']:.3f}" if method != "full" else "-"
            mkl = f"{tps['adapterkit mkl'] / tps['peft']:.3f}" if "adapterkit mkl" in tps else "-"
            if method == "full":
                rows.append([label, f"{tps['full']:.0f}", "-", "-", "-", "-", "-",
                             f"{mem['full']:.0f}" if mem else "-", "-", "-"])
            else:
                rows.append([label, f"{tps['adapterkit']:.0f}", f"{tps['peft']:.0f}",
                             f"{tps['adapterkit'] / tps['peft']:.3f}", whole, torch_masks, mkl,
                             f"{mem['adapterkit']:.0f}" if mem else "-", f"{mem['peft']:.0f}" if mem else "-",
                             f"{mem['adapterkit'] / mem['peft']:.3f}" if mem else "-"])
            print(rows[-1], flush=True)
    print(common.table(["config", "adapterkit tok/s", "peft tok/s", "speed ratio (ak/peft)",
                        "every position computed (ak/peft)", "torch's dropout masks (ak/peft)",
                        "PyTorch's products (ak/peft)",
                        "adapterkit peak RSS MiB", "peft peak RSS MiB",
                        "memory ratio (ak/peft)"], rows))


if __name__ == "__main__":
    main()
