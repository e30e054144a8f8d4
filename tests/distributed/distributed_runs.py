"""Launching ``fit_script.py`` from the distributed tests, and reading what its runs wrote.

The 2-process fits (DDP and FSDP2 through ``ModelParallelStrategy``, gloo on CPU) start once per
session, all in one launch (``MULTI_RUNS``, the ``multi_runs`` fixture in conftest.py), shared by
test_ddp_fsdp2.py and test_resume.py: each launch costs two Python start-ups, which on a 2-core
machine take longer than the fits themselves.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = HERE / "fit_script.py"

# one launch of 2 processes: the runs test_ddp_fsdp2.py and test_resume.py compare
MULTI_RUNS = [
    # the same global batch as the single-process runs of SINGLE_RUNS (2 processes x half)
    {"name": "sft_ddp", "method": "sft", "strategy": "ddp", "devices": 2, "batch_size": 8},
    {"name": "sft_fsdp2", "method": "sft", "strategy": "fsdp2", "devices": 2, "batch_size": 8},
    {"name": "dpo_ddp", "method": "dpo", "strategy": "ddp", "devices": 2, "batch_size": 4},
    {"name": "dpo_fsdp2", "method": "dpo", "strategy": "fsdp2", "devices": 2, "batch_size": 4},
    {"name": "grpo_ddp", "method": "grpo", "strategy": "ddp", "devices": 2, "batch_size": 2, "rollout": "per_prompt"},
    {"name": "grpo_fsdp2", "method": "grpo", "strategy": "fsdp2", "devices": 2, "batch_size": 2, "rollout": "per_prompt"},
    {"name": "reward_ddp", "method": "reward", "strategy": "ddp", "devices": 2, "batch_size": 4},
    {"name": "reward_fsdp2", "method": "reward", "strategy": "fsdp2", "devices": 2, "batch_size": 4},
    {"name": "rloo_ddp", "method": "rloo", "strategy": "ddp", "devices": 2, "batch_size": 2, "rollout": "per_prompt"},
    {"name": "rloo_fsdp2", "method": "rloo", "strategy": "fsdp2", "devices": 2, "batch_size": 2, "rollout": "per_prompt"},
    # KTO with accumulation: the reference point z_ref is the mean over both micro-batches and both ranks
    {"name": "kto_ddp", "method": "kto", "strategy": "ddp", "devices": 2, "batch_size": 4, "accumulate": 2},
    {"name": "kto_fsdp2", "method": "kto", "strategy": "fsdp2", "devices": 2, "batch_size": 4, "accumulate": 2},
    # rank 0's completions all end after one token, rank 1's run to max_completion_length
    {"name": "grpo_fsdp2_uneven", "method": "grpo", "strategy": "fsdp2", "devices": 2, "batch_size": 2,
     "max_steps": 2, "uneven_eos": True, "export": False},
    # multi-turn tool rollouts, one calculator environment per sample on the rank that samples it
    {"name": "grpo_tools_ddp", "method": "grpo", "strategy": "ddp", "devices": 2, "batch_size": 2, "max_steps": 3,
     "tools": True, "lr": 3e-4, "export": False},
    {"name": "grpo_tools_fsdp2", "method": "grpo", "strategy": "fsdp2", "devices": 2, "batch_size": 2, "max_steps": 3,
     "tools": True, "lr": 3e-4, "export": False},
    # rank 0's episodes end at their first call, rank 1's go on: the sharded ranks must agree on the turns
    {"name": "grpo_tools_fsdp2_uneven", "method": "grpo", "strategy": "fsdp2", "devices": 2, "batch_size": 2,
     "max_steps": 2, "tools": True, "uneven_turns": True, "lr": 3e-4, "export": False},
    # the uninterrupted run of test_resume.py's 2-process resume
    {"name": "grpo_fsdp2_full", "method": "grpo", "strategy": "fsdp2", "devices": 2, "batch_size": 2,
     "steps_per_generation": 2, "max_steps": 8, "checkpoint": True},
]  # fmt: skip
SINGLE_RUNS = [
    {"name": "sft_single", "method": "sft", "batch_size": 16},
    {"name": "dpo_single", "method": "dpo", "batch_size": 8},
    {"name": "reward_single", "method": "reward", "batch_size": 8},
    {"name": "grpo_single", "method": "grpo", "batch_size": 4, "rollout": "per_prompt"},
    {"name": "rloo_single", "method": "rloo", "batch_size": 4, "rollout": "per_prompt"},
    {"name": "grpo_tools_single", "method": "grpo", "batch_size": 4, "max_steps": 3, "tools": True, "lr": 3e-4,
     "export": False},
    {"name": "kto_single", "method": "kto", "batch_size": 8, "accumulate": 2},
]


def launch(runs: list[dict], root: Path, *, killed: bool = False, timeout: float = 900) -> None:
    """Run ``fit_script.py`` on ``runs`` (in ``root``); a ``killed`` launch must die of SIGKILL."""
    root.mkdir(parents=True, exist_ok=True)
    spec = root / f"runs-{uuid.uuid4().hex[:8]}.json"
    spec.write_text(json.dumps([{"root": str(root), **run} for run in runs]))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if killed:
        assert result.returncode == -9, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]


def metrics(run_dir: Path) -> dict[int, dict[str, str]]:
    """Logged rows by step over all CSVLogger versions (a resumed run logs to a new version);
    values as written (strings), so equal means bit-identical."""
    rows: dict[int, dict[str, str]] = {}
    for version in sorted((run_dir / "logs").iterdir(), key=lambda p: int(p.name.split("_")[1])):
        for row in csv.DictReader((version / "metrics.csv").open()):
            step = int(row.pop("step"))
            assert step not in rows, f"step {step} logged twice in {run_dir}"
            rows[step] = {k: v for k, v in row.items() if k.startswith("train/") and v != ""}
    return rows


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "export" / "final" / "model.safetensors")
