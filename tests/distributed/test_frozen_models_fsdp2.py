"""Under FSDP2 (2 CPU processes) the frozen models (TeacherModel, ReferenceModel's copy of the policy) are sharded like
the policy: each process holds about half of their bytes, and the sharded models give the unsharded models' logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "frozen_models_fsdp2.py"
REPO = SCRIPT.parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen_fsdp2")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("role", ["teacher", "reference"])
def test_each_process_holds_about_half(ranks, role):
    """Each rank's local shards of the frozen model hold 40-60 % of the full model's bytes (dim-0 shards of every
    parameter; uneven only by a row where a dimension is odd), and the two ranks' shards add up to the whole."""
    local = [r[f"{role}_bytes"][0] for r in ranks]
    full = ranks[0][f"{role}_bytes"][1]
    assert all(r[f"{role}_sharded"] for r in ranks)
    for part in local:
        assert 0.4 * full <= part <= 0.6 * full, (part, full)
    assert sum(local) == full


@pytest.mark.parametrize("role", ["teacher", "reference"])
def test_sharded_logits_equal_unsharded(ranks, role):
    """The sharded teacher gives the shipped teacher's logits and the sharded reference those of the initial
    policy (the same float32 math after the all-gather: equal up to 1e-5)."""
    for r in ranks:
        assert r[f"{role}_max_diff"] < 1e-5, r


def test_teacher_frozen_and_outside_the_module(ranks):
    """After 3 training steps the sharded teacher is bit-identical to the shipped weights, in eval mode, and none of
    its parameters is a parameter of the module."""
    for r in ranks:
        assert r["teacher_unchanged"] and not r["teacher_training"] and not r["teacher_in_module"]


def test_precompute_with_a_sharded_reference(ranks):
    """DPO's precomputed reference log-probs under FSDP2 with an odd number of batches (3 on rank 0, 2 on rank 1):
    the pass finishes (the rank with fewer batches keeps the collectives in step), every row has a value (a
    log-prob, < 0; a row left out would be 0) and both ranks hold the same values."""
    values = [r["dpo_ref_logps"] for r in ranks]
    assert len(values[0]) == 40 and all(v < 0 for v in values[0])
    assert values[0] == values[1]
