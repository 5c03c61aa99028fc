"""Several adapters in one batch: adapterkit ``route`` vs PEFT ``adapter_names`` vs the base model.

    python bench/routing.py [--repeats 3] [--classify-repeats 20] [--skip-generate]

1. Greedy generation on SmolLM2-135M with 32 LoRA adapters (rank 8, attention
   projections) loaded, a batch of 32 prompts each naming its own adapter,
   32 new tokens.
2. MiniLM classification forward with 8 adapters, batch 32.

Both libraries hold identical adapter weights (copied from ours into PEFT's),
so the outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

import adapterkit as ak  # noqa: E402


def with_adapters(base: torch.nn.Module, count: int, targets: list[str], task: str) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """(adapterkit model, PEFT model) carrying the same ``count`` random LoRA adapters."""
    import peft

    names = [f"a{i}" for i in range(count)]
    ours = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    for name in names:
        ak.add_adapter(ours, name, ak.LoraConfig(rank=8, alpha=16, targets=targets))
        with torch.no_grad():
            for p in ak.adapter_parameters(ours, name).values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task)
    theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, config)
    own = {}
    for name in names:
        own.update(ak.adapter_parameters(ours, name))
    with torch.no_grad():
        for key, param in theirs.named_parameters():
            mine = key.removeprefix("base_model.model.").replace("modules_to_save.", "copies.")
            if mine in own:
                param.copy_(own[mine])
    return ours.eval(), theirs.eval(), names


def bench_generate(repeats: int) -> list[list[str]]:
    from adapterkit.models import load_model

    base, tokenizer = load_model("smollm2-135m", task="causal-lm")
    base.eval()
    ours, theirs, names = with_adapters(base, 32, ["q_proj", "k_proj", "v_proj", "o_proj"], "CAUSAL_LM")
    tokenizer.padding_side = "left"
    prompts = [f"Write a short note about topic number {i}:" for i in range(32)]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def run_ours() -> torch.Tensor:
        with ak.route(ours, names):
            return ours.generate(**inputs, **kwargs)

    def run_peft() -> torch.Tensor:
        return theirs.generate(**inputs, adapter_names=names, **kwargs)

    with torch.inference_mode():
        same = torch.equal(run_ours(), run_peft())
        runs = {"base": lambda: base.generate(**inputs, **kwargs), "adapterkit route": run_ours,
                "peft adapter_names": run_peft}
        seconds = common.interleaved(runs, repeats, warmup=1)
    print(f"generation: identical tokens from both libraries: {same}")
    return _rows("SmolLM2 generate, 32 adapters, batch 32, 32 tokens", seconds)


def bench_classify(repeats: int) -> list[list[str]]:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(common.minilm_dir(), num_labels=2).eval()
    ours, theirs, names = with_adapters(base, 8, ["query", "value"], "SEQ_CLS")
    routes = [names[i % 8] for i in range(32)]
    ids = torch.randint(5, base.config.vocab_size, (32, 64), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run_ours() -> torch.Tensor:
        with ak.route(ours, routes):
            return ours(**inputs).logits

    def run_peft() -> torch.Tensor:
        return theirs(**inputs, adapter_names=routes).logits

    with torch.inference_mode():
        gap = (run_ours() - run_peft()).abs().max().item()
        runs = {"base": lambda: base(**inputs).logits, "adapterkit route": run_ours, "peft adapter_names": run_peft}
        seconds = common.interleaved(runs, repeats, warmup=2)
    print(f"classification: max |logit diff| between libraries: {gap:.2e}")
    return _rows("MiniLM forward, 8 adapters, batch 32, length 64", seconds)


def _rows(label: str, seconds: dict[str, float]) -> list[list[str]]:
    base = seconds["base"]
    ours_over = seconds["adapterkit route"] - base
    peft_over = seconds["peft adapter_names"] - base
    rows = [[label, name, f"{s * 1000:.1f}", f"{s / base:.3f}"] for name, s in seconds.items()]
    rows.append([label, "our added time / PEFT's added time", "-", f"{ours_over / peft_over:.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classify-repeats", type=int, default=20,
                        help="repetitions of the MiniLM forward (short, so more are needed for a stable median)")
    parser.add_argument("--skip-generate", action="store_true")
    args = parser.parse_args()
    print(common.machine())
    rows = bench_classify(args.classify_repeats)
    if not args.skip_generate:
        rows += bench_generate(args.repeats)
    print(common.table(["workload", "variant", "ms (median)", "× base"], rows))


if __name__ == "__main__":
    main()
