"""Small PPO fits for tests/distributed/test_ppo_ddp.py, run as a script (Lightning's DDP launcher
starts the other process by running this same script again, so the fits cannot run inside pytest):

    python tests/distributed/ppo_fit_script.py RUNS.json

RUNS.json is a list of runs executed one after another in the same processes. Each run writes to
``<root>/<name>/``: ``logs/version_*/metrics.csv`` (CSVLogger, flushed every step),
``ckpt/last.ckpt`` (with ``checkpoint``: after every generation batch), ``export/final/`` (HubExport:
the policy) and ``value/`` (`PPOModule.export_value_model`).

Run keys (defaults in ``DEFAULTS``): ``strategy`` single | ddp; ``devices``; ``max_steps`` (optimizer
steps); ``batch_size`` (prompts per process); ``num_ppo_epochs``; ``num_mini_batches``;
``micro_batch_size``; ``checkpoint``; ``kill_at`` (SIGKILL when the generation batch after optimizer
step ``kill_at`` starts); ``resume`` (``ckpt_path="last"``); ``rollout`` ``hf`` or ``per_prompt``
(sample each prompt alone with the RNG seeded by its tokens, so completions do not depend on the
process or batch a prompt lands in: what lets a 2-process run be compared with a 1-process run).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

os.environ.setdefault("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = str(ROOT / "examples" / "tiny-model")
DATA = ROOT / "examples" / "data"

DEFAULTS = {
    "strategy": "single",
    "devices": 1,
    "max_steps": 4,
    "batch_size": 4,
    "num_ppo_epochs": 2,
    "num_mini_batches": 1,
    "micro_batch_size": None,
    "kill_at": None,
    "resume": False,
    "checkpoint": False,
    "rollout": "hf",
}


class KillAt(L.Callback):
    """SIGKILL this process when the generation batch after optimizer step ``step`` starts (no teardown)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PerPromptRollout:
    """Sample each prompt alone, with the global RNG seeded by the prompt's token ids."""

    def __init__(self, rollout):
        self.rollout = rollout

    def generate(self, model, prompt_ids, **kwargs):
        from lit_posttrain.rollout import RolloutOutput

        outputs = []
        for ids in prompt_ids:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sum((i + 1) * t for i, t in enumerate(ids)))
                outputs.append(self.rollout.generate(model, [ids], **kwargs))
        return RolloutOutput(
            completion_ids=[ids for out in outputs for ids in out.completion_ids],
            completions=[text for out in outputs for text in out.completions],
            truncated=[t for out in outputs for t in out.truncated],
        )


def fit(run: dict) -> None:
    from lit_posttrain.callbacks import HubExport
    from lit_posttrain.experimental.ppo import PPODataModule, PPOModule
    from lit_posttrain.rewards import PatternFractionReward

    run = {**DEFAULTS, **run}
    out = Path(run["root"]) / run["name"]
    L.seed_everything(0, verbose=False)
    module = PPOModule(
        TINY_MODEL,
        random_init=True,
        reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        max_completion_length=8,
        temperature=1.0,
        num_ppo_epochs=run["num_ppo_epochs"],
        num_mini_batches=run["num_mini_batches"],
        micro_batch_size=run["micro_batch_size"],
        missing_eos_penalty=0.1,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    if run["rollout"] == "per_prompt":
        module.rollout = PerPromptRollout(module.rollout)
    data = PPODataModule(TINY_MODEL, train_data=str(DATA / "prompts" / "train.jsonl"), batch_size=run["batch_size"])
    callbacks = [HubExport(dirpath=out / "export")]
    if run["checkpoint"] or run["resume"]:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0))
    if run["kill_at"] is not None:
        callbacks.append(KillAt(run["kill_at"]))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=run["devices"],
        strategy={"single": "auto", "ddp": "ddp"}[run["strategy"]],
        max_steps=run["max_steps"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=CSVLogger(out, name="logs", flush_logs_every_n_steps=1),
        callbacks=callbacks,
        enable_checkpointing=run["checkpoint"] or run["resume"],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, data, ckpt_path="last" if run["resume"] else None)
    module.export_value_model(out / "value")
    trainer.strategy.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same math in every process and run (bit-exact comparisons)
    for run in json.loads(Path(sys.argv[1]).read_text()):
        fit(run)
