"""Seconds per problem of the generated metrics: GSM8K exact match on SmolLM2-135M.

    python bench/gsm8k_generation.py [--problems 120] [--before /tmp/old-checkout] [--repeats 1]

Times ``adapterkit evaluate --model smollm2-135m --task causal-lm --data <N problems> --json``
(greedy generation, each answer's budget from its reference) in a fresh process, for this
checkout and, with ``--before``, for another checkout of the project (an older commit, made
with ``git worktree add``), taking turns. The problems are the first N of the GSM8K file
named in ``../shared/datasets/SOURCES.md``, written to a temporary file outside the project.
Prints the CPU (``lscpu``), the load average around each run (other processes on the
machine slow every figure), seconds per problem and the exact match each run measured.

Measured 2026-12-02 on a quiet AMD EPYC VM with 2 CPUs, OMP_NUM_THREADS=2, the first 120
problems of the GSM8K training file (the only GSM8K split stored), ``--before`` a worktree
of commit 1c3b8cf: before 375 s (3.13 s a problem), after 205 s (1.71 s a problem), model
load included. A busy machine slows two-thread decoding many times over (the same
"before" took 1148 s while another evaluation shared the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "datasets" / "gsm8k" / "train.jsonl"


def cpu_model() -> str:
    """``lscpu``'s model name and CPU count."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def problems_file(source: Path, count: int, folder: Path) -> Path:
    """The first ``count`` problems of ``source`` as a JSONL file in ``folder``."""
    lines = source.read_text().splitlines()[:count]
    if len(lines) < count:
        raise SystemExit(f"{source} has only {len(lines)} problems")
    path = folder / f"gsm8k_{count}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def time_evaluate(checkout: Path, data: Path, threads: int) -> dict:
    """Wall time and metrics of one ``adapterkit evaluate`` run of ``checkout``'s code."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "adapterkit.cli.main", "evaluate", "--model", "smollm2-135m",
               "--task", "causal-lm", "--data", str(data), "--json"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=checkout)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{checkout}: evaluate failed:\n{out.stderr[-2000:]}")
    metrics = json.loads(out.stdout)
    return {"seconds": seconds, "load_before": load, "load_after": os.getloadavg()[0],
            "exact_match": metrics.get("exact_match"), "perplexity": metrics.get("perplexity")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=120)
    parser.add_argument("--before", type=Path, help="another checkout of the project to time first")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--gsm8k", type=Path, default=GSM8K)
    args = parser.parse_args()
    checkouts = {"before": args.before, "after": ROOT} if args.before else {"after": ROOT}
    print(f"CPU: {cpu_model()}; OMP_NUM_THREADS={args.threads}; {args.problems} problems of {args.gsm8k}")
    with tempfile.TemporaryDirectory() as folder:
        data = problems_file(args.gsm8k, args.problems, Path(folder))
        # the first load converts the packaged GGUF once; keep that out of the timings
        subprocess.run([sys.executable, "-c", "import adapterkit as ak; ak.load_model('smollm2-135m', task='causal-lm')"],
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True)
        for repeat in range(args.repeats):
            for label, checkout in checkouts.items():
                run = time_evaluate(checkout, data, args.threads)
                print(f"{label:<7} run {repeat + 1}: {run['seconds']:7.1f} s, {run['seconds'] / args.problems:.2f} s "
                      f"a problem (load average {run['load_before']:.2f} -> {run['load_after']:.2f}); exact match "
                      f"{run['exact_match']:.4f}, perplexity {run['perplexity']:.4f}", flush=True)


if __name__ == "__main__":
    main()
