"""Inference latency: base model, adapterkit unmerged/merged, PEFT unmerged/merged.

    python bench/inference.py [--repeats 20] [--seq 64]

MiniLM classification, LoRA rank 8 on query/value with non-zero weights,
batch 1 and 32; every variant holds identical weights and the runs take turns.
The "cut" rows run our models as ``evaluate``/``predict``/the server do: the
last block past its attention at the position the classifier reads only
(``tasks/head_reads.py``).
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
from adapterkit.tasks.head_reads import first_position_only  # noqa: E402


def build(seq: int) -> tuple[dict[str, torch.nn.Module], torch.nn.Module]:
    import peft
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(common.minilm_dir(), num_labels=2).eval()
    ours = copy.deepcopy(base)
    ak.add_adapter(ours, "a", ak.LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    with torch.no_grad():
        for p in ak.adapter_parameters(ours, "a", include_head=False).values():
            p.normal_(0, 0.02)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    own = {k.replace(".a.", ".default."): v for k, v in ak.adapter_parameters(ours, "a").items()}
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            key = name.removeprefix("base_model.model.").replace("modules_to_save.", "copies.")
            if key in own:
                param.copy_(own[key])
    ours_merged, theirs_merged = copy.deepcopy(ours), copy.deepcopy(theirs)
    ak.merge(ours_merged, "a")
    theirs_merged = theirs_merged.merge_and_unload()
    models = {"base": base, "adapterkit": ours, "adapterkit merged": ours_merged,
              "peft": theirs, "peft merged": theirs_merged}
    return models, base


def cut_call(model: torch.nn.Module, inputs: dict) -> object:
    """``model(**inputs)`` with its last block cut to the classifier's position."""
    with first_position_only(model):
        return model(**inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    print(common.machine())
    models, base = build(args.seq)
    rows = []
    for batch in (1, 32):
        ids = torch.randint(5, base.config.vocab_size, (batch, args.seq), generator=torch.Generator().manual_seed(1))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            ref = models["adapterkit"](**inputs).logits
            gap = (models["peft"](**inputs).logits - ref).abs().max().item()
            runs = {name: (lambda m=m: m(**inputs)) for name, m in models.items()}
            for name in ("adapterkit", "adapterkit merged"):
                runs[f"{name}, cut"] = lambda m=models[name]: cut_call(m, inputs)
            cut_gap = (cut_call(models["adapterkit"], inputs).logits - ref).abs().max().item()
            seconds = common.interleaved(runs, args.repeats, warmup=2)
        base_s = seconds["base"]
        for name, s in seconds.items():
            rows.append([f"batch {batch}", name, f"{s * 1000:.2f}", f"{s / base_s:.3f}"])
        print(f"batch {batch}: adapterkit vs peft max |logit diff| = {gap:.2e}, cut vs whole {cut_gap:.2e}")
    print(common.table(["batch", "variant", "latency ms (median)", "× base"], rows))


if __name__ == "__main__":
    main()
