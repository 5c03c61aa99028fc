"""``adapterkit analyze``: load an adapter onto its base, analyse it, write the report, print where."""

from __future__ import annotations

from pathlib import Path

from adapterkit.errors import UsageError

REPORT_FILES = ("report.html", "analysis.json")


def analyze(
    *,
    adapter: Path,
    output: Path,
    data: str | None = None,
    split: str = "validation",
    text_column: str | None = None,
    label_column: str | None = None,
    compare: Path | None = None,
    ablate: bool = False,
    baseline_run: Path | None = None,
    max_examples: int | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    overwrite: bool = False,
) -> int:
    """Analyse what an adapter learned: report.html, PNG pictures and analysis.json in --output.

    Args:
        adapter: the adapter folder (a run's adapter/); its run folder's training figures are read when present.
        output: the folder for the report (refused if it holds one, unless --overwrite).
        data: labelled examples (a file or a built-in data set name): where the adapter changes predictions and
            hidden states; needed by --ablate.
        split: split of a built-in data set.
        text_column: column of --data with the text (default: as in training).
        label_column: column of --data with the label (default: as in training).
        compare: a second adapter folder of the same base: subspace similarity of the two updates per module.
        ablate: re-evaluate the task metric without the adapter in each layer, and below / above each cut, with
            bootstrap intervals.
        baseline_run: a run folder of another training of the task (full fine-tuning) to compare the cost with.
        max_examples: use only the first this many examples of --data.
        batch_size: examples per forward pass.
        max_length: longest input in tokens (default: the task's for the data).
        device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps.
        threads: torch threads (default: the cores this process may use; 1 on an overloaded machine).
        overwrite: replace a report already in --output.
    """
    from adapterkit.analysis import analyze as analyze_adapter
    from adapterkit.cli.threads import apply_threads
    from adapterkit.core.lifecycle import active_adapters
    from adapterkit.models import load_with_adapter

    existing = [name for name in REPORT_FILES if (output / name).exists()]
    if existing and not overwrite:
        raise UsageError(f"{output} already holds a report ({', '.join(existing)}); choose another --output or "
                         "pass --overwrite to replace it")
    if ablate and data is None:
        raise UsageError("--ablate re-evaluates the task metric, so it needs --data (labelled examples)")
    apply_threads(threads)
    model, tokenizer, metadata = load_with_adapter(adapter, device=device)
    name = active_adapters(model)[0]
    chosen = {k: v for k, v in {"text_column": text_column, "label_column": label_column}.items() if v}
    columns = {**metadata.get("columns", {}), **chosen}
    report = analyze_adapter(model, name, data=data, compare=compare, ablate=ablate, tokenizer=tokenizer,
                             output=output, split=split, max_examples=max_examples, batch_size=batch_size,
                             max_length=max_length, adapter_dir=adapter, baseline_run=baseline_run, columns=columns)
    print(f"report:   {report['files']['report']}")
    print(f"numbers:  {report['files']['json']}")
    pictures = [Path(v).name for k, v in report["files"].items() if k not in ("report", "json")]
    print(f"pictures: {', '.join(pictures) if pictures else 'none'}")
    if report.get("ablation"):
        print(f"ablation: {report['ablation']['verdict']}")
    return 0
