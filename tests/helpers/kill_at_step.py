"""A callback that signals its own process at a given optimizer step: a crash (SIGKILL, the default) or
a polite stop (``signal: SIGTERM``) at a known point, for resume tests that run the real CLI
(``class_path: tests.helpers.kill_at_step.KillAtStep``, importable because the CLI puts the working
directory, the repository root, on ``sys.path``)."""

import os
import signal as signals

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int, signal: str = "SIGKILL"):
        self.step, self.signal = step, getattr(signals, signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
