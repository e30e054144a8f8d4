"""Learning-rate schedules that know the run's length: warmup, then decay to the last optimizer step.

`WarmupDecayLR` is TRL's (transformers') ``lr_scheduler_type`` + ``warmup_ratio`` in one
scheduler: the shipped real-model configs used to hand-compute ``total_iters`` for
``torch.optim.lr_scheduler.LinearLR``, and a wrong number silently holds the rate at 0 (or never
decays it). Here the total is the Trainer's ``estimated_stepping_batches`` (optimizer steps: it
accounts for ``max_steps``, epochs, accumulation and devices), given to the scheduler by the module
in ``configure_optimizers``:

    lr_scheduler:
      class_path: lit_posttrain.schedulers.WarmupDecayLR
      init_args: {warmup_ratio: 0.1, decay: cosine}

    factor(step) = step / warmup_steps                                  while step < warmup_steps
                 = min_lr_ratio + (1 - min_lr_ratio) * shape(progress)  after, progress in [0, 1]
    shape: cosine 0.5 * (1 + cos(pi * progress)), linear 1 - progress, constant 1
"""

from __future__ import annotations

import math
from typing import Literal

import torch


class WarmupDecayLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup, then cosine / linear / constant decay over the run's optimizer steps.

    Args:
        optimizer: the optimizer (given by the module).
        warmup_ratio: warmup length as a fraction of the run's optimizer steps (TRL's ``warmup_ratio``).
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_ratio`` when > 0.
        decay: ``cosine`` (default), ``linear`` or ``constant`` after the warmup.
        min_lr_ratio: the factor the decay ends at (0: the rate reaches 0 at the last step).
        num_training_steps: the run's optimizer steps; None: set by the module from
            ``trainer.estimated_stepping_batches`` (`set_num_training_steps`) before the first step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_ratio: float = 0.0,
        warmup_steps: int = 0,
        decay: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.0,
        num_training_steps: int | None = None,
    ):
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"WarmupDecayLR: warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if warmup_steps < 0:
            raise ValueError(f"WarmupDecayLR: warmup_steps must be >= 0, got {warmup_steps}")
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"WarmupDecayLR: decay must be one of ['cosine', 'linear', 'constant'], got {decay!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"WarmupDecayLR: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_ratio, self.warmup_steps, self.decay = warmup_ratio, warmup_steps, decay
        self.min_lr_ratio, self.num_training_steps = min_lr_ratio, num_training_steps
        super().__init__(optimizer, self.factor)

    def set_num_training_steps(self, num_training_steps: int | float) -> None:
        """Fix the run's length (``trainer.estimated_stepping_batches``) and apply the step-0 rate."""
        if not math.isfinite(num_training_steps) or num_training_steps < 1:
            raise ValueError(
                "WarmupDecayLR needs a finite number of optimizer steps: set trainer.max_steps or "
                f"trainer.max_epochs (the Trainer estimates {num_training_steps})"
            )
        self.num_training_steps = int(num_training_steps)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate after ``step`` optimizer steps."""
        total = self.num_training_steps
        if total is None:  # before the module sets the length: start at the warmup's first value
            return 0.0 if self.warmup_steps or self.warmup_ratio else 1.0
        warmup = self.warmup_steps or int(math.ceil(self.warmup_ratio * total))
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 1.0
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
