"""Small fits of SFT, DPO, reward modeling, GRPO and RLOO for the tests in tests/distributed, run as a script.

Lightning's DDP / ModelParallel launcher starts the other processes by running this same script
again, so multi-process fits cannot run inside pytest's process; the tests call

    python tests/distributed/fit_script.py RUNS.json

where RUNS.json is a list of runs executed one after another in the same processes (one start-up
for several fits). Each run writes to ``<root>/<name>/``:

    logs/version_*/metrics.csv   CSVLogger (flushed every step, so a killed run keeps its rows)
    ckpt/last.ckpt               with ``checkpoint: true`` (every optimizer step)
    export/final/                HubExport: the plain Hugging Face directory
    gathered.pt                  the full weights gathered by torch.distributed.checkpoint's own
                                 ``get_model_state_dict(full_state_dict=True)`` (rank 0), to check
                                 HubExport's gather against

Run keys (defaults in ``DEFAULTS``): ``method`` sft | dpo | reward | grpo | rloo (RLOO with its
default ``beta=0.05``, so with a reference model); ``strategy`` single | ddp | fsdp2;
``devices``; ``max_steps``; ``batch_size`` (per process: sequences, pairs or prompts);
``accumulate`` (SFT / DPO / reward: ``accumulate_grad_batches``; GRPO / RLOO: micro-batches per
optimizer step);
``precision``; ``checkpoint`` (ModelCheckpoint: ``last`` after every optimizer step); ``kill_at``
(SIGKILL the process when the step after optimizer step ``kill_at`` starts, i.e. after that step's
checkpoint and logged row: no teardown, like a lost node); ``resume`` (``ckpt_path="last"``);
``rollout`` ``hf`` or ``per_prompt`` (GRPO / RLOO: sample each prompt's group alone with the RNG seeded
by the prompt, so completions do not depend on which process or batch the prompt lands in: this is
what lets a 2-process run be compared with a 1-process run); ``uneven_eos`` (GRPO: every token
ends a completion on rank 0 only); ``steps_per_generation`` (GRPO / RLOO); ``dpo_loss_type`` and
``precompute_ref_logps`` (DPO); ``num_rows`` (first rows of the training file only); ``lr``;
``export`` (HubExport); ``tools`` (GRPO / RLOO: the warm-started tool caller with the
tool quickstart's calculator environment, one instance per sample, each recording its rank, process
and prompt in ``<root>/<name>/envs-<rank>.jsonl``; samples drawn by `PerSampleRollout`);
``uneven_turns`` (with ``tools``: rank 0's environments end every episode at its first call, so
rank 0 has no second turn while rank 1 does). ``method`` kto (mostly desirable unpaired rows built from the preference
pairs, so that KTO's reference point is positive) and bco (the pairs, unpaired) take ``accumulate``,
``precompute_ref_logps`` and ``num_rows`` too.
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
from lightning.pytorch.strategies import ModelParallelStrategy

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = str(ROOT / "examples" / "tiny-model")
DATA = ROOT / "examples" / "data"
sys.path.insert(0, str(ROOT / "examples"))  # tool_rewards: the tool quickstart's reward and environment

DEFAULTS = {
    "method": "sft",
    "strategy": "single",
    "devices": 1,
    "max_steps": 4,
    "batch_size": 8,
    "accumulate": 1,
    "precision": "32-true",
    "kill_at": None,
    "resume": False,
    "checkpoint": False,
    "rollout": "hf",
    "uneven_eos": False,
    "steps_per_generation": 1,
    "dpo_loss_type": "sigmoid",
    "precompute_ref_logps": False,
    "num_rows": None,
    "lr": None,
    "export": True,
    "tools": False,
    "uneven_turns": False,
}


class KillAt(L.Callback):
    """SIGKILL this process when the step after optimizer step ``step`` starts: like a node
    failure, no teardown, no final checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RankZeroStopsAtOnce(L.Callback):
    """On rank 0 every token ends a completion, on the other ranks only the real EOS ids: the ranks'
    completions have different lengths, which a sharded policy must survive (lockstep decoding)."""

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == 0:
            pl_module.model.generation_config.eos_token_id = list(range(pl_module.model.config.vocab_size))


class PerPromptRollout:
    """Sample each prompt's group alone, with the global RNG seeded by the prompt's token ids, so
    the completions do not depend on which process or batch the prompt lands in."""

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


class PerSampleRollout:
    """Sample every sequence alone, with the global RNG seeded by its token ids and by how many equal
    sequences came before it in the call (a group's G copies of a prompt draw different samples):
    the samples do not depend on the process or batch, and multi-turn tool rollouts (which call
    ``generate`` again with the trajectories so far) stay placement-independent turn after turn."""

    def __init__(self, rollout):
        self.rollout = rollout

    def generate(self, model, prompt_ids, **kwargs):
        from lit_posttrain.rollout import RolloutOutput

        # a sharded policy decodes in lockstep: every rank makes as many generate calls as the busiest
        # (agreed before any of them, so the collectives pair up in the same order on every rank)
        from lit_posttrain.rollout.hf import decodes_in_lockstep

        num_calls = len(prompt_ids)
        if decodes_in_lockstep(model):
            calls = torch.tensor([num_calls])
            torch.distributed.all_reduce(calls, op=torch.distributed.ReduceOp.MAX)
            num_calls = int(calls)
        outputs, seen = [], {}
        for ids in prompt_ids:
            k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sum((i + 1) * t for i, t in enumerate(ids)) + 1_000_003 * k)
                outputs.append(self.rollout.generate(model, [ids], **kwargs))
        for _ in range(num_calls - len(prompt_ids)):
            self.rollout.generate(model, [prompt_ids[0]], **{**kwargs, "max_completion_length": 1})
        return RolloutOutput(
            completion_ids=[ids for out in outputs for ids in out.completion_ids],
            completions=[text for out in outputs for text in out.completions],
            truncated=[t for out in outputs for t in out.truncated],
        )


def recording_calculator(log: Path, uneven_turns: bool = False):
    """The tool quickstart's environment (examples/tool_rewards.py), recording where each instance runs."""
    from tool_rewards import ProblemCalculator

    log.parent.mkdir(parents=True, exist_ok=True)

    class RecordingCalculator(ProblemCalculator):
        def reset(self, prompt: str) -> None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            with open(log.with_name(f"{log.name}-{rank}.jsonl"), "a") as f:
                f.write(json.dumps({"rank": rank, "pid": os.getpid(), "env": id(self), "prompt": prompt}) + "\n")
            self.rank = rank
            return super().reset(prompt)

        def step(self, call):
            observation, done = super().step(call)
            return observation, done or (uneven_turns and self.rank == 0)

    return RecordingCalculator


def rows(path: Path, num_rows: int | None):
    if num_rows is None:
        return str(path)
    return [json.loads(line) for line in path.read_text().splitlines()[:num_rows]]


def build(run: dict):
    """-> (module, datamodule, extra callbacks)."""
    method, batch_size, callbacks = run["method"], run["batch_size"], []
    if method == "sft":
        from lit_posttrain import SFTDataModule, SFTModule

        lr = run["lr"] or 3e-3
        module = SFTModule(TINY_MODEL, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
        train_data = rows(DATA / "sft" / "train.jsonl", run["num_rows"])
        data = SFTDataModule(TINY_MODEL, train_data=train_data, batch_size=batch_size, max_length=32)
    elif method == "dpo":
        from lit_posttrain import DPODataModule, DPOModule

        lr = run["lr"] or 1e-3
        from lit_posttrain.callbacks import ReferenceModel

        module = DPOModule(
            TINY_MODEL,
            random_init=True,
            loss_type=run["dpo_loss_type"],
            optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
        )
        train_data = rows(DATA / "preference" / "train.jsonl", run["num_rows"])
        data = DPODataModule(TINY_MODEL, train_data=train_data, batch_size=batch_size, max_length=32)
        callbacks.append(ReferenceModel(precompute_ref_logps=run["precompute_ref_logps"]))
    elif method == "kto":
        from lit_posttrain.callbacks import ReferenceModel
        from lit_posttrain.stable.kto import KTODataModule, KTOModule

        lr = run["lr"] or 1e-3
        # mostly desirable rows (every pair's chosen, every third pair's rejected), which raises the
        # mismatched rows' log-ratios too: z_ref > 0, so its reduction over ranks shows in the loss;
        # desirable_weight 0.4 puts 0.4 * 3 / 1 = 1.2 inside the paper's [1, 4/3]
        pairs = [json.loads(line) for line in (DATA / "preference" / "train.jsonl").read_text().splitlines()]
        train_data = []
        for i, pair in enumerate(pairs[: run["num_rows"] or 512]):
            train_data.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
            if i % 3 == 0:
                train_data.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
        module = KTOModule(
            TINY_MODEL, random_init=True, desirable_weight=0.4, optimizer=lambda p: torch.optim.AdamW(p, lr=lr)
        )
        data = KTODataModule(TINY_MODEL, train_data=train_data, batch_size=batch_size, max_length=32)
        callbacks.append(ReferenceModel(precompute_ref_logps=run["precompute_ref_logps"]))
    elif method == "bco":
        from lit_posttrain.callbacks import ReferenceModel
        from lit_posttrain.experimental.bco import BCODataModule, BCOModule

        lr = run["lr"] or 1e-3
        module = BCOModule(TINY_MODEL, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
        train_data = rows(DATA / "preference" / "train.jsonl", run["num_rows"])  # pairs, unpaired by the DataModule
        data = BCODataModule(TINY_MODEL, train_data=train_data, batch_size=batch_size, max_length=32)
        callbacks.append(ReferenceModel(precompute_ref_logps=run["precompute_ref_logps"]))
    elif method == "reward":
        from lit_posttrain import RewardDataModule, RewardModule

        lr = run["lr"] or 1e-3
        # centering gives the rewards' common offset a gradient: without it the Bradley-Terry loss
        # ignores the offset and Adam turns its rounding noise into lr-sized steps
        module = RewardModule(
            TINY_MODEL,
            random_init=True,
            center_rewards_coefficient=0.01,
            optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
        )
        train_data = rows(DATA / "preference" / "train.jsonl", run["num_rows"])
        data = RewardDataModule(TINY_MODEL, train_data=train_data, batch_size=batch_size, max_length=32)
    elif method in ("grpo", "rloo"):
        from lit_posttrain import GRPODataModule, GRPOModule, RLOODataModule, RLOOModule
        from lit_posttrain.rewards import PatternFractionReward

        lr = run["lr"] or 3e-3
        num_generations = 4
        Module, DataModule = (
            (GRPOModule, GRPODataModule) if method == "grpo" else (RLOOModule, RLOODataModule)
        )
        module = Module(
            TINY_MODEL,
            random_init=True,
            reward_funcs=[PatternFractionReward(pattern="[0-9]")],
            num_generations=num_generations,
            max_completion_length=8,
            steps_per_generation=run["steps_per_generation"],
            micro_batch_size=batch_size * num_generations // run["steps_per_generation"] // run["accumulate"],
            optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
        )
        if run["tools"]:
            from tool_rewards import final_answer

            caller = str(ROOT / "examples" / "tiny-tool-caller")
            module = Module(
                caller, reward_funcs=[final_answer], tool_call_format="tiny", max_tool_calling_iterations=2,
                environment_factory=recording_calculator(Path(run["root"]) / run["name"] / "envs", run["uneven_turns"]),
                num_generations=num_generations, max_completion_length=48,
                micro_batch_size=batch_size * num_generations, optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
            )  # fmt: skip
            module.rollout = PerSampleRollout(module.rollout)
            data = DataModule(caller, train_data=rows(DATA / "tools" / "train.jsonl", 64), batch_size=batch_size)
            return module, data, callbacks
        if run["rollout"] == "per_prompt":
            module.rollout = PerPromptRollout(module.rollout)
        train_data = rows(DATA / "prompts" / "train.jsonl", run["num_rows"])
        data = DataModule(TINY_MODEL, train_data=train_data, batch_size=batch_size)
    else:
        raise ValueError(f"unknown method {method!r}")
    return module, data, callbacks


def fit(run: dict) -> None:
    from lit_posttrain.callbacks import HubExport

    run = {**DEFAULTS, **run}
    out = Path(run["root"]) / run["name"]
    L.seed_everything(0, verbose=False)
    module, data, callbacks = build(run)
    if run["strategy"] == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=run["devices"], tensor_parallel_size=1)
    else:
        strategy = {"single": "auto", "ddp": "ddp"}[run["strategy"]]
    if run["export"]:
        callbacks.append(HubExport(dirpath=out / "export"))
    if run["checkpoint"] or run["resume"]:
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
        )
    if run["kill_at"] is not None:
        callbacks.append(KillAt(run["kill_at"]))
    if run["uneven_eos"]:
        callbacks.append(RankZeroStopsAtOnce())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=run["devices"],
        strategy=strategy,
        precision=run["precision"],
        max_steps=run["max_steps"],
        accumulate_grad_batches=1 if run["method"] in ("grpo", "rloo") else run["accumulate"],
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
    gathered = _gathered_state_dict(module.model)
    if trainer.is_global_zero:
        torch.save(gathered, out / "gathered.pt")
    trainer.strategy.barrier()


def _gathered_state_dict(model) -> dict:
    """Full weights through PyTorch's own API (independent of HubExport's gather)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not torch.distributed.is_initialized():
        return {name: t.detach().clone() for name, t in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same math in every process and run (bit-exact comparisons)
    for run in json.loads(Path(sys.argv[1]).read_text()):
        fit(run)
