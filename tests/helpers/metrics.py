"""Reading what a run logged."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger


def metrics_csv_rows(log_dir) -> dict[int, dict[str, str]]:
    """The training rows of a CSVLogger's metrics.csv, by their ``step``."""
    with open(Path(log_dir) / "metrics.csv") as f:
        return {int(row["step"]): row for row in csv.DictReader(f) if row.get("train/loss")}


def sparse_and_dense_runs(computed: list[bool], make, tmp_path, log_every_n_steps: int, **trainer_kwargs):
    """Two seeded runs for a statistics-cadence test, ``make()`` giving each its (module, datamodule):
    logging every ``log_every_n_steps`` steps, then every step, to a CSVLogger (no validation, no
    checkpoints; ``trainer_kwargs``: ``max_steps`` and the like). ``computed`` is the `with_stats_calls`
    record. Returns ``[(with_stats calls, training rows written)]`` of the sparse run, then of the dense one."""
    runs = []
    for every in (log_every_n_steps, 1):
        computed.clear()
        L.seed_everything(0)
        logger = CSVLogger(tmp_path, name=f"every{every}")
        trainer = L.Trainer(accelerator="cpu", log_every_n_steps=every, logger=logger, limit_val_batches=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            **trainer_kwargs)  # fmt: skip
        trainer.fit(*make())
        runs.append((list(computed), metrics_csv_rows(logger.log_dir)))
    return runs


def assert_rows_match(sparse_rows: dict, dense_rows: dict, names) -> None:
    """Every row the sparse run wrote holds the dense run's values of ``names`` at that step (1e-5)."""
    for step, row in sparse_rows.items():
        for name in names:
            assert float(row[name]) == pytest.approx(float(dense_rows[step][name]), rel=1e-5), (step, name)
