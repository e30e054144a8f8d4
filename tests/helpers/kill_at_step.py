"""A callback that kills its own process with SIGKILL at a given optimizer step: a crash at a known
point, for resume tests that run the real CLI (``class_path: tests.helpers.kill_at_step.KillAtStep``,
importable because the CLI puts the working directory, the repository root, on ``sys.path``)."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
