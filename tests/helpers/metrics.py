"""Reading what a run logged."""

from __future__ import annotations

import csv
from pathlib import Path


def metrics_csv_rows(log_dir) -> dict[int, dict[str, str]]:
    """The training rows of a CSVLogger's metrics.csv, by their ``step``."""
    with open(Path(log_dir) / "metrics.csv") as f:
        return {int(row["step"]): row for row in csv.DictReader(f) if row.get("train/loss")}
