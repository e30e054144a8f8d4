"""Wall time per optimizer step: one process vs DDP vs FSDP2 (2 processes), on the quickstart configs.

    python benchmarks/distributed.py                      # sft, dpo, grpo x single, ddp, fsdp2; JSON to stdout
    python benchmarks/distributed.py --methods sft --steps 30

Each measurement is ``lit-posttrain fit --config configs/quickstart/<method>.yaml`` (plus
``configs/strategies/<strategy>.yaml``) in a fresh process, with the same global batch: the
2-process runs get half the quickstart's ``data.batch_size`` per process. Validation, checkpoints
and logging are off; the time of each training batch (from ``on_train_batch_start`` to
``on_train_batch_end`` on rank 0, which waits for the collectives) is recorded, the first 3 are
warm-up. Reported: median and interquartile range of seconds per step, and the run's total wall
time (start-up included). ``--threads 1`` gives the single process the one intra-op thread each
of the 2 processes gets (Lightning sets ``cores / processes``), which separates the strategies'
cost from the thread count.

On a CPU machine the 2 processes share its cores with each other (and with anything else that
runs): the figures measure the cost of the strategies' communication and bookkeeping on a tiny
model, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_BATCH = {"sft": 32, "dpo": 32, "grpo": 8}  # data.batch_size in configs/quickstart/<method>.yaml


class StepTimer(L.Callback):
    """Seconds per training batch on rank 0, written to ``path`` (JSON) at the end of fit."""

    def __init__(self, path: str):
        self.path, self.times = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.times))


def measure(method: str, strategy: str, steps: int, warmup: int = 3, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        times_file = Path(tmp) / "times.json"
        batch_size = QUICKSTART_BATCH[method] // (1 if strategy == "single" else 2)
        args = ["--config", f"configs/quickstart/{method}.yaml"]
        if strategy != "single":
            args += ["--config", f"configs/strategies/{strategy}.yaml"]
        args += [
            "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", tmp,
            "--trainer.callbacks", json.dumps([{"class_path": "benchmarks.distributed.StepTimer", "init_args": {"path": str(times_file)}}]),
            "--data.init_args.batch_size", str(batch_size),
        ]  # fmt: skip
        env = dict(os.environ)
        if (
            threads is not None
        ):  # torch's intra-op threads per process (Lightning sets 1 per process for 2 on 2 cores)
            env["OMP_NUM_THREADS"] = str(threads)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "lit_posttrain", "fit", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        total = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{method} {strategy} failed:\n{result.stderr[-3000:]}")
        times = json.loads(times_file.read_text())[warmup:]
    q1, median, q3 = statistics.quantiles(times, n=4)
    return {
        "method": method,
        "strategy": strategy,
        "threads_per_process": threads or "default",
        "batch_size_per_process": batch_size,
        "steps_timed": len(times),
        "median_s_per_step": round(median, 4),
        "iqr_s": [round(q1, 4), round(q3, 4)],
        "total_wall_s": round(total, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sft", "dpo", "grpo"])
    parser.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp2"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every process")
    args = parser.parse_args()
    results = [measure(m, s, args.steps, threads=args.threads) for m in args.methods for s in args.strategies]
    print(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
