"""GRPO throughput: samples/s, generation vs training time, peak memory. Prints JSON.

The model is a randomly initialised Llama with a realistic vocabulary (32000 tokens, hidden 512, 8
layers, ~58M parameters) and a locally built word-level tokenizer, so generation costs what it
costs on real models of this shape (a random policy almost never samples EOS: every completion runs
to ``max_completion_length``). Nothing is downloaded.

    python benchmarks/grpo.py                       # HF generate rollout, one run
    python benchmarks/grpo.py --repeats 3           # three runs (fresh processes) and their medians
    python benchmarks/grpo.py --compile --repeats 3 # with CompileLayers (training compiled, generation eager)
    python benchmarks/grpo.py --rollout vllm --repeats 3   # a colocated vLLM engine (VLLMRollout)
    python benchmarks/grpo.py --mode async --repeats 3     # AsyncGRPOModule: a vLLM engine process runs ahead

``--mode async`` trains `lit_posttrain.experimental.async_grpo.AsyncGRPOModule` on the same
workload (``--max-staleness``, default 1, ``--buffer-size``, default ``max_staleness + 1``): its
engine is a separate process, so the step breakdown shows no generation; instead the report has the
time the trainer waited for scored batches (``trainer_wait_s_per_step``) and the producer's own
time per step: in ``/generate`` (``producer_generation_s_per_step``), pushing weights
(``producer_sync_s_per_step``) and waiting on backpressure (``producer_wait_s_per_step``), with
the idle fractions of both sides. On a machine where both share the same cores the overlap cannot
shorten a step; ``expected_step_s_own_device`` is what a step would take with the engine on its own
device, max(training, generation + sync), from this run's stage times (on shared cores both are
inflated by the other side: an upper bound; docs/methods/async_grpo.md uses the synchronous run's
uncontended stage times instead).

Timing: ``generation_s`` is the time inside ``pl_module.rollout.generate`` (wrapped, not
replaced), ``training_s`` the rest of each ``training_step`` (rewards, log-probs, backward,
optimizer step); the first ``--warmup`` steps are not measured (vLLM's start-up happens before
the first step, its warm-up in it). ``--rollout vllm`` adds the `VLLMRollout` callback: its weight
sync runs inside ``generate`` and is also reported alone (``sync_s_per_step``, ``sync_fraction``
of the step); the importance-sampling correction reads its pi_old from the update's own forward
(one optimizer step per generation batch, the default), so it adds no forward.

Where the time goes (`perf.py`): ``flops_per_token`` is the training FLOPs per token
(``6 N + 12 L H Q T``, T = prompt + completion length); each measured step's model FLOPs count the
generation (a forward over every sample's prompt and completion tokens), the update (forward and
backward) and any no-grad pass (`StepFlops`); ``gflops`` is their sum over the measured steps'
time, ``mfu`` that over the matmul peak probed at the start of the run (fp32 for ``--precision
32-true``, bf16 for ``bf16-mixed`` / ``bf16-true``), and ``breakdown_*`` the mean seconds (and
share) per step in data, generation, weight_sync, forward (rewards and no-grad passes included),
backward, optimizer and other. ``--profile-steps N`` profiles N more steps after the measured
ones and prints the top operators to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from perf import (
    PRECISIONS,
    ProfileSteps,
    StepBreakdown,
    flops_per_token,
    model_flops,
    performance,
    probe_peaks,
)

from lit_posttrain import GRPODataModule, GRPOModule
from lit_posttrain.callbacks import CompileLayers, VLLMRollout
from lit_posttrain.experimental.async_grpo import AsyncGRPOModule
from lit_posttrain.rewards import PatternFractionReward

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON report


def make_model_dir(path: Path, vocab_size: int, hidden_size: int, num_layers: int) -> Path:
    """A config-only Llama directory with a word-level tokenizer of ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 8 / 3) // 64 * 64,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    config.save_pretrained(path)
    GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=1).save_pretrained(path)
    return path


def rollout_callbacks(args) -> list[L.Callback]:
    """The callbacks that swap in the rollout engine (none for the default HFRollout)."""
    if args.rollout == "hf":
        return []
    if args.rollout == "vllm":
        return [
            VLLMRollout(
                kv_cache_memory_bytes=args.vllm_kv_cache_mb * 2**20,
                max_model_len=args.prompt_length + args.max_completion_length,
                enforce_eager=args.vllm_enforce_eager,
                seed=args.seed,
            )
        ]
    raise ValueError(f"--rollout must be one of ['hf', 'vllm'], got {args.rollout!r}")


class StepFlops(L.Callback):
    """Each measured step's model FLOPs, from the token counts of its rollout (`perf.TimedRollout`).

    Per sample i with p_i prompt and c_i completion tokens, in rows of T = longest prompt + longest
    completion: generation is a forward over p_i + c_i tokens with c_i rows of logits; the update a
    forward and backward over p_i + c_i tokens with c_i rows of logits (``logits_to_keep``); every
    no-grad pass (the old log-probs when a generation batch makes several optimizer steps, the
    reference when ``beta > 0``) one more forward like the update's.
    """

    def __init__(self, warmup: int, steps: int, extra_forwards: int):
        self.warmup, self.num_steps, self.extra_forwards = warmup, steps, extra_forwards
        self.flops: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.warmup <= batch_idx < self.warmup + self.num_steps:
            return
        rollout = pl_module.rollout  # the perf.TimedRollout that StepBreakdown put around the engine
        prompts, completions = rollout.prompt_lengths, rollout.completion_lengths  # (N,), (N,)
        tokens, seq_len = sum(prompts) + sum(completions), max(prompts) + max(completions)
        config = pl_module.model.config
        forward = model_flops(config, tokens=tokens, seq_len=seq_len, lm_head_tokens=sum(completions), backward=False)
        update = model_flops(config, tokens=tokens, seq_len=seq_len, lm_head_tokens=sum(completions))
        self.flops.append(forward * (1 + self.extra_forwards) + update)


class AsyncSteps(L.Callback):
    """Each measured step's wall time and the producer's figures it logged (``async/*``)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.num_steps, self.steps = warmup, steps, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.warmup <= batch_idx < self.warmup + self.num_steps:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("async/")}
            self.steps.append({"step_s": time.perf_counter() - self.start, **metrics})


def run_async(args, model_dir: Path) -> dict:
    L.seed_everything(args.seed)
    staleness = args.max_staleness
    module = AsyncGRPOModule(
        str(model_dir),
        random_init=True,
        reward_funcs=[PatternFractionReward(pattern="t[0-9]")],
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        micro_batch_size=args.micro_batch_size,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5, fused=True),
        max_staleness=staleness,
        buffer_size=args.buffer_size or staleness + 1,
        vllm_kv_cache_memory_bytes=args.vllm_kv_cache_mb * 2**20,
        vllm_max_model_len=args.prompt_length + args.max_completion_length,
        vllm_enforce_eager=args.vllm_enforce_eager,
    )
    datamodule = GRPODataModule(str(model_dir), _rows(args), batch_size=args.batch_size, max_prompt_length=args.prompt_length)
    record = AsyncSteps(args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_steps=args.steps + args.warmup, accelerator=args.accelerator, devices=1, precision=args.precision,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[record], default_root_dir=root,
        )  # fmt: skip
        _reset_peak_rss()
        trainer.fit(module, datamodule)
    steps = record.steps
    n, total = len(steps), sum(step["step_s"] for step in steps)
    per_step = {key: sum(step[f"async/{key}"] for step in steps) / n for key in (
        "trainer_wait_s", "producer_wait_s", "generation_s", "weight_sync_s")}  # fmt: skip
    samples = n * args.batch_size * args.num_generations
    training = total / n - per_step["trainer_wait_s"]
    return {
        "num_params": sum(p.numel() for p in module.model.parameters()),
        "samples_per_s": samples / total,
        "step_s": total / n,
        "trainer_wait_s_per_step": per_step["trainer_wait_s"],
        "training_s_per_step": training,
        "producer_generation_s_per_step": per_step["generation_s"],
        "producer_sync_s_per_step": per_step["weight_sync_s"],
        "producer_wait_s_per_step": per_step["producer_wait_s"],
        "trainer_idle_fraction": per_step["trainer_wait_s"] / (total / n),
        "producer_idle_fraction": per_step["producer_wait_s"] / (total / n),
        "expected_step_s_own_device": max(training, per_step["generation_s"] + per_step["weight_sync_s"]),
        "staleness_mean": sum(step["async/staleness/mean"] for step in steps) / n,
        "dropped_stale": steps[-1]["async/dropped_stale"],
        "peak_rss_mb": _peak_rss_mb(),  # the trainer process (the engine process is not counted)
    }


def _rows(args) -> list[dict]:
    generator = torch.Generator().manual_seed(args.seed)
    return [
        {"prompt": " ".join(f"t{i}" for i in torch.randint(2, args.vocab_size, (args.prompt_length,), generator=generator).tolist())}
        for _ in range(args.batch_size * (args.steps + args.warmup + args.profile_steps + 2))
    ]


def run(args, model_dir: Path) -> dict:
    if args.mode == "async":
        return run_async(args, model_dir)
    peaks = probe_peaks()  # this machine's matmul peak now, with the threads the run uses
    L.seed_everything(args.seed)
    module = GRPOModule(
        str(model_dir),
        random_init=True,
        reward_funcs=[PatternFractionReward(pattern="t[0-9]")],
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        micro_batch_size=args.micro_batch_size,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5, fused=True),
    )
    generator = torch.Generator().manual_seed(args.seed)
    rows = [
        {
            "prompt": " ".join(
                f"t{i}"
                for i in torch.randint(
                    2, args.vocab_size, (args.prompt_length,), generator=generator
                ).tolist()
            )
        }
        for _ in range(args.batch_size * (args.steps + args.warmup))
    ]
    datamodule = GRPODataModule(
        str(model_dir), rows, batch_size=args.batch_size, max_prompt_length=args.prompt_length
    )
    # the breakdown wraps the rollout engine the rollout callbacks (listed before it) swapped in
    breakdown = StepBreakdown(args.warmup, args.steps, rollout=True)
    on_policy = module.num_iterations == 1 and module.steps_per_generation == 1
    extra_forwards = int(not on_policy) + int(module.beta != 0)
    step_flops = StepFlops(args.warmup, args.steps, extra_forwards)
    profile = [ProfileSteps(start=args.warmup + args.steps, steps=args.profile_steps)] if args.profile_steps else []
    trainer = L.Trainer(
        max_steps=args.steps + args.warmup + args.profile_steps,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*rollout_callbacks(args), breakdown, step_flops, *profile, *([CompileLayers()] if args.compile else [])],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    trainer.fit(module, datamodule)
    steps = breakdown.steps  # the measured steps, seconds per category
    total = sum(sum(step.values()) - step["data"] for step in steps)  # step start to step end
    sync = sum(step["weight_sync"] for step in steps)
    generation = sum(step["generation"] for step in steps) + sync  # time inside generate (sync included)
    samples = len(steps) * args.batch_size * args.num_generations
    result = {
        "num_params": sum(p.numel() for p in module.model.parameters()),
        "samples_per_s": samples / total,
        "completion_tokens_per_s": samples * args.max_completion_length / total,
        "step_s": total / len(steps),
        "generation_s_per_step": generation / len(steps),
        "training_s_per_step": (total - generation) / len(steps),
        "generation_fraction": generation / total,
        "sync_s_per_step": sync / len(steps),
        "sync_fraction": sync / total,
        "peak_rss_mb": _peak_rss_mb(),  # this run (Linux); the process's peak so far elsewhere
        "flops_per_token": flops_per_token(module.model.config, args.prompt_length + args.max_completion_length),
        **performance(sum(step_flops.flops), total, peaks, args.precision),
        **{f"breakdown_{key}": value for key, value in breakdown.summary().items()},
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (Linux), so each run reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="sync", choices=["sync", "async"], help="async: AsyncGRPOModule")
    parser.add_argument("--max-staleness", type=int, default=1, help="--mode async")
    parser.add_argument("--buffer-size", type=int, default=None, help="--mode async (default max_staleness + 1)")
    parser.add_argument("--rollout", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--vllm-kv-cache-mb", type=int, default=512, help="vLLM KV-cache size (CPU: RAM)")
    parser.add_argument("--vllm-enforce-eager", action="store_true", help="skip vLLM's graph compilation")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generation batch")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs, each in a fresh process; medians are reported")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many steps after the measured ones")
    parser.add_argument("--compile", action="store_true",
                        help="with CompileLayers (training forwards compiled; HF generate stays eager)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.repeats > 1:  # each run in a fresh process: its own peak memory, no warm caches
        given = sys.argv[1:]
        argv = [a for i, a in enumerate(given) if not a.startswith("--repeats") and (i == 0 or given[i - 1] != "--repeats")]
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(  # the profiler's table goes to stderr: shown when asked for, else captured
                [sys.executable, __file__, *argv, "--repeats", "1"], check=True, stdout=subprocess.PIPE,
                stderr=None if args.profile_steps else subprocess.PIPE, text=True,
            )  # fmt: skip
            runs.append(json.loads(out.stdout)["runs"][0])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = make_model_dir(Path(tmp), args.vocab_size, args.hidden_size, args.num_layers)
            runs = [run(args, model_dir)]
    report = {
        "benchmark": "grpo",
        "rollout": "vllm (engine process, async)" if args.mode == "async" else args.rollout,
        "config": {k: v for k, v in vars(args).items() if k not in ("repeats",)},
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "median": {key: statistics.median(r[key] for r in runs) for key in runs[0]},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
