"""SFT throughput and peak memory, with and without packing.

    python benchmarks/sft.py                       # all packing modes, 3 repeats each, JSON to stdout
    python benchmarks/sft.py --packing bfd --repeats 5 --steps 20
    python benchmarks/sft.py --packing bfd --precision bf16-mixed --profile-steps 2   # + top ops (stderr)
    python benchmarks/sft.py --packing bfd --precision bf16-true --model medium       # a 75M model
    python benchmarks/sft.py --packing bfd --precision bf16-true --compile            # with CompileLayers

Model: a random-init Llama (vocab 32000, hidden 384, 6 layers, ~22M parameters) so that compute,
not Python overhead, dominates; ``--model medium``: hidden 768, 8 layers, 12 heads (~75M), to see
how a figure (bf16 against fp32, MFU) moves with the model's size. Data: 2,000 documents of 16-256
characters (one token per character with the tiny tokenizer), batches of 8 sequences or 8 packs of
up to 256 tokens. Each measurement runs in a fresh process (so peak RSS is its own); the first 2
steps are warm-up and not timed.

Reported per mode: median training tokens/s (non-padding tokens that went through forward and
backward), median seconds per step, median peak RSS in MiB, and the padding share of the batches.
Where the time goes (`perf.py`): model FLOPs per token (``6 N + 12 L H Q T`` at T = ``--max-length``),
the achieved model GFLOP/s over the measured steps (each step's FLOPs from its real tokens and row
length), the MFU against this machine's matmul peak probed at the start of each run (fp32 for
``--precision 32-true``, bf16 for ``bf16-mixed`` / ``bf16-true``), and the mean seconds per step
spent in data, forward, backward, optimizer and other. The run logs its metrics every
``--log-every-n-steps`` (10) steps to a CSV file in a temporary directory (a run's default path has a
logger; SFT computes its accuracy and entropy only on the steps written and the last, `SFTModule`
departure 3: ``--log-every-n-steps 1`` measures them on every step). ``--profile-steps N`` profiles N more steps
after the measured ones with ``torch.profiler`` and prints the top operators to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 512,
}
MODELS = {
    "small": MODEL_CONFIG,
    "medium": {**MODEL_CONFIG, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
               "num_attention_heads": 12, "num_key_value_heads": 4},
}  # fmt: skip


def run_once(packing: str, steps: int, batch_size: int, max_length: int, precision: str = "32-true",
             profile_steps: int = 0, warmup: int = 2, log_every_n_steps: int = 10, model: str = "small",
             compile: bool = False) -> dict:  # fmt: skip
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from perf import ProfileSteps, StepBreakdown, flops_per_token, model_flops, performance, probe_peaks

    from lit_posttrain import SFTDataModule, SFTModule
    from lit_posttrain.callbacks import CompileLayers

    peaks = probe_peaks()  # this machine's matmul peak now, with the threads the run uses

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    rows = [{"text": "".join(rng.choice(letters) for _ in range(rng.randint(16, max_length)))} for _ in range(2000)]
    tiny = str(ROOT / "examples" / "tiny-model")
    module = SFTModule(tiny, random_init=True, model_config=MODELS[model], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True))
    dm = SFTDataModule(tiny, train_data=rows, batch_size=batch_size, max_length=max_length, packing=None if packing == "none" else packing)

    class Timer(L.Callback):
        def __init__(self):
            self.times, self.tokens, self.padded, self.flops = [], [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()
            # real tokens: the pad id (0) never occurs in the generated text
            self.tokens.append(int((batch["input_ids"] != 0).sum()))
            self.padded.append(batch["input_ids"].numel())
            self.flops.append(model_flops(module.model.config, tokens=self.tokens[-1], seq_len=batch["input_ids"].size(1)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.start)

    timer, breakdown = Timer(), StepBreakdown(warmup, steps)
    callbacks = [breakdown, timer] + ([ProfileSteps(start=warmup + steps, steps=profile_steps)] if profile_steps else [])
    callbacks += [CompileLayers()] if compile else []  # compiles during the warm-up steps
    with tempfile.TemporaryDirectory() as log_dir:  # metrics every 10 steps to a CSV file, as a run with a logger
        trainer = L.Trainer(
            accelerator="cpu", max_steps=steps + warmup + profile_steps, precision=precision,
            logger=CSVLogger(log_dir), log_every_n_steps=log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(module, dm)
    measured = slice(warmup, warmup + steps)
    times, tokens = timer.times[measured], timer.tokens[measured]
    return {
        "packing": packing,
        "params_millions": round(sum(p.numel() for p in module.parameters()) / 1e6, 1),
        "tokens_per_s": sum(tokens) / sum(times),
        "s_per_step": statistics.median(times),
        "padding_share": 1 - sum(tokens) / sum(timer.padded[measured]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "flops_per_token": flops_per_token(module.model.config, max_length),
        **performance(sum(timer.flops[measured]), sum(times), peaks, precision),
        "breakdown": breakdown.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packing", nargs="+", default=["none", "bfd", "wrapped"], choices=["none", "bfd", "wrapped"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many steps after the measured ones")
    parser.add_argument("--log-every-n-steps", type=int, default=10, help="Lightning's metric logging interval")
    parser.add_argument("--model", default="small", choices=list(MODELS), help="small: ~22M parameters; medium: ~75M")
    parser.add_argument("--compile", action="store_true", help="with CompileLayers (decoder layers compiled; the loss stays eager, in place)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_once(args._child, args.steps, args.batch_size, args.max_length, args.precision,
                                  args.profile_steps, log_every_n_steps=args.log_every_n_steps, model=args.model,
                                  compile=args.compile)))  # fmt: skip
        return
    results = {}
    for packing in args.packing:
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--_child", packing, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--precision", args.precision, "--profile-steps", str(args.profile_steps),
                   "--log-every-n-steps", str(args.log_every_n_steps), "--model", args.model]
            cmd += ["--compile"] if args.compile else []
            # the profiler's table goes to stderr: shown when asked for, else captured
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.profile_steps else subprocess.PIPE,
                                 text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[packing] = {
            "params_millions": runs[0]["params_millions"],
            "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "median_s_per_step": round(statistics.median(r["s_per_step"] for r in runs), 3),
            "median_peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs), 1),
            "padding_share": round(statistics.median(r["padding_share"] for r in runs), 3),
            "flops_per_token": runs[0]["flops_per_token"],
            **{f"median_{key}": round(statistics.median(r[key] for r in runs), 4)
               for key in ("gflops", "peak_gflops_fp32", "peak_gflops_bf16", "mfu")},
            "median_breakdown": {key: round(statistics.median(r["breakdown"][key] for r in runs), 4)
                                 for key in runs[0]["breakdown"]},
            "runs": len(runs),
        }  # fmt: skip
    print(json.dumps({"benchmark": "sft", "model": args.model, "batch_size": args.batch_size, "max_length": args.max_length,
                      "precision": args.precision, "compile": args.compile, "torch_threads": __import__("torch").get_num_threads(),
                      "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
