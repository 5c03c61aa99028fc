"""``adapterkit serve`` under load: batching across adapters against one-at-a-time and same-adapter servers.

    python bench/serve.py [--chats 64] [--adapters 16] [--new-tokens 32] [--classify 256] [--skip-scaling] [--scaling-rounds 3]

Each server is a real ``adapterkit serve`` process on 127.0.0.1; the load
generator is a bounded asyncio client (the official ``openai`` client for
chats; plain HTTP/1.1 over asyncio streams for ``/v1/classify``) in this process.

1. SmolLM2-135M with 16 LoRA adapters (rank 8 on q/k/v/o, random weights),
   64 concurrent chat requests spread over them, 32 new tokens each, greedy:
   total generated tokens/s and p50/p95 latency of three servers, the same
   code with ``--batching mixed`` (requests of any adapters share every
   decoding step), ``same-adapter`` (a batch holds one adapter's requests)
   and ``single`` (one request at a time, as a server around PEFT's
   ``set_adapter`` runs). Every reply is checked against offline generation
   of that prompt with that adapter.
2. MiniLM with 8 classification adapters, 256 concurrent ``/v1/classify``
   requests of one text each: requests/s batched (``--max-batch 64``)
   against one at a time (``--max-batch 1``); labels checked against offline
   ``predict``.
3. Adapter-count scaling: the mixed server with 64 adapters loaded, the same
   64 chats spread over 1, 16 and 64 of them, three bursts each, interleaved
   (the median burst is compared).
4. Memory: resident memory of a MiniLM server with one classification
   adapter, and with a classification, an NER and a QA adapter (three task
   models over one copy of the encoder weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

import adapterkit as ak  # noqa: E402

QUESTIONS = ["Name three primary colours.", "What is the capital of France?", "Give me a synonym for happy.",
             "How many legs does a spider have?", "Write a haiku about rain.", "What is 12 times 7?",
             "Explain what a noun is.", "Suggest a name for a cat.", "Why is the sky blue?",
             "List two kinds of fruit.", "What does a thermometer measure?", "Say hello in Spanish."]
REVIEWS = ["a gripping, beautifully acted film", "dull and far too long", "the best comedy of the year",
           "i walked out halfway through", "charming, if slight", "a mess from start to finish",
           "warm, funny and wise", "the plot makes no sense at all"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(model: torch.nn.Module, count: int, folder: Path, targets: list[str], seed: int = 0,
                  scale: float = 0.02) -> list[str]:
    """``count`` LoRA adapters with random (non-zero) weights saved under ``folder``; returns their names."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"a{i:02d}" for i in range(count)]
    for name in names:
        ak.add_adapter(model, name, ak.LoraConfig(rank=8, alpha=16, targets=targets))
        with torch.no_grad():
            for param in ak.adapter_parameters(model, name).values():
                param.add_(torch.randn(param.shape, generator=gen) * scale)
        ak.save_adapter(model, name, folder / name)
    return names


class ServerProcess:
    """``adapterkit serve`` in a child process, waited for until ``/health`` answers."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "adapterkit.cli.main", "serve", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)

    def __enter__(self) -> "ServerProcess":
        import httpx

        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not start within 10 minutes")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def chat_load(url: str, jobs: list[tuple[str, str]], new_tokens: int, limit: int) -> dict:
    """Send every (adapter, question) chat at once (at most ``limit`` in flight); texts, tokens, latencies."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    gate = asyncio.Semaphore(limit)

    async def one(adapter: str, question: str) -> tuple[str, int, float]:
        async with gate:
            started = time.perf_counter()
            reply = await client.chat.completions.create(
                model=adapter, messages=[{"role": "user", "content": question}], max_tokens=new_tokens,
                temperature=0)
            return reply.choices[0].message.content, reply.usage.completion_tokens, time.perf_counter() - started

    started = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(a, q) for a, q in jobs)), timeout=1800)
    wall = time.perf_counter() - started
    await client.close()
    tokens = sum(r[1] for r in results)
    latencies = [r[2] for r in results]
    return {"texts": [r[0] for r in results], "tokens": tokens, "wall": wall, "tokens_per_s": tokens / wall,
            "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)}


async def _post_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str,
                     payload: dict) -> dict:
    """One HTTP/1.1 POST on a kept-alive connection; the JSON body of a 200 answer."""
    body = json.dumps(payload).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    answer = await reader.readexactly(length)
    if status != 200:
        raise RuntimeError(f"{path} answered {status}: {answer[:300]!r}")
    return json.loads(answer)


async def classify_load(url: str, jobs: list[tuple[str, str]], limit: int, rounds: int = 1) -> dict:
    """Send every (adapter, text) request at once from ``limit`` workers, each on its own kept-alive connection.

    The connections are opened before the clock starts; then ``rounds``
    bursts of all the jobs run one after the other, and the median burst is
    reported (a burst of a few hundred requests takes well under a second).

    The workers speak HTTP/1.1 over asyncio streams directly: at a few hundred
    connections httpx's own cost per request grows (measured against a server
    that answers at once: 594 requests/s at 16 connections, 71 at 256), which
    would cap both servers at the client's speed.
    """
    host, port = url.removeprefix("http://").split(":")
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(min(limit, len(jobs)))]
    labels: list[str | None] = [None] * len(jobs)
    latencies: list[float] = [0.0] * len(jobs)

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, queue: asyncio.Queue) -> None:
        while not queue.empty():
            index, (adapter, text) = queue.get_nowait()
            started = time.perf_counter()
            answer = await _post_json(reader, writer, f"{host}:{port}", "/v1/classify",
                                      {"model": adapter, "input": [text]})
            labels[index] = answer["data"][0]["label"]
            latencies[index] = time.perf_counter() - started

    bursts = []
    try:
        for _ in range(rounds):
            queue: asyncio.Queue = asyncio.Queue()
            for index, job in enumerate(jobs):
                queue.put_nowait((index, job))
            started = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(worker(r, w, queue) for r, w in connections)), timeout=1800)
            bursts.append((time.perf_counter() - started, list(latencies)))
    finally:
        for _, writer in connections:
            writer.close()
    wall, latencies = sorted(bursts, key=lambda b: b[0])[len(bursts) // 2]
    return {"labels": labels, "wall": wall, "requests_per_s": len(jobs) / wall,
            "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)}


def offline_chats(model: torch.nn.Module, tokenizer, jobs: list[tuple[str, str]], new_tokens: int) -> list[str]:
    """What ``ak`` generates offline for each (adapter, question), one prompt at a time."""
    from adapterkit.evaluate.generation import generate_text
    from adapterkit.tasks.generation import GenerationOptions

    texts = []
    for adapter, question in jobs:
        with ak.use(model, adapter):
            texts += generate_text(model, tokenizer, [question], GenerationOptions(max_new_tokens=new_tokens))
    return texts


def bench_chats(args: argparse.Namespace, folder: Path) -> list[list[object]]:
    from adapterkit.models import load_model

    model, tokenizer = load_model("smollm2-135m", task="causal-lm")
    count = max(args.adapters, 64 if not args.skip_scaling else 0)
    names = make_adapters(model.eval(), count, folder, ["q_proj", "k_proj", "v_proj", "o_proj"])
    jobs = [(names[i % args.adapters], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.chats)]
    print(f"offline references for {len(jobs)} chats ...", flush=True)
    expected = offline_chats(model, tokenizer, jobs, args.new_tokens)
    rows: list[list[object]] = []
    results = {}
    for mode in ("mixed", "same-adapter", "single"):
        flags = ["--model", "smollm2-135m", "--batching", mode, "--max-batch", str(args.chats),
                 *[x for n in names[:args.adapters] for x in ("--adapter", f"{n}={folder / n}")]]
        with ServerProcess(flags) as server:
            asyncio.run(chat_load(server.url, jobs[:4], args.new_tokens, args.chats))  # warm-up
            result = asyncio.run(chat_load(server.url, jobs, args.new_tokens, args.chats))
        wrong = sum(a.strip() != b.strip() for a, b in zip(result["texts"], expected))
        results[mode] = result
        rows.append([mode, result["tokens"], f"{result['wall']:.1f}", f"{result['tokens_per_s']:.1f}",
                     f"{result['p50']:.2f}", f"{result['p95']:.2f}", f"{wrong}/{len(jobs)}"])
    mixed = results["mixed"]["tokens_per_s"]
    print(common.table(["batching", "tokens", "wall s", "tokens/s", "p50 s", "p95 s", "differ from offline"],
                       rows))
    print(f"mixed / single: {mixed / results['single']['tokens_per_s']:.2f}x (goal >= 5x); "
          f"mixed / same-adapter: {mixed / results['same-adapter']['tokens_per_s']:.2f}x (goal >= 2x)\n")
    if not args.skip_scaling:
        scaling = []
        flags = ["--model", "smollm2-135m", "--max-batch", str(args.chats),
                 *[x for n in names[:64] for x in ("--adapter", f"{n}={folder / n}")]]
        runs: dict[int, list[dict]] = {1: [], 16: [], 64: []}
        with ServerProcess(flags) as server:
            asyncio.run(chat_load(server.url, jobs[:4], args.new_tokens, args.chats))
            for _ in range(args.scaling_rounds):  # interleaved, so drifts of the machine hit every k alike
                for k in runs:
                    mix = [(names[i % k], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.chats)]
                    runs[k].append(asyncio.run(chat_load(server.url, mix, args.new_tokens, args.chats)))
        for k, results_k in runs.items():
            result = sorted(results_k, key=lambda r: r["tokens_per_s"])[len(results_k) // 2]  # the median burst
            scaling.append([k, f"{result['tokens_per_s']:.1f}", f"{result['p50']:.2f}", f"{result['p95']:.2f}",
                            " ".join(f"{r['tokens_per_s']:.0f}" for r in results_k)])
        print(common.table(["adapters in the mix", "tokens/s (median burst)", "p50 s", "p95 s", "every burst"],
                           scaling))
        speeds = [float(r[1]) for r in scaling]
        print(f"slowest / fastest: {min(speeds) / max(speeds):.2f} (goal: within 15%, >= 0.85)\n")
    return rows


def bench_classify(args: argparse.Namespace, folder: Path) -> None:
    from adapterkit.models import load_model

    labels = ["negative", "positive"]
    model, tokenizer = load_model("minilm", task="classification", labels=labels)
    names = make_adapters(model.eval(), 8, folder, ["query", "value"], seed=1, scale=0.05)
    gen = torch.Generator().manual_seed(2)
    for name in names:  # each adapter gets a random head of its own, so the adapters disagree
        with torch.no_grad():
            for key, param in ak.adapter_parameters(model, name).items():
                if "classifier" in key:
                    param.add_(torch.randn(param.shape, generator=gen))
        ak.save_adapter(model, name, folder / name)
    jobs = [(names[i % len(names)], REVIEWS[i % len(REVIEWS)]) for i in range(args.classify)]
    expected = []
    for adapter, text in jobs:
        with ak.use(model, adapter):
            expected.append(ak.predict(model, tokenizer, [text])[0][0])
    rows, speeds = [], {}
    for label, batch in (("batched (--max-batch 64)", 64), ("one at a time (--max-batch 1)", 1)):
        flags = ["--model", "minilm", "--max-batch", str(batch),
                 *[x for n in names for x in ("--adapter", f"{n}={folder / n}")]]
        with ServerProcess(flags) as server:
            asyncio.run(classify_load(server.url, jobs[:8], 8))
            result = asyncio.run(classify_load(server.url, jobs, args.classify, rounds=5))
        wrong = sum(a != b for a, b in zip(result["labels"], expected))
        speeds[batch] = result["requests_per_s"]
        rows.append([label, f"{result['wall']:.2f}", f"{result['requests_per_s']:.1f}", f"{result['p50']:.3f}",
                     f"{result['p95']:.3f}", f"{wrong}/{len(jobs)}"])
    print(common.table(["server", "median burst s", "requests/s", "p50 s", "p95 s", "differ from offline"], rows))
    print(f"batched / one at a time: {speeds[64] / speeds[1]:.2f}x (goal >= 5x)")


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def bench_memory(folder: Path) -> None:
    """Resident memory of a MiniLM server with one classification adapter, and with one adapter per task."""
    from adapterkit.models import load_model

    tasks = {"sentiment": ("classification", ["negative", "positive"]),
             "entities": ("token-classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]),
             "answers": ("question-answering", None)}
    for name, (task, labels) in tasks.items():
        model, _ = load_model("minilm", task=task, **({"labels": labels} if labels else {}))
        ak.add_adapter(model, name, ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
        ak.save_adapter(model, name, folder / name)
    rows, sizes = [], []
    for chosen in (["sentiment"], list(tasks)):
        flags = ["--model", "minilm", *[x for n in chosen for x in ("--adapter", f"{n}={folder / n}")]]
        with ServerProcess(flags) as server:
            time.sleep(1)
            sizes.append(rss_mib(server.process.pid))
        rows.append([", ".join(f"{n} ({tasks[n][0]})" for n in chosen), f"{sizes[-1]:.0f}"])
    print(common.table(["adapters loaded", "server RSS MiB"], rows))
    print(f"three task adapters / one: {sizes[1] / sizes[0]:.3f} (goal <= 1.10)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--classify", type=int, default=256)
    parser.add_argument("--skip-chat", action="store_true")
    parser.add_argument("--skip-classify", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--scaling-rounds", type=int, default=3, help="bursts per adapter count (median shown)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(common.machine())
    with tempfile.TemporaryDirectory() as tmp:
        # classify first: its load generator must keep up with ~800 requests/s, which it does
        # reliably only in a fresh process (after the chat runs it measured ~20% less)
        if not args.skip_classify:
            bench_classify(args, Path(tmp) / "classify")
        if not args.skip_chat:
            bench_chats(args, Path(tmp) / "chat")
        if not args.skip_memory:
            bench_memory(Path(tmp) / "memory")


if __name__ == "__main__":
    main()
