"""PPO on 2 CPU processes (DDP, gloo) equals 1 process with the same global batch, and a PPO run
killed with SIGKILL and resumed from its last checkpoint equals the uninterrupted run bit for bit
(policy, value model, optimizer state of both, each rank's sampling RNG)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = HERE / "ppo_fit_script.py"
RTOL, ATOL = 1e-4, 1e-6

# 2 generation batches x (2 epochs x 2 mini-batches): shuffling draws from the module's generator
RESUME = {"batch_size": 4, "num_ppo_epochs": 2, "num_mini_batches": 2, "max_steps": 12, "kill_at": 4}
# the same global batch of 4 prompts: 1 process x 4 and 2 processes x 2, micro-batches of 1 completion
SAME_BATCH = {"num_ppo_epochs": 2, "max_steps": 6, "rollout": "per_prompt", "micro_batch_size": 1}


def launch(runs: list[dict], root: Path, *, killed: bool = False, timeout: float = 900) -> None:
    root.mkdir(parents=True, exist_ok=True)
    spec = root / f"runs-{uuid.uuid4().hex[:8]}.json"
    spec.write_text(json.dumps([{"root": str(root), **run} for run in runs]))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(spec)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    if killed:
        assert result.returncode == -9, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]


def metrics(run_dir: Path) -> dict[int, dict[str, str]]:
    """Logged rows by step over all CSVLogger versions, values as written (equal = bit-identical)."""
    rows: dict[int, dict[str, str]] = {}
    for version in sorted((run_dir / "logs").iterdir(), key=lambda p: int(p.name.split("_")[1])):
        for row in csv.DictReader((version / "metrics.csv").open()):
            step = int(row.pop("step"))
            assert step not in rows, f"step {step} logged twice in {run_dir}"
            rows[step] = {k: v for k, v in row.items() if k.startswith("train/") and v != ""}
    return rows


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "policy": load_file(run_dir / "export" / "final" / "model.safetensors"),
        "value": load_file(run_dir / "value" / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ppo")
    # one process: the uninterrupted run, and the 1-process side of the DDP comparison
    launch(
        [{"name": "full", **RESUME, "kill_at": None, "checkpoint": True}, {"name": "single", **SAME_BATCH, "batch_size": 4}],
        root,
    )
    launch([{"name": "resumed", **RESUME, "checkpoint": True}], root, killed=True)  # SIGKILL ends the process
    launch([{"name": "resumed", **RESUME, "kill_at": None, "resume": True}], root)
    launch([{"name": "ddp", **SAME_BATCH, "batch_size": 2, "strategy": "ddp", "devices": 2}], root)
    return root


def test_killed_and_resumed_equals_uninterrupted(runs):
    """kill -9 after the first generation batch (4 optimizer steps), resume from ``last``: every logged
    metric of every step and the final policy and value-model weights are bit-identical."""
    full, resumed = metrics(runs / "full"), metrics(runs / "resumed")
    assert sorted(full) == sorted(resumed) == [0, 1, 2]  # one row per generation batch
    killed_rows = [int(r["step"]) for r in csv.DictReader((runs / "resumed" / "logs" / "version_0" / "metrics.csv").open())]
    assert max(killed_rows) == 0  # killed mid-run; the resumed run logged the rest
    assert resumed == full
    full_weights, resumed_weights = weights(runs / "full"), weights(runs / "resumed")
    for model in ("policy", "value"):
        assert full_weights[model].keys() == resumed_weights[model].keys()
        for name, weight in full_weights[model].items():
            assert torch.equal(resumed_weights[model][name], weight), (model, name)


def test_ddp_two_processes_equal_one_process(runs):
    """2 processes x 2 prompts log the same metrics as 1 process x 4 prompts (rtol 1e-4) and end with the same
    policy and value model (atol 1e-4): whitening over every rank's tokens, the loss a token mean over the
    global optimizer step, metrics reduced over ranks."""
    single, ddp = metrics(runs / "single"), metrics(runs / "ddp")
    assert sorted(single) == sorted(ddp) == [0, 1, 2]
    for step in single:
        assert single[step].keys() == ddp[step].keys()
        for name, value in single[step].items():
            assert math.isclose(float(ddp[step][name]), float(value), rel_tol=RTOL, abs_tol=ATOL), (step, name)
    losses = [float(single[step]["train/loss/value_avg"]) for step in single]
    assert losses[0] != losses[-1]  # the steps did something
    single_weights, ddp_weights = weights(runs / "single"), weights(runs / "ddp")
    for model in ("policy", "value"):
        for name, weight in single_weights[model].items():
            torch.testing.assert_close(ddp_weights[model][name], weight, atol=1e-4, rtol=0)
