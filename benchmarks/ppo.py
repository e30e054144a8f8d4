"""PPO vs GRPO throughput and peak memory on the same workload. Prints JSON.

The workload of benchmarks/grpo.py: a randomly initialised Llama with a realistic vocabulary (32000
tokens, hidden 512, 8 layers, ~58M parameters) and a word-level tokenizer built locally; every
completion runs to ``max_completion_length``. Both methods train on the same completions per
generation batch: GRPO samples ``--num-generations`` per prompt for ``--batch-size`` prompts, PPO
one per prompt for ``batch_size * num_generations`` prompts. Both score them with the same reward
model (a random-init one-output sequence classifier of the policy's shape, through
`RewardModelScorer`), so PPO holds its four models (policy, value model, reference, reward model)
and GRPO (TRL's default ``beta=0``) two (policy, reward model). PPO makes ``--num-ppo-epochs``
optimizer steps per generation batch (default 1, GRPO's one; TRL's default is 4: the training part
of the step scales with it). Nothing is downloaded.

    python benchmarks/ppo.py                   # one run of each
    python benchmarks/ppo.py --repeats 3       # three runs of each (fresh processes) and their medians

``samples_per_s`` counts completions trained on per second of training step (generation included);
``peak_rss_mb`` is each run's resident-memory high-water mark (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo import StepTimer, _peak_rss_mb, _reset_peak_rss, make_model_dir

os.environ.setdefault("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", "1")


def make_reward_model(model_dir: Path, path: Path) -> Path:
    """A random-init one-output sequence classifier of the policy's shape, saved with its tokenizer."""
    from lit_posttrain.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), task="sequence-classification", random_init=True, init_seed=1,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(args, model_dir: Path, reward_dir: Path) -> dict:
    from lit_posttrain import GRPODataModule, GRPOModule
    from lit_posttrain.experimental.ppo import PPODataModule, PPOModule
    from lit_posttrain.rewards.model import RewardModelScorer

    L.seed_everything(args.seed)
    reward = RewardModelScorer(str(reward_dir), batch_size=args.batch_size * args.num_generations)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-5, fused=True)
    if args.method == "grpo":
        module = GRPOModule(
            str(model_dir), random_init=True, reward_funcs=[reward], num_generations=args.num_generations,
            max_completion_length=args.max_completion_length, micro_batch_size=args.micro_batch_size,
            optimizer=optimizer,
        )  # fmt: skip
        prompts_per_batch, DataModule = args.batch_size, GRPODataModule
    else:
        module = PPOModule(
            str(model_dir), random_init=True, reward_funcs=[reward], max_completion_length=args.max_completion_length,
            temperature=1.0, num_ppo_epochs=args.num_ppo_epochs, micro_batch_size=args.micro_batch_size,
            optimizer=optimizer,
        )  # fmt: skip
        prompts_per_batch, DataModule = args.batch_size * args.num_generations, PPODataModule
    generator = torch.Generator().manual_seed(args.seed)
    rows = [
        {"prompt": " ".join(f"t{i}" for i in torch.randint(2, args.vocab_size, (args.prompt_length,), generator=generator).tolist())}
        for _ in range(prompts_per_batch * (args.steps + args.warmup))
    ]  # fmt: skip
    datamodule = DataModule(str(model_dir), rows, batch_size=prompts_per_batch, max_prompt_length=args.prompt_length)
    timer = StepTimer(args.warmup)
    steps_per_batch = args.num_ppo_epochs if args.method == "ppo" else 1
    trainer = L.Trainer(
        max_steps=(args.steps + args.warmup) * steps_per_batch,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    _reset_peak_rss()
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    wall = time.perf_counter() - start
    total = sum(s["total_s"] for s in timer.steps)
    generation = sum(s["generation_s"] for s in timer.steps)
    samples = len(timer.steps) * args.batch_size * args.num_generations
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "trained_params": trained,
        "samples_per_s": samples / total,
        "step_s": total / len(timer.steps),
        "generation_s_per_step": generation / len(timer.steps),
        "training_s_per_step": (total - generation) / len(timer.steps),
        "peak_rss_mb": _peak_rss_mb(),
        "fit_wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="both", choices=["both", "ppo", "grpo"])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="GRPO prompts per generation batch")
    parser.add_argument("--num-generations", type=int, default=8, help="GRPO completions per prompt")
    parser.add_argument("--num-ppo-epochs", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="measured generation batches per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method, each in a fresh process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.method == "both" or args.repeats > 1:  # each run in a fresh process: its own peak memory
        given = sys.argv[1:]
        skip = {"--repeats", "--method"}
        argv = [a for i, a in enumerate(given) if a.split("=")[0] not in skip and (i == 0 or given[i - 1] not in skip)]
        methods = ["ppo", "grpo"] if args.method == "both" else [args.method]
        runs = {method: [] for method in methods}
        for _ in range(args.repeats):
            for method in methods:
                out = subprocess.run(
                    [sys.executable, __file__, *argv, "--method", method, "--repeats", "1"],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                runs[method] += json.loads(out.stdout)["runs"][method]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = make_model_dir(Path(tmp) / "policy", args.vocab_size, args.hidden_size, args.num_layers)
            reward_dir = make_reward_model(model_dir, Path(tmp) / "reward")
            runs = {args.method: [run(args, model_dir, reward_dir)]}
    report = {
        "benchmark": "ppo_vs_grpo",
        "config": {k: v for k, v in vars(args).items() if k not in ("repeats", "method")},
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "runs": runs,
        "median": {
            method: {key: statistics.median(r[key] for r in method_runs) for key in method_runs[0]}
            for method, method_runs in runs.items()
        },
    }
    if set(runs) == {"ppo", "grpo"}:
        ppo, grpo = report["median"]["ppo"], report["median"]["grpo"]
        report["ppo_over_grpo"] = {
            "samples_per_s": ppo["samples_per_s"] / grpo["samples_per_s"],
            "peak_rss_mb": ppo["peak_rss_mb"] / grpo["peak_rss_mb"],
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
