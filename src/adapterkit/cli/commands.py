"""The typed functions behind each ``adapterkit`` command: call, then print.

Every decision (defaults, merging the YAML file with flags, which base model
an adapter needs) lives in the library; these functions only connect the
command line to it and write the results to stdout.
"""

from __future__ import annotations

import json as json_lib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from adapterkit.core.registry import method_choices
from adapterkit.data import read_texts
from adapterkit.errors import UsageError
from adapterkit.evaluate import evaluate as evaluate_model
from adapterkit.evaluate import format_adapter_info, format_metrics
from adapterkit.evaluate import predict as predict_texts
from adapterkit.evaluate.base_model import evaluate_base_model
from adapterkit.evaluate.compare import format_comparison
from adapterkit.models import adapter_info, load_with_adapter
from adapterkit.runtime.allocator import CpuAllocator
from adapterkit.runtime.cpu_matmul import CpuMatmul
from adapterkit.tasks import get_task, task_name_for_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from adapterkit.core.plan import Plan

# The methods a user can name: whatever the registry holds, by its shortest name.
Method = Literal[tuple(method_choices())]  # type: ignore[valid-type]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Strategy = Literal["auto", "none", "ddp", "fsdp"]
Quantize = Literal["int8", "nf4", "fp4"]


def _is_main_process() -> bool:
    """False in the processes torchrun started besides rank 0 (they print nothing)."""
    import os

    return os.environ.get("RANK", "0") in ("", "0")


def train(
    config: Path | None = None,
    model: str | None = None,
    task: str | None = None,
    data: str | None = None,
    eval_data: str | None = None,
    test_data: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    text_pair_column: str | None = None,
    method: Method | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    max_length: int | None = None,
    max_target_length: int | None = None,
    packing: bool = False,
    output: str | None = None,
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    precision: Precision | None = None,
    gradient_checkpointing: bool = False,
    cpu_allocator: CpuAllocator | None = None,
    cpu_matmul: CpuMatmul | None = None,
    adapter_layers: str | None = None,
    cache_frozen_prefix: bool = False,
    compile: bool = False,
    strategy: Strategy | None = None,
    threads: int | None = None,
    quantize: Quantize | None = None,
    json: bool = False,
) -> int:
    """Train an adapter (default: LoRA on minilm with rotten_tomatoes) and test it.

    Args:
        config: a YAML run file; the flags below override its values.
        model: model alias (minilm) or local Hugging Face folder.
        task: the task (default classification).
        data: training data: a built-in name (rotten_tomatoes, wnut16) or a CSV/TSV/JSON/JSONL/Parquet
            file; token-classification also reads CoNLL files (token ... tag per line).
        eval_data: validation file (default: the built-in validation split, or 10% of the training file).
        test_data: test file (default: the built-in test split).
        text_column: column with the text.
        label_column: column with the label.
        text_pair_column: column with the second text of sentence pairs.
        method: adapter method.
        epochs: passes over the training data.
        max_steps: optimizer steps (overrides epochs).
        batch_size: examples per step.
        lr: peak learning rate of the adapter.
        max_length: longest input in tokens (default: the task's: 99% of the training examples for
            classification and NER, which window longer ones; QA windows of 384; causal-lm the model's
            context up to 1024; seq2seq sources).
        max_target_length: seq2seq: longest target in tokens (default: 99% of the training targets).
        packing: causal-lm: pack short examples into rows of --max-length tokens (no attention across them).
        output: run folder (default runs/<date-time>); the adapter lands in OUTPUT/adapter.
        seed: random seed.
        resume: continue the interrupted run in --output from its last checkpoint (same settings).
        overwrite: replace the run already in --output (kept until the new run's first checkpoint).
        device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps; under torchrun each process
            takes its local rank's GPU.
        precision: fp32 (the default), bf16 or fp16 (autocast; fp16 with a gradient scaler), or auto: bf16
            where the hardware runs it natively (docs/benchmarks.md says why it is not the default).
        gradient_checkpointing: recompute activations in the backward (less memory, more time); any method.
        cpu_allocator: lean: on a CPU, glibc hands freed memory back at once (resident memory follows the live
            tensors: 0.5-0.8x the peak, for 1.15-1.3x the time per step); default leaves the C library as it is.
        cpu_matmul: who multiplies the frozen base's float32 linear layers on a CPU: auto (oneDNN on AMD CPUs,
            where PyTorch's MKL runs a generic path at under half its speed; MKL on Intel's), onednn or default
            (PyTorch's own); only rounding differs. $ADAPTERKIT_CPU_MATMUL sets what auto means.
        adapter_layers: top:K puts the adapter in the top K blocks only (bottom:K, or 3,4,5 also work): the
            backward stops below the lowest one (faster; `adapterkit analyze --ablate` says which K is safe).
        cache_frozen_prefix: with --adapter-layers top:K, keep each example's input to the lowest adapted block
            after its first epoch, so later epochs start there (the blocks below run without dropout).
        compile: run the training forward through torch.compile (the first steps pay the compilation).
        strategy: under torchrun: ddp (the default with several processes) or fsdp (FSDP2, the frozen base
            sharded per transformer block).
        threads: torch threads per process (default: the cores this process may use, shared among the
            processes torchrun started on this machine; 1 when the machine is already overloaded).
        quantize: store the frozen base's linear layers as int8 (torchao) or nf4/fp4 (bitsandbytes); the
            adapter trains in float32 (QLoRA-style).
        json: print the result as JSON.
    """
    from adapterkit.cli.threads import apply_threads
    from adapterkit.train.recipe import RunConfig, run

    apply_threads(threads)

    run_config = RunConfig.resolve(
        config, model=model, task=task, data=data, eval_data=eval_data, test_data=test_data,
        text_column=text_column, label_column=label_column, text_pair_column=text_pair_column,
        method=method, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
        max_length=max_length, max_target_length=max_target_length, packing=packing or None, output=output,
        seed=seed, resume=resume or None, overwrite=overwrite or None, device=device, precision=precision,
        gradient_checkpointing=gradient_checkpointing or None, cpu_allocator=cpu_allocator,
        cpu_matmul=cpu_matmul, adapter_layers=adapter_layers,
        cache_frozen_prefix=cache_frozen_prefix or None, compile=compile or None, strategy=strategy,
        quantize=quantize)
    result = run(run_config)
    if not _is_main_process():
        return 0  # under torchrun the main process reports
    summary = {
        "output": result.output_dir, "adapter": result.adapter_dir,
        "steps": result.train.step, "trainable": result.trainable,
        "validation": {k: v for k, v in result.train.metrics.items() if isinstance(v, (int, float))},
        "test": {k: v for k, v in result.test_metrics.items() if isinstance(v, (int, float))},
        "wall_time_s": round(result.wall_time_s, 1),
    }
    if json:
        print(json_lib.dumps(summary, indent=1))
        return 0
    print(f"run folder:   {result.output_dir}")
    print(f"adapter:      {result.adapter_dir}")
    print(f"trainable:    {result.trainable['trainable']:,} of {result.trainable['total']:,} "
          f"parameters ({result.trainable['percent']:.2f}%)")
    metric = result.train.metric
    if metric in result.train.metrics:  # the weights the run ends with
        print(f"validation:   {metric} {result.train.metrics[metric]:.4f} "
              f"(best {result.train.best_metric:.4f} at step {result.train.best_step})")
    if result.test_metrics:
        print(f"test:         {metric} {result.test_metrics[metric]:.4f} "
              f"on {result.test_metrics.get('count', '?')} examples")
    print(f"time:         {result.wall_time_s / 60:.1f} min")
    return 0


def evaluate(
    *,
    data: str,
    adapter: Path | None = None,
    model: str | None = None,
    task: str | None = None,
    split: str = "test",
    text_column: str | None = None,
    label_column: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
    no_generate: bool = False,
    compare_base: bool = False,
    device: str = "auto",
    precision: Precision = "fp32",
    threads: int | None = None,
    quantize: Quantize | None = None,
    json: bool = False,
) -> int:
    """Evaluate a trained adapter on labelled data (its base model comes from the adapter folder),
    or with --model and --task, the base model alone.

    Args:
        data: a file, or a built-in data set name.
        adapter: the adapter folder (a run's adapter/).
        model: without --adapter: the base model (alias or folder) to evaluate as it is.
        task: the task of --model (default classification).
        split: split of a built-in data set.
        text_column: column with the text (default: as in training).
        label_column: column with the label (default: as in training).
        batch_size: examples per forward pass (default 64); causal-lm and seq2seq: also prompts generated
            together (default 32).
        max_length: longest input in tokens (default: the task's for this data and model, the same with
            --adapter and --model: 99% of the examples for classification and NER, QA windows of 384, the
            context up to 1024 for causal-lm).
        max_new_tokens: causal-lm and seq2seq: most tokens generated per example (default: from the reference's
            length).
        temperature: causal-lm and seq2seq: 0 (the default) generates greedily; above 0 samples at this temperature.
        top_p: causal-lm and seq2seq: nucleus sampling probability mass (with --temperature).
        stop: causal-lm and seq2seq: strings that end a generation (cut from it before scoring).
        seed: causal-lm and seq2seq: random seed for sampling.
        no_generate: causal-lm and seq2seq: score perplexity alone, without generating (no exact match, BLEU, chrF).
        compare_base: with --adapter: also evaluate its base model on the same examples with the same length,
            template and generation settings, and print both columns and the change.
        device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps.
        precision: fp32, bf16 or fp16 autocast, or auto (bf16 where the hardware runs it natively).
        threads: torch threads (default: the cores this process may use; 1 on an overloaded machine).
        quantize: load the base with its linear layers stored as int8, nf4 or fp4.
        json: print all metrics as JSON, with the length, template and generation settings under "settings".
    """
    from adapterkit.cli.generation import evaluation_generation
    from adapterkit.cli.threads import apply_threads

    apply_threads(threads)

    chosen = {k: v for k, v in {"text_column": text_column, "label_column": label_column}.items() if v}
    scoring = {"batch_size": batch_size} if batch_size is not None else {}
    flags = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "stop": stop,
             "seed": seed}
    if adapter is None:
        if model is None:
            raise UsageError("give --adapter DIR/adapter, or --model NAME (and --task) to evaluate a base model")
        if compare_base:
            raise UsageError("--compare-base compares an adapter with its base: give --adapter DIR/adapter")
        options = evaluation_generation(task or "classification", batch_size, **flags)
        metrics = evaluate_base_model(model, task or "classification", data, split=split, max_length=max_length,
                                      generation=options, generate=not no_generate, device=device,
                                      precision=precision, **scoring, **chosen)
        print(json_lib.dumps(metrics, indent=1) if json else format_metrics(metrics))
        return 0
    loaded, tokenizer, metadata = load_with_adapter(adapter, device=device, quantize=quantize)
    columns = {**metadata.get("columns", {}), **chosen}
    options = evaluation_generation(task_name_for_model(loaded), batch_size, **flags)
    metrics = evaluate_model(loaded, tokenizer, data, split=split, max_length=max_length,
                             generation=options, generate=not no_generate, compare_base=compare_base,
                             precision=precision, **scoring, **columns)
    if compare_base:
        print(json_lib.dumps(metrics, indent=1) if json else format_comparison(metrics))
        return 0
    print(json_lib.dumps(metrics, indent=1) if json else format_metrics(metrics))
    return 0


def predict(
    texts: list[str],
    *,
    adapter: Path,
    file: Path | None = None,
    text_column: str | None = None,
    question: str | None = None,
    context: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: Precision = "fp32",
    threads: int | None = None,
    quantize: Quantize | None = None,
    json: bool = False,
) -> int:
    """Predict with a trained adapter: one line per text (label and score); reads stdin without texts.

    Args:
        texts: texts to classify.
        adapter: the adapter folder (a run's adapter/).
        file: a text file (one text per line) or a table file (its text column).
        text_column: text column of a table file (default: as in training).
        question: question answering: the question to answer from --context.
        context: question answering: the passage that holds the answer.
        batch_size: examples per forward pass.
        device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps.
        precision: fp32, bf16 or fp16 autocast, or auto (bf16 where the hardware runs it natively).
        threads: torch threads (default: the cores this process may use; 1 on an overloaded machine).
        quantize: load the base with its linear layers stored as int8, nf4 or fp4.
        json: print a JSON list of predictions.
    """
    from adapterkit.cli.threads import apply_threads

    apply_threads(threads)
    model, tokenizer, metadata = load_with_adapter(adapter, device=device, quantize=quantize)
    inputs = list(texts)
    if file is not None:
        column = text_column or metadata.get("columns", {}).get("text_column", "text")
        inputs += read_texts(file, text_column=column)
    if question is not None or context is not None:
        if not (question and context):
            raise UsageError("--question and --context go together: give both")
        inputs.append((question, context))
    if not inputs and file is None:
        inputs = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    predictions = predict_texts(model, tokenizer, inputs, batch_size=batch_size,
                                max_length=metadata.get("max_length"), precision=precision)
    task = get_task(metadata.get("task", "classification"))
    if json:
        print(json_lib.dumps([{"text": t, **task.to_json(p)} for t, p in zip(inputs, predictions)], indent=1))
    else:
        for prediction in predictions:
            print(task.format(prediction))
    return 0


def info(adapter: Path, json: bool = False) -> int:
    """Show an adapter: method, base model, trainable parameters, file size, task, labels, metrics.

    Args:
        adapter: the adapter folder (a run's adapter/).
        json: print as JSON.
    """
    summary = adapter_info(adapter)
    print(json_lib.dumps(summary, indent=1) if json else format_adapter_info(summary))
    return 0


def _export_quantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output: Path, folded: Plan,
                      overwrite: bool) -> int:
    """``export --quantize``: merge into the quantised base, write it quantised, print what requantising cost."""
    from adapterkit.core.plan import describe
    from adapterkit.export.hf_folder import export_quantized

    written, report = export_quantized(model, tokenizer, output, plan=folded, overwrite=overwrite)
    requant, probe = report["requantization"], report["probe"]
    print(f"exported:  {written}")
    print(f"plan:      {describe(folded)} folded into the quantised weights")
    if requant is None:
        print("requantised: no quantised weight changed (the plan touches only float layers)")
    else:
        print(f"requantised: {requant['layers']} layers; relative error of the stored merged weights "
              f"mean {requant['mean_relative_error']:.2%}, max {requant['max_relative_error']:.2%}")
    print(f"probe batch: outputs moved by at most {probe['max_abs_change']:.3g} "
          f"({probe['max_relative_change']:.2%} of their largest value) from the unmerged adapter")
    print(f"model:     {type(model).__name__}, quantised (bitsandbytes format); load it with transformers' "
          f"from_pretrained({str(written)!r}) with bitsandbytes installed")
    return 0


def export(
    *,
    adapter: list[Path],
    output: Path,
    plan: Path | None = None,
    format: Literal["hf", "gguf"] | None = None,
    overwrite: bool = False,
    dtype: Literal["fp32", "bf16"] | None = None,
    quantize: Literal["int8", "nf4", "fp4"] | None = None,
) -> int:
    """Export trained adapters merged into their base as a Hugging Face model folder that plain
    transformers loads (or a LoRA adapter as a llama.cpp GGUF file).

    Args:
        adapter: one or more adapter folders (a run's adapter/), all after one --adapter (--adapter A B);
            several take a --plan saying how to combine them.
        output: the model folder to write (with --format gguf: the .gguf file).
        plan: a YAML or JSON file holding the plan to fold, e.g. {"average": [["a", 0.5], ["b", 0.5]]},
            naming the adapters by the names they were saved under ("name" in each folder's adapterkit.json).
        format: hf (a merged model folder) or gguf (one LoRA adapter on a Llama-architecture base, for
            llama.cpp's --lora); default: gguf when --output ends in .gguf, else hf.
        overwrite: replace what is already at --output (kept whole until the new export is complete).
        dtype: write the merged model in fp32 or bf16 (default: the base's own dtype); an adapter trained on
            a quantised base is merged into its float base, which is what most users want.
        quantize: merge into the base quantised in int8, nf4 or fp4 (dequantise, add, requantise) and write
            a folder that stays quantised (transformers' bitsandbytes format); prints the requantisation error.
    """
    from adapterkit.core.plan import describe
    from adapterkit.export.hf_folder import check_output, export_merged, load_adapters, plan_for, read_plan

    chosen_format = format or ("gguf" if output.suffix.lower() == ".gguf" else "hf")
    check_output(output, overwrite, sources=adapter)  # before the slow load
    if chosen_format == "gguf":
        if len(adapter) != 1 or plan is not None:
            raise UsageError("--format gguf writes one LoRA adapter as it is: give one --adapter and no --plan")
        from adapterkit.export.gguf_lora import export_gguf_lora

        model, _, (name,) = load_adapters(adapter)
        written = export_gguf_lora(model, name, output)
        print(f"exported:  {written} (llama.cpp GGUF LoRA adapter {name!r}, "
              f"for its base model converted with llama.cpp's convert_hf_to_gguf.py)")
        return 0
    given = read_plan(plan) if plan is not None else None
    if quantize is not None and dtype is not None:
        raise UsageError(f"--quantize {quantize} writes a quantised folder and --dtype {dtype} a float one: give one")
    model, tokenizer, names = load_adapters(adapter, quantize=quantize)
    folded = plan_for(names, given)
    if quantize is not None:
        return _export_quantized(model, tokenizer, output, folded, overwrite)
    import torch

    chosen_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype) if dtype else None
    written = export_merged(model, tokenizer, output, plan=folded, overwrite=overwrite, dtype=chosen_dtype)
    print(f"exported:  {written}")
    print(f"plan:      {describe(folded)} folded into the weights")
    print(f"model:     {type(model).__name__} ({str(model.dtype).removeprefix('torch.')}); load it with "
          f"transformers' from_pretrained({str(written)!r})")
    return 0
