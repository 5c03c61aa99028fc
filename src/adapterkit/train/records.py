"""Where training metrics go: a JSONL log and TensorBoard event files in the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterkit.core.atomic import write_text_atomically

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The plain numbers of a metrics dict (drops per-class tables, matrices, label lists)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLog:
    """Appends one JSON record per event; mirrors the scalars to TensorBoard.

    With no run folder it only keeps the records in memory. On resume the
    JSONL file is cut back to the checkpoint's step so no record is duplicated.
    """

    def __init__(self, run_dir: Path | None, resume_step: int | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.path = run_dir / METRICS_FILE if run_dir else None
        self._writer = None
        self._file = None
        if self.path is None:
            return
        if resume_step is not None and self.path.exists():
            kept = [r for r in self._read() if r["step"] <= resume_step]
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept
        elif self.path.exists():
            self.path.unlink()
        self._open(run_dir, purge_step=resume_step)

    def _open(self, run_dir: Path, purge_step: int | None = None) -> None:
        """Open the JSONL file once for the whole run, and a TensorBoard writer."""
        from torch.utils.tensorboard import SummaryWriter  # slow import; only when writing

        self.path = run_dir / METRICS_FILE
        self._file = self.path.open("a")
        self._writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def relocate(self, run_dir: Path) -> None:
        """Keep writing in ``run_dir``, where the run folder was just moved (``--overwrite``)."""
        if self.path is None or self.path.parent == run_dir:
            return
        self.close()
        self._open(run_dir)

    def _read(self) -> list[dict[str, Any]]:
        """The records on disk; a last line cut short by a crash mid-write is dropped."""
        assert self.path is not None
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` (scalars only are kept) for ``split`` at ``step``."""
        record = {"split": split, "step": step, **scalar_metrics(values)}
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("split", "step"):
                    self._writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        """Close the log file and flush TensorBoard."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
