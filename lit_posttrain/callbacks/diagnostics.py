"""Training diagnostics: is the run learning? A callback that answers with numbers.

`LearningSignal` records chosen metrics at the first validation (run it before training with
``trainer.num_sanity_val_steps: -1``: the sanity check then covers the whole validation set) and
at the last one, and prints them side by side at the end of ``fit``:

    LearningSignal           before      after     change
    val/loss                 4.8521     1.2034    -3.6487
    val/mean_token_accuracy  0.0103     0.6012    +0.5909

The figures are also kept in ``callback.before`` / ``callback.after`` (dicts) for notebooks and tests.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class LearningSignal(L.Callback):
    """Print chosen validation metrics before and after training.

    Args:
        metrics: metric names as logged (e.g. ``val/loss``, ``val/rewards/accuracies``).
    """

    def __init__(self, metrics: list[str] | None = None):
        self.metrics = list(metrics) if metrics else ["val/loss"]
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = {name: float(trainer.callback_metrics[name]) for name in self.metrics if name in trainer.callback_metrics}
        if not self.before:
            self.before = values
        elif not trainer.sanity_checking:
            self.after = values

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = [f"{'LearningSignal':<28}{'before':>10}{'after':>10}{'change':>10}"]
        for name in self.metrics:
            before, after = self.before.get(name), self.after.get(name)
            if before is None or after is None:
                rows.append(f"{name:<28}{_fmt(before):>10}{_fmt(after):>10}{'':>10}")
            else:
                rows.append(f"{name:<28}{before:>10.4f}{after:>10.4f}{after - before:>+10.4f}")
        if not self.before:
            rows.append("(no validation before training: set trainer.num_sanity_val_steps: -1)")
        rank_zero_info("\n".join(rows))

    def state_dict(self) -> dict:
        return {"before": self.before, "after": self.after}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before, self.after = dict(state_dict["before"]), dict(state_dict["after"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
