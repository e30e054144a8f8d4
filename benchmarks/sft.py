"""SFT throughput and peak memory, with and without packing.

    python benchmarks/sft.py                       # all packing modes, 3 repeats each, JSON to stdout
    python benchmarks/sft.py --packing bfd --repeats 5 --steps 20

Model: a random-init Llama (vocab 32000, hidden 384, 6 layers, ~23M parameters) so that compute,
not Python overhead, dominates. Data: 2,000 documents of 16-256 characters (one token per character
with the tiny tokenizer), batches of 8 sequences or 8 packs of up to 256 tokens. Each measurement runs
in a fresh process (so peak RSS is its own); the first 2 steps are warm-up and not timed.

Reported per mode: median training tokens/s (non-padding tokens that went through forward and
backward), median seconds per step, median peak RSS in MiB, and the padding share of the batches.
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


def run_once(packing: str, steps: int, batch_size: int, max_length: int, warmup: int = 2) -> dict:
    import lightning as L
    import torch

    from lit_posttrain import SFTDataModule, SFTModule

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    rows = [{"text": "".join(rng.choice(letters) for _ in range(rng.randint(16, max_length)))} for _ in range(2000)]
    tiny = str(ROOT / "examples" / "tiny-model")
    module = SFTModule(tiny, random_init=True, model_config=MODEL_CONFIG, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    dm = SFTDataModule(tiny, train_data=rows, batch_size=batch_size, max_length=max_length, packing=None if packing == "none" else packing)

    class Timer(L.Callback):
        def __init__(self):
            self.times, self.tokens, self.padded = [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()
            # real tokens: the pad id (0) never occurs in the generated text
            self.tokens.append(int((batch["input_ids"] != 0).sum()))
            self.padded.append(batch["input_ids"].numel())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps + warmup, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(module, dm)
    times, tokens = timer.times[warmup:], timer.tokens[warmup:]
    return {
        "packing": packing,
        "params_millions": round(sum(p.numel() for p in module.parameters()) / 1e6, 1),
        "tokens_per_s": sum(tokens) / sum(times),
        "s_per_step": statistics.median(times),
        "padding_share": 1 - sum(tokens) / sum(timer.padded[warmup:]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packing", nargs="+", default=["none", "bfd", "wrapped"], choices=["none", "bfd", "wrapped"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_once(args._child, args.steps, args.batch_size, args.max_length)))
        return
    results = {}
    for packing in args.packing:
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--_child", packing, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[packing] = {
            "params_millions": runs[0]["params_millions"],
            "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "median_s_per_step": round(statistics.median(r["s_per_step"] for r in runs), 3),
            "median_peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs), 1),
            "padding_share": round(statistics.median(r["padding_share"] for r in runs), 3),
            "runs": len(runs),
        }
    print(json.dumps({"benchmark": "sft", "batch_size": args.batch_size, "max_length": args.max_length,
                      "torch_threads": __import__("torch").get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
