"""DPO throughput and memory: pairs/s and peak RSS, with the reference on the fly or precomputed. Prints JSON.

The model is a randomly initialised Llama with a realistic vocabulary (32000 tokens, hidden 512, 8
layers, ~58M parameters) and a locally built word-level tokenizer; rows are random token
sequences (prompt 128 + completion 128 tokens: sequences of 256). Nothing is downloaded.

    python benchmarks/dpo.py                  # both modes, one run each
    python benchmarks/dpo.py --repeats 3      # three fresh runs per mode and their medians
    python benchmarks/dpo.py --compile        # with CompileLayers (the policy compiles; the reference stays eager)

Each run is a fresh subprocess, so its peak RSS (``ru_maxrss``) belongs to that run alone:
``peak_rss_delta_mb`` is the peak during ``fit`` minus the RSS just before ``fit`` (the policy
already built): what the reference, gradients, optimizer state and activations add.
``pairs_per_s`` counts the measured training steps only (the first ``--warmup`` steps are not
measured; ``pairs_per_s_best_step`` uses the fastest one, which moves less with other load); with ``--mode precompute`` the one pass over the data that precomputes the reference
log-probs is reported separately as ``precompute_s``.

Where the time goes (`perf.py`): ``flops_per_token`` is the policy's training FLOPs per token
(``6 N + 12 L H Q T``, T = prompt + completion length); each measured step's model FLOPs are the
policy's forward and backward over the batch's real tokens plus, with ``--mode on_the_fly``, the
reference's forward over the same tokens (``2 N + 4 L H Q T``). ``gflops`` is their sum over the
measured steps' time, ``mfu`` that over the matmul peak probed at the start of the run (fp32 for
``--precision 32-true``, bf16 for ``bf16-mixed`` / ``bf16-true``), and ``breakdown_*`` the mean
seconds (and share) per step in data, forward (policy and reference), backward, optimizer and other.
``--profile-steps N`` profiles N more steps after the measured ones and prints the top operators
to stderr. The run logs its metrics every ``--log-every-n-steps`` (10) steps to a CSV file in a temporary
directory (a run's default path has a logger; DPO computes its logits / entropy statistics only on
the steps written and the last, `DPOModule` departure 6: ``--log-every-n-steps 1`` measures them on
every step).
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

MODES = ("on_the_fly", "precompute")


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


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(args) -> dict:
    """One run in this process (the worker)."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from perf import ProfileSteps, StepBreakdown, flops_per_token, model_flops, performance, probe_peaks

    from lit_posttrain import DPODataModule, DPOModule
    from lit_posttrain.callbacks import CompileLayers, ReferenceModel

    class StepTimer(L.Callback):
        def __init__(self, warmup: int, steps: int):
            self.warmup, self.num_steps, self.steps, self.flops, self.fit_start = warmup, steps, [], [], None

        def on_fit_start(self, trainer, pl_module):  # runs before ReferenceModel's precompute pass
            self.fit_start = time.perf_counter()

        def on_train_start(self, trainer, pl_module):
            self.precompute_s = time.perf_counter() - self.fit_start

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.warmup <= batch_idx < self.warmup + self.num_steps:
                self.steps.append(time.perf_counter() - self.start)
                # model FLOPs: the policy's forward + backward, and the reference's forward when on the fly
                tokens, seq_len = int(batch["attention_mask"].sum()), batch["input_ids"].size(1)  # 2B rows
                config = pl_module.model.config
                flops = model_flops(config, tokens=tokens, seq_len=seq_len)
                if args.mode == "on_the_fly":
                    flops += model_flops(config, tokens=tokens, seq_len=seq_len, backward=False)
                self.flops.append(flops)

    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = probe_peaks()  # this machine's matmul peak now, with the threads the run uses
    L.seed_everything(args.seed)
    module = DPOModule(
        args.model_dir, random_init=True, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True)
    )
    generator = torch.Generator().manual_seed(args.seed)

    def text(n: int) -> str:
        return " ".join(
            f"t{i}" for i in torch.randint(2, args.vocab_size, (n,), generator=generator).tolist()
        )

    completion = args.completion_length - 1  # + EOS
    rows = [
        {"prompt": text(args.prompt_length), "chosen": text(completion), "rejected": text(completion)}
        for _ in range(args.batch_size * (args.steps + args.warmup))
    ]
    datamodule = DPODataModule(
        args.model_dir,
        rows,
        batch_size=args.batch_size,
        max_length=args.prompt_length + args.completion_length,
    )
    timer, breakdown = StepTimer(args.warmup, args.steps), StepBreakdown(args.warmup, args.steps)
    # the timer first: its on_fit_start runs before the precompute pass
    reference = ReferenceModel(precompute_ref_logps=args.mode == "precompute")
    profile = [ProfileSteps(start=args.warmup + args.steps, steps=args.profile_steps)] if args.profile_steps else []
    log_dir = tempfile.TemporaryDirectory()  # metrics to a CSV file, as a run with a logger
    trainer = L.Trainer(
        max_steps=args.steps + args.warmup + args.profile_steps,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        logger=CSVLogger(log_dir.name),
        log_every_n_steps=args.log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, reference, breakdown, *profile, *([CompileLayers()] if args.compile else [])],
    )
    rss_before = current_rss_mb()
    trainer.fit(module, datamodule)
    total = sum(timer.steps)
    result = {
        "num_params": sum(p.numel() for p in module.model.parameters()),
        "pairs_per_s": len(timer.steps) * args.batch_size / total,
        "tokens_per_s": len(timer.steps)
        * args.batch_size
        * 2
        * (args.prompt_length + args.completion_length)
        / total,
        "step_s": total / len(timer.steps),
        # the fastest measured step: less sensitive to other processes on a shared machine
        "pairs_per_s_best_step": args.batch_size / min(timer.steps),
        "precompute_s": timer.precompute_s,
        "rss_before_fit_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    result["peak_rss_delta_mb"] = result["peak_rss_mb"] - rss_before
    result["flops_per_token"] = flops_per_token(module.model.config, args.prompt_length + args.completion_length)
    result.update(performance(sum(timer.flops), total, peaks, args.precision))
    result.update({f"breakdown_{key}": value for key, value in breakdown.summary().items()})
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES + ("both",), default="both")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step (2x sequences per forward)")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per mode; medians are reported")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many steps after the measured ones")
    parser.add_argument("--compile", action="store_true", help="with CompileLayers (the policy's layers compiled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every-n-steps", type=int, default=10, help="Lightning's metric logging interval")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # worker: the model directory
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run(args)))
        return

    import torch

    modes = MODES if args.mode == "both" else (args.mode,)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp), args.vocab_size, args.hidden_size, args.num_layers)
        argv = [a for a in sys.argv[1:] if not a.startswith("--mode") and a not in MODES + ("both",)]
        for mode in modes:
            runs = []
            for _ in range(args.repeats):
                command = [
                    sys.executable,
                    __file__,
                    *argv,
                    "--worker",
                    "--mode",
                    mode,
                    "--model-dir",
                    str(model_dir),
                ]
                # the profiler's table goes to stderr: shown when asked for, else captured
                stderr = None if args.profile_steps else subprocess.PIPE
                out = subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=stderr, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            results[mode] = {
                "runs": runs,
                "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
            }
    report = {
        "benchmark": "dpo",
        "config": {
            k: v for k, v in vars(args).items() if k not in ("repeats", "worker", "model_dir", "mode")
        },
        "torch_threads": args.threads or torch.get_num_threads(),
        "repeats": args.repeats,
        **results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
