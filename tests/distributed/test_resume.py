"""Exact resume: a run killed with SIGKILL in the middle of an epoch and resumed with
``ckpt_path="last"`` ends with bit-identical weights and logs bit-identical metrics, step by step,
to the run that was never interrupted (CPU, one thread per process, same math in both).

What has to come back for that: the data order and the sampler's position in the epoch
(`LookaheadLoader` state, also inside a gradient-accumulation window's lookahead), optimizer and
scheduler state, module buffers (``num_tokens``, DPO's ``bco_pair`` running mean), the reference
log-probs (precomputed again from the initial policy) and, for GRPO, each rank's sampling RNG
(Lightning does not checkpoint the global RNG: the module owns a ``torch.Generator`` per rank and
saves all ranks' states).
"""

from __future__ import annotations

import csv

import pytest
import torch
from distributed_runs import MULTI_RUNS, exported, launch, metrics

SINGLE = {
    # accumulation 2: the kill lands after a whole window; the loader's lookahead must not lose batches
    "sft": {"method": "sft", "batch_size": 8, "accumulate": 2, "max_steps": 6, "kill_at": 3},
    # precomputed reference log-probs and the bco_pair running-mean buffer
    "dpo": {"method": "dpo", "batch_size": 8, "max_steps": 6, "kill_at": 3, "num_rows": 256,
            "precompute_ref_logps": True, "dpo_loss_type": ["sigmoid", "bco_pair"]},
    # two optimizer steps per generation batch: shuffled mini-batches draw from the module's generator too
    "grpo": {"method": "grpo", "batch_size": 4, "steps_per_generation": 2, "max_steps": 8, "kill_at": 4},
    # BCO's reward shift delta (checkpointed buffers), accumulation 2 (the step's first micro-batch
    # adds the other's rewards), precomputed reference log-probs
    "bco": {"method": "bco", "batch_size": 8, "accumulate": 2, "max_steps": 6, "kill_at": 3, "num_rows": 256,
            "precompute_ref_logps": True},
}  # fmt: skip


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    uninterrupted = [
        {**run, "name": f"{method}_full", "kill_at": None, "checkpoint": True}
        for method, run in SINGLE.items()
    ]
    launch(uninterrupted, root)
    for method, run in SINGLE.items():  # one process per killed run: SIGKILL ends the process
        launch([{**run, "name": f"{method}_resumed", "checkpoint": True}], root, killed=True)
    resumed = [
        {**run, "name": f"{method}_resumed", "kill_at": None, "resume": True}
        for method, run in SINGLE.items()
    ]
    launch(resumed, root)
    return root


def _assert_same_run(full_dir, resumed_dir, num_rows: int, kill_row: int):
    """The same rows (logged steps) and the same final weights; the killed run logged rows < kill_row."""
    full, resumed = metrics(full_dir), metrics(resumed_dir)
    assert sorted(full) == sorted(resumed) == list(range(num_rows))
    killed_rows = [
        int(row["step"])
        for row in csv.DictReader((resumed_dir / "logs" / "version_0" / "metrics.csv").open())
    ]
    assert max(killed_rows) == kill_row - 1  # it was killed mid-run, the resumed run logged the rest
    assert resumed == full  # every metric, every step, as written
    full_weights, resumed_weights = exported(full_dir), exported(resumed_dir)
    assert full_weights.keys() == resumed_weights.keys()
    for name, weight in full_weights.items():
        assert torch.equal(resumed_weights[name], weight), name


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo", "bco"])
def test_killed_and_resumed_equals_uninterrupted(method, single_process_runs):
    """One process: kill -9 after optimizer step ``kill_at`` (mid-epoch), resume from ``last``:
    final weights bit-identical, every logged metric identical."""
    run = SINGLE[method]
    per_row = run.get("steps_per_generation", 1)  # GRPO logs one row per generation batch
    full, resumed = single_process_runs / f"{method}_full", single_process_runs / f"{method}_resumed"
    _assert_same_run(full, resumed, run["max_steps"] // per_row, run["kill_at"] // per_row)


def test_bco_delta_resumes_exactly(single_process_runs):
    """BCO's delta after the kill (steps 3-5, logged by the resumed run) is bit-identical to the uninterrupted
    run's and keeps moving: the resumed run started from the checkpointed running mean, not from 0."""
    full, resumed = metrics(single_process_runs / "bco_full"), metrics(single_process_runs / "bco_resumed")
    deltas = [resumed[step]["train/delta"] for step in (3, 4, 5)]
    assert deltas == [full[step]["train/delta"] for step in (3, 4, 5)]
    # step 0: policy == reference, rewards 0 up to the rounding of differently padded batches
    assert len(set(deltas)) == 3 and abs(float(full[0]["train/delta"])) < 1e-5 < abs(float(deltas[-1]))


def test_fsdp2_grpo_killed_and_resumed_equals_uninterrupted(multi_runs):
    """Two processes, FSDP2 (sharded distributed checkpoint), GRPO: both ranks killed after
    optimizer step 4 of 8, resumed from ``last``: each rank's sampler position and sampling RNG come
    back (rank 1's from the states rank 0 wrote), weights and metrics bit-identical."""
    run = next(r for r in MULTI_RUNS if r["name"] == "grpo_fsdp2_full")
    base = {k: v for k, v in run.items() if k not in ("name", "checkpoint")}
    launch(
        [{**base, "name": "grpo_fsdp2_resumed", "checkpoint": True, "kill_at": 4}], multi_runs, killed=True
    )
    launch([{**base, "name": "grpo_fsdp2_resumed", "resume": True}], multi_runs)
    _assert_same_run(
        multi_runs / "grpo_fsdp2_full", multi_runs / "grpo_fsdp2_resumed", num_rows=4, kill_row=2
    )
