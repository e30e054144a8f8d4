"""WarmupDecayLR: warmup then decay over the run's optimizer steps, as the Trainer counts them."""

import math

import pytest
import torch

from lit_posttrain.schedulers import WarmupDecayLR


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_warmup_factors_by_hand():
    """10 steps, warmup_ratio 0.2: 0, 0.5, then cosine from 1 to 0 over steps 2..10 (hand-derived)."""
    optimizer = _optimizer()
    scheduler = WarmupDecayLR(optimizer, warmup_ratio=0.2, decay="cosine")
    assert optimizer.param_groups[0]["lr"] == 0.0  # length unknown yet: the warmup's first value
    scheduler.set_num_training_steps(10)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup = ceil(0.2 * 10) = 2 steps; after it progress = (step - 2) / 8
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert lrs == pytest.approx(expected)
    assert lrs[2] == pytest.approx(1.0) and lrs[6] == pytest.approx(0.5) and lrs[10] == pytest.approx(0.0)


def test_linear_and_min_lr_ratio():
    """Linear decay from the base rate to min_lr_ratio x base at the last step; warmup_steps overrides the ratio."""
    optimizer = _optimizer(lr=2.0)
    scheduler = WarmupDecayLR(optimizer, warmup_steps=1, warmup_ratio=0.5, decay="linear", min_lr_ratio=0.1,
                              num_training_steps=5)  # fmt: skip
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup 1 step; then 2 * (0.1 + 0.9 * (1 - (s - 1) / 4))
    assert lrs == pytest.approx([0.0, 2.0, 2 * (0.1 + 0.9 * 0.75), 2 * (0.1 + 0.9 * 0.5), 2 * (0.1 + 0.9 * 0.25), 0.2])


def test_bad_values_name_the_option():
    """Out-of-range options and an unbounded run raise naming what to set."""
    with pytest.raises(ValueError, match="warmup_ratio"):
        WarmupDecayLR(_optimizer(), warmup_ratio=1.5)
    with pytest.raises(ValueError, match="decay must be one of"):
        WarmupDecayLR(_optimizer(), decay="step")
    with pytest.raises(ValueError, match="trainer.max_steps"):
        WarmupDecayLR(_optimizer()).set_num_training_steps(float("inf"))
