"""LoRA on a quantised frozen base: peak training memory and speed against PEFT + bitsandbytes, and load time.

    python bench/quantized.py [--schemes fp32 int8 nf4] [--steps 4] [--skip-peft] [--checkpointing off|on|both]
                              [--cpu-allocators default lean] [--thp] [--paired N]

SmolLM2-135M causal LM, LoRA r8 on q/k/v/o, batch 8, length 256, AdamW, the
same random batch for every run. Each (scheme, library) runs in a fresh
process: peak RSS over the training steps, and tokens/s as the median step
after one warm-up step. adapterkit quantises with ``load_model(...,
quantize=...)`` (int8: torchao; nf4: bitsandbytes with double quantisation);
PEFT gets transformers' ``BitsAndBytesConfig`` (4-bit nf4 with double
quantisation and float32 compute; 8-bit LLM.int8 for int8), the setting its
QLoRA guide documents; ``prepare_model_for_kbit_training`` is left out (it
casts norms to float32, which they already are, and turns checkpointing on,
which the checkpointing rows do explicitly). Every configuration runs without
and with gradient checkpointing (adapterkit: ``--gradient-checkpointing``,
blocks plus the chunked causal-LM loss; PEFT: transformers' non-reentrant
checkpointing). Memory is reported as the whole process's peak RSS and as the
peak above the RSS once torch, transformers, PEFT and the backends are
imported (what training itself adds); the last column is that peak while
loading (and quantising) alone. ``--cpu-allocators default lean``
adds adapterkit rows trained with ``TrainConfig.cpu_allocator="lean"``
(glibc returns freed blocks of 1 MiB or more at once; PEFT's rows keep the
C library's default, as its documentation does). ``--thp`` repeats every row
in a process started with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's own switch:
its CPU allocator page-aligns every block and asks the kernel for
transparent huge pages on blocks of 2 MiB or more; it is read once, before
the first allocation, so it can only be set for a whole process). Goals: nf4
peak memory <= 0.45x float32's, int8 <= 0.65x; tokens/s >= PEFT's at the same
scheme.

The speed of a shared 2-core machine drifts by 10-20% between processes and
over minutes, more than the differences measured here. ``--paired N`` adds a
second speed measurement that this drift cannot bias: for each scheme and
checkpointing setting, one process builds both libraries' models and times N
rounds of one step each, alternating which goes first; the table gives the
median of the per-round ratios and their range. Memory is only measured in
the isolated runs (two models in one process share a heap).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

BATCH, LENGTH = 8, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(scheme: str, library: str, checkpointing: bool) -> tuple[torch.nn.Module, float]:
    """The model ready to train and the seconds its loading (and quantising) took."""
    start = time.perf_counter()
    if library == "adapterkit":
        import adapterkit as ak

        model, _ = ak.load_model("smollm2-135m", task="causal-lm", quantize=None if scheme == "fp32" else scheme)
        loaded = time.perf_counter() - start
        ak.add_adapter(model, "bench", ak.LoraConfig(rank=8, alpha=16, targets=TARGETS))
        if checkpointing:  # what --gradient-checkpointing does: the blocks, and the loss in chunks
            from adapterkit.train.memory import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        return model.train(), loaded
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from adapterkit.models.aliases import resolve_model_path

    quantization = None
    if scheme == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    elif scheme == "int8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m"), local_files_only=True,
                                                 quantization_config=quantization, device_map="cpu",
                                                 dtype=torch.float32)
    loaded = time.perf_counter() - start
    if checkpointing:  # PEFT's documented route: transformers' checkpointing, non-reentrant
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))
    return model.train(), loaded


def loss(model: torch.nn.Module, ids: torch.Tensor, library: str) -> torch.Tensor:
    """The training loss as each library computes it: adapterkit's causal-LM task (chunked), PEFT's model."""
    from adapterkit.tasks.lm_loss import chunked_lm_loss, uses_chunked_lm_loss

    if library == "adapterkit" and uses_chunked_lm_loss(model):
        return chunked_lm_loss(model, {"input_ids": ids}, ids)
    return model(input_ids=ids, labels=ids).loss


def backward(model: torch.nn.Module, ids: torch.Tensor, library: str) -> None:
    """One forward and backward; ours in the contexts ``ak.train`` holds for the whole run: the frozen products
    where ``cpu_matmul="auto"`` puts them (oneDNN on AMD CPUs; ``$ADAPTERKIT_CPU_MATMUL=default`` for PyTorch's
    own) and the gated MLPs keeping two activations, not three (``runtime/gated_mlp.py``)."""
    from adapterkit.runtime.cpu_matmul import resolve_cpu_matmul, use_onednn_linear
    from adapterkit.runtime.gated_mlp import use_fused_gated_mlp

    ours = library == "adapterkit"
    with use_onednn_linear(model, ours and resolve_cpu_matmul("auto")), \
            use_fused_gated_mlp(model) if ours else contextlib.nullcontext():
        loss(model, ids, library).backward()


def worker(scheme: str, library: str, steps: int, checkpointing: bool, allocator: str) -> None:
    import bitsandbytes  # noqa: F401  every library imported first: the baseline holds them all
    import peft  # noqa: F401
    import torchao  # noqa: F401

    import adapterkit  # noqa: F401
    from adapterkit.runtime.allocator import apply_cpu_allocator

    apply_cpu_allocator(allocator)  # what the training loop does with TrainConfig.cpu_allocator

    torch.manual_seed(0)
    before = common.PeakRSS.current()  # torch, transformers and the backends imported
    with common.PeakRSS() as rss:
        with common.PeakRSS() as load_rss:  # loading (and quantising) alone: where a quantised row's peak was
            model, loaded = build(scheme, library, checkpointing)
        ids = torch.randint(5, model.config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            backward(model, ids, library)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    print(json.dumps({"peak_rss_mib": rss.peak, "above_imports_mib": rss.peak - before,
                      "load_above_imports_mib": load_rss.peak - before,
                      "tokens_per_s": BATCH * LENGTH / statistics.median(times[1:]),
                      "load_s": loaded}))


def paired_worker(scheme: str, steps: int, checkpointing: bool) -> None:
    """Both libraries' models in this process, one step each per round, alternating which goes first."""
    torch.manual_seed(0)
    step = {}
    for library in ("adapterkit", "peft"):
        model, _ = build(scheme, library, checkpointing)
        ids = torch.randint(5, model.config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def one_step(model=model, optimizer=optimizer, library=library, ids=ids) -> None:
            backward(model, ids, library)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        one_step()  # warm-up
        step[library] = one_step
    seconds: dict[str, list[float]] = {"adapterkit": [], "peft": []}
    for round_ in range(steps):
        for library in (("adapterkit", "peft") if round_ % 2 == 0 else ("peft", "adapterkit")):
            start = time.perf_counter()
            step[library]()
            seconds[library].append(time.perf_counter() - start)
    ratios = [p / a for a, p in zip(seconds["adapterkit"], seconds["peft"])]
    print(json.dumps({"ratios": ratios, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                      "ratio_max": max(ratios),
                      **{f"{k}_tokens_per_s": BATCH * LENGTH / statistics.median(v) for k, v in seconds.items()}}))


def _failure(err: Exception) -> str:
    """The last line a failed worker wrote (its error), shortened for a table cell."""
    text = (getattr(err, "stderr", None) or str(err)).strip().splitlines() or ["failed"]
    return text[-1][:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", nargs="+", default=["fp32", "int8", "nf4"], choices=["fp32", "int8", "nf4"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                        help="gradient checkpointing (adapterkit: blocks + chunked loss; PEFT: transformers')")
    parser.add_argument("--cpu-allocators", nargs="+", default=["default"], choices=["default", "lean"],
                        help="adapterkit rows with each TrainConfig.cpu_allocator (PEFT keeps the default)")
    parser.add_argument("--thp", action="store_true",
                        help="repeat every row with PyTorch's THP_MEM_ALLOC_ENABLE=1 (transparent huge pages)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="also time N alternating rounds of both libraries in one process per scheme")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--paired-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3] == "on", args.worker[4])
        return
    if args.paired_worker:
        paired_worker(args.paired_worker[0], int(args.paired_worker[1]), args.paired_worker[2] == "on")
        return
    print(common.machine())
    libraries = [f"adapterkit/{a}" for a in args.cpu_allocators] + ([] if args.skip_peft else ["peft/default"])
    if args.thp:
        libraries += [f"{library}+thp" for library in libraries]
    settings = ["off", "on"] if args.checkpointing == "both" else [args.checkpointing]
    results: dict[tuple[str, str, str], dict] = {}
    for ckpt in settings:
        for scheme in args.schemes:
            for library in libraries:
                key = (scheme, library, ckpt)
                name, allocator = library.split("/")
                thp = {"THP_MEM_ALLOC_ENABLE": "1"} if allocator.endswith("+thp") else None
                try:
                    results[key] = common.run_isolated(__file__, ["--worker", scheme, name, str(args.steps), ckpt,
                                                                  allocator.removesuffix("+thp")], env=thp)
                except Exception as err:  # a peer that cannot run this scheme here is reported, not fatal
                    results[key] = {"error": _failure(err)}
                print(key, results[key], flush=True)
    base_library = libraries[0]  # adapterkit with the first allocator named (the default unless told)
    plain_base = results.get(("fp32", base_library, "off"), {})
    rows = []
    for (scheme, library, ckpt), r in results.items():
        if "error" in r:
            rows.append([ckpt, scheme, library] + ["-"] * 8 + [r["error"]])
            continue
        base = results.get(("fp32", library, ckpt), {})
        peer = results.get((scheme, "peft/default+thp" if library.endswith("+thp") else "peft/default", ckpt), {})
        ratio = lambda a, b, key: f"{a[key] / b[key]:.3f}" if key in b else "-"  # noqa: E731
        rows.append([ckpt, scheme, library, f"{r['peak_rss_mib']:.0f}", ratio(r, base, "peak_rss_mib"),
                     f"{r['above_imports_mib']:.0f}", ratio(r, base, "above_imports_mib"),
                     ratio(r, plain_base, "above_imports_mib"), f"{r['tokens_per_s']:.0f}",
                     ratio(r, peer, "tokens_per_s"), f"{r['load_s']:.1f}", f"{r['load_above_imports_mib']:.0f}"])
    print(common.table(["checkpointing", "scheme", "library/allocator", "peak RSS MiB",
                        "vs fp32, same row settings", "above imports MiB", "vs fp32, same row settings",
                        f"vs {base_library} fp32 no ckpt", "tokens/s", "vs PEFT same scheme", "load s",
                        "load peak above imports MiB"], rows))
    if args.paired and not args.skip_peft:
        print_paired(args.schemes, settings, args.paired)


def print_paired(schemes: list[str], settings: list[str], rounds: int) -> None:
    """The one-process, alternating speed comparison of ``--paired``, as a table."""
    rows = []
    for ckpt in settings:
        for scheme in schemes:
            try:
                r = common.run_isolated(__file__, ["--paired-worker", scheme, str(rounds), ckpt])
            except Exception as err:
                rows.append([ckpt, scheme, "-", "-", "-", _failure(err)])
                continue
            print((scheme, ckpt, "paired"), r, flush=True)
            rows.append([ckpt, scheme, f"{r['adapterkit_tokens_per_s']:.0f}", f"{r['peft_tokens_per_s']:.0f}",
                         f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})",
                         f"{sum(x >= 1 for x in r['ratios'])}/{len(r['ratios'])}"])
    print(f"\nSpeed in one process, {rounds} alternating rounds (default allocator on both sides):\n")
    print(common.table(["checkpointing", "scheme", "adapterkit tokens/s", "PEFT tokens/s",
                        "adapterkit vs PEFT, median of rounds (range)", "rounds at >= 1x"], rows))


if __name__ == "__main__":
    main()
