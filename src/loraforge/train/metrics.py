"""The run's metrics: ``metrics.csv`` (one row per log or eval) and TensorBoard events.

writer = MetricsWriter(out, resume_step=None, tensorboard=True)
writer.log(10, {"epoch": 0.5, "loss": 1.23, "lr": 1e-3})
writer.close()
rows = read_metrics(out / METRICS_NAME)
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.csv"
METRIC_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "eval_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
]


class MetricsWriter:
    """Appends rows to metrics.csv and TensorBoard. Resuming at `resume_step` drops the rows logged
    past it (by the interrupted run), so no step appears twice."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_NAME
        rows = read_metrics(self.path) if resume_step is not None else []
        rows = [r for r in rows if r["step"] <= resume_step] if resume_step is not None else []
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in METRIC_COLUMNS})
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_COLUMNS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.csv only")

    def log(self, step: int, values: dict[str, float]):
        row = {"step": step, **values}
        self.writer.writerow({k: ("" if row.get(k) is None else _fmt(row[k])) for k in METRIC_COLUMNS})
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if value is not None and key != "epoch":
                    tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
                    self.tb.add_scalar(tag, value, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts of floats (step as int; missing values None)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                row[key] = None if value in ("", None) else float(value)
            row["step"] = int(row["step"])
            rows.append(row)
    return rows
