"""lit-posttrain and TRL side by side: the same model, data, batch, precision and optimizer, in fresh processes.

    python benchmarks/vs_trl.py sft                      # 3 interleaved repeats per library, a table
    python benchmarks/vs_trl.py dpo --repeats 5 --json dpo.json
    python benchmarks/vs_trl.py grpo --vllm              # + lit-posttrain GRPO with VLLMRollout
    python benchmarks/vs_trl.py sft --plain              # + a plain PyTorch loop over the same model
    python benchmarks/vs_trl.py sft --plain --compile    # + both again with their decoder layers compiled
    python benchmarks/vs_trl.py sft --steps 1 --warmup 1 --repeats 1 --max-length 128   # a smoke run

TRL is not a dependency of lit-posttrain: ``pip install "lit-posttrain[bench]"`` (TRL >= 1.16).

What runs (defaults are the workloads of issue #18). Model: a random-init Llama (4 layers, hidden
256, 4 heads of 64, MLP 640, vocabulary 32,000, untied LM head), built once with a fixed seed and
saved with a word-level tokenizer (token ``t<i>`` is id i; nothing is downloaded) to a temporary
directory that both libraries load from, so both start from the same weights. Data: random token
sequences generated once and written to a JSONL file that both read.
- ``sft``: plain-text documents of 16-512 tokens (+ EOS), packed with best-fit decreasing into
  rows of ``--max-length`` 512, 8 rows per step. lit-posttrain: `SFTDataModule(packing="bfd")`,
  8 rows of 512; TRL: ``SFTConfig(packing=True)`` (its default ``packing_strategy="bfd"``, which is
  padding-free: the 8 packs are concatenated into one row of up to 4,096 tokens).
- ``dpo``: 4 pairs per step, prompt 128 + completion 127 tokens + EOS; the reference model computes
  its log-probs on the fly (no precompute) in both.
- ``grpo``: 8 prompts of 32 tokens x 4 generations x 64 completion tokens per step, sampled with HF
  ``generate`` (TRL ``use_vllm=False``; lit-posttrain's default `HFRollout`); one optimizer step
  per generation batch, ``beta=0``, ``loss_type="dapo"`` in both. The reward is the share of
  even token ids in the completion (varies between samples, so advantages are not all 0).
  ``--vllm`` adds a third run: lit-posttrain with `VLLMRollout` (colocated engine; TRL still uses
  HF generate).
Both libraries: fused AdamW (``torch.optim.AdamW(fused=True)``, both defaults: TRL's ``optim`` is
``adamw_torch_fused``; betas 0.9/0.999, eps 1e-8, weight decay 0) at the
same constant ``--lr`` (default: TRL's default for the method), gradient clipping at norm 1.0
(TRL's default), no gradient checkpointing (TRL's configs default to it: it is turned off), the
same ``--precision`` (``32-true``: TRL ``bf16=False``; ``bf16-mixed``: TRL ``bf16=True``, i.e.
autocast; ``bf16-true``: the model loaded in bf16 in both), metrics logged every 10 optimizer steps
(TRL's ``logging_steps`` default; TRL with ``report_to="none"``, lit-posttrain to a ``CSVLogger``: a
run's default path has a logger, and some metrics are computed only on the steps it writes), no
checkpoints. Everything else is each library's default for the method (TRL's metrics,
lit-posttrain's `TrainingDiagnostics`).
``--plain`` (sft) adds a third run: a plain PyTorch loop over the same model (`plain_run`: random
tokens, no packing, full logits, no Lightning and no metrics), the floor a library should not fall
below; its ratio is printed as ``lit-posttrain/plain-pytorch``. ``--compile`` adds lit-posttrain with
`CompileLayers` (its decoder layers through ``torch.compile``; the loss stays eager, in place) and, with ``--plain``, the
plain loop with its decoder layers compiled the same way (its loss is transformers' own): the first
steps compile, so keep ``--warmup`` >= 2. TRL runs eager in every case.

Measured: every run is a fresh subprocess (its peak RSS is its own); the libraries alternate within
each repeat and start in the other order in the next one. Each run does ``--warmup`` (2) +
``--steps`` (10) + ``--cooldown`` (1) optimizer steps; the wall time from the end of the last warm-up
step to the end of the last measured step (TRL: a ``TrainerCallback.on_step_end``; lit-posttrain: a
Lightning ``on_train_batch_end``) covers exactly ``--steps`` steps, data loading and logging included,
the same way for all. The measured steps are the steady state of a long run: with metrics logged every
10 steps, 10 measured steps hold one logged step, as a long run's every tenth; the run's final step,
which does end-of-run work a long run does once (lit-posttrain computes its token statistics on it,
`SFTModule` departure 3), is the unmeasured cool-down. (Until 2026-12-02 the default was 4 measured
steps and no cool-down: the last measured step was the run's last, so lit-posttrain's SFT window held one
statistics step in four.) Rates:
SFT tokens/s (input tokens of the measured steps, padding excluded), DPO pairs/s, GRPO samples/s
(completions). Peak RSS: the process's ``ru_maxrss`` (model, data, optimizer and everything the
library imports). Reported per library: the median rate and peak RSS over the repeats, the median
achieved model GFLOP/s (the rate times the workload's model FLOPs per unit, `perf.model_flops`, the
same for both libraries) and MFU against the matmul peak probed once at start-up, and the ratios
lit-posttrain / TRL. The machine's load average is printed before and after: on a shared machine
absolute figures move with it; the ratios of interleaved runs much less.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

WORKLOADS = ("sft", "dpo", "grpo")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")  # as perf.PRECISIONS (not imported: no lightning here)
UNITS = {"sft": "tokens/s", "dpo": "pairs/s", "grpo": "samples/s"}
DEFAULT_LR = {"sft": 2e-5, "dpo": 1e-6, "grpo": 1e-6}  # TRL's defaults for each method
RESULT_PREFIX = "VS_TRL_RESULT "  # marks the worker's result line among whatever the libraries print


# ---------------------------------------------------------------------------------------------
# Model, tokenizer and data: built once, read by both libraries
# ---------------------------------------------------------------------------------------------
def make_model_dir(path: Path, vocab_size: int, hidden_size: int, num_layers: int, seed: int) -> Path:
    """A random-init Llama saved with its weights and a word-level tokenizer of ``vocab_size`` tokens."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=1).save_pretrained(path)
    return path


def make_rows(args) -> list[dict]:
    """The workload's rows: random words ``t<i>`` (one token each), from ``--seed``."""
    rng = random.Random(args.seed)

    def text(n: int) -> str:
        return " ".join(f"t{rng.randrange(2, args.vocab_size)}" for _ in range(n))

    if args.workload == "sft":  # documents of 16..max_length tokens; ~2.5x the packs the run needs
        num_docs = int(
            2.5
            * args.batch_size
            * total_steps(args)
            * args.max_length
            / ((16 + args.max_length) / 2)
        )
        return [{"text": text(rng.randint(16, args.max_length))} for _ in range(num_docs)]
    if args.workload == "dpo":  # completions of completion_length - 1 tokens + EOS
        # a leading space: TRL tokenizes prompt + completion as one string, where "t5" + "t7" would be one word
        n = args.completion_length - 1
        return [
            {"prompt": text(args.prompt_length), "chosen": " " + text(n), "rejected": " " + text(n)}
            for _ in range(args.batch_size * total_steps(args))
        ]
    return [{"prompt": text(args.prompt_length)} for _ in range(args.batch_size * total_steps(args))]


def even_token_reward(completions, **kwargs) -> list[float]:
    """Share of the completion's tokens ``t<i>`` with an even id (0 for an empty completion)."""
    rewards = []
    for completion in completions:
        ids = [int(i) for i in re.findall(r"\bt(\d+)\b", completion)]
        rewards.append(sum(i % 2 == 0 for i in ids) / len(ids) if ids else 0.0)
    return rewards


def workload_flops_per_unit(args, config) -> float:
    """Model FLOPs of one SFT token, one DPO pair or one GRPO sample of the workload (`perf.model_flops`)."""
    from perf import model_flops

    if args.workload == "sft":  # forward + backward over rows of max_length
        return model_flops(config, tokens=1, seq_len=args.max_length)
    if args.workload == "dpo":  # two sequences: the policy's forward + backward, the reference's forward
        tokens, seq_len = (
            2 * (args.prompt_length + args.completion_length),
            args.prompt_length + args.completion_length,
        )
        return model_flops(config, tokens=tokens, seq_len=seq_len) + model_flops(
            config, tokens=tokens, seq_len=seq_len, backward=False
        )
    # grpo: generation (a forward, one row of logits per completion token) + the update's forward and backward
    tokens, completion = args.prompt_length + args.max_completion_length, args.max_completion_length
    return model_flops(
        config, tokens=tokens, seq_len=tokens, lm_head_tokens=completion, backward=False
    ) + model_flops(config, tokens=tokens, seq_len=tokens, lm_head_tokens=completion)


# ---------------------------------------------------------------------------------------------
# Workers: one run of one library, in this (fresh) process
# ---------------------------------------------------------------------------------------------
def lit_posttrain_run(args) -> tuple[list[float], list[float]]:
    """Train with lit-posttrain; returns (units of work per step, wall-clock end of each step)."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from lit_posttrain import DPODataModule, DPOModule, GRPODataModule, GRPOModule, SFTDataModule, SFTModule
    from lit_posttrain.callbacks import CompileLayers, ReferenceModel, VLLMRollout

    class StepEnds(L.Callback):
        def __init__(self):
            self.units, self.ends = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if args.workload == "sft":  # input tokens, padding (id 0, never in the data) excluded
                self.units.append(int((batch["input_ids"] != 0).sum()))
            elif args.workload == "dpo":  # (2B, T): chosen rows, then rejected rows
                self.units.append(batch["input_ids"].size(0) // 2)
            else:
                self.units.append(len(batch["prompt_ids"]) * args.num_generations)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    L.seed_everything(args.seed)
    optimizer = lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
    callbacks = []
    if args.workload == "sft":
        module = SFTModule(args.model_dir, optimizer=optimizer)
        datamodule = SFTDataModule(
            args.model_dir, args.data, batch_size=args.batch_size, max_length=args.max_length, packing="bfd"
        )
    elif args.workload == "dpo":
        module = DPOModule(args.model_dir, optimizer=optimizer)
        datamodule = DPODataModule(
            args.model_dir, args.data, batch_size=args.batch_size,
            max_length=args.prompt_length + args.completion_length, max_prompt_length=args.prompt_length,
        )  # fmt: skip
        callbacks.append(ReferenceModel())  # a frozen copy, log-probs on the fly
    else:
        module = GRPOModule(
            args.model_dir, reward_funcs=[even_token_reward], num_generations=args.num_generations,
            max_completion_length=args.max_completion_length, optimizer=optimizer, max_grad_norm=1.0,
        )  # fmt: skip
        datamodule = GRPODataModule(
            args.model_dir, args.data, batch_size=args.batch_size, max_prompt_length=args.prompt_length
        )
        if args.worker == "lit-posttrain+vllm":
            callbacks.append(VLLMRollout(
                kv_cache_memory_bytes=512 * 2**20, max_model_len=args.prompt_length + args.max_completion_length,
                seed=args.seed,
            ))  # fmt: skip
    if (args.worker or "").endswith("+compile"):
        callbacks.append(CompileLayers())  # the decoder layers through torch.compile (the loss stays eager)
    steps = StepEnds()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=total_steps(args),
        gradient_clip_val=None if args.workload == "grpo" else 1.0,  # GRPO clips itself (max_grad_norm)
        # metrics logged every 10 optimizer steps, TRL's logging_steps default, to a CSV file (TRL keeps its
        # log history in memory with report_to="none"): the default path of a run, which has a logger
        logger=CSVLogger(args.output_dir),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[*callbacks, steps],
    )
    trainer.fit(module, datamodule)
    return steps.units, steps.ends


def trl_run(args) -> tuple[list[float], list[float]]:
    """Train with TRL; returns (units of work per step, wall-clock end of each step)."""
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    tokens: list[int] = []  # SFT: each step's input tokens

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that counts each step's input tokens (padding excluded), as lit-posttrain's run does."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int((inputs["input_ids"] != 0).sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    dataset = load_dataset("json", data_files=args.data, split="train")
    precision = {
        "32-true": {"bf16": False},
        "bf16-mixed": {"bf16": True},  # accelerate's autocast, as Lightning's bf16-mixed
        "bf16-true": {"bf16": False, "model_init_kwargs": {"dtype": torch.bfloat16}},  # bf16 weights
    }[args.precision]
    common = dict(
        output_dir=args.output_dir,
        max_steps=total_steps(args),
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused",  # TRL's default, as lit-posttrain's fused AdamW
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,  # TRL's default is True; lit-posttrain's is False
        use_cpu=args.device == "cpu",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
        **precision,
    )
    steps = StepEnds()
    if args.workload == "sft":
        config = SFTConfig(
            per_device_train_batch_size=args.batch_size, packing=True, max_length=args.max_length, **common
        )
        trainer = CountingSFTTrainer(
            model=args.model_dir, args=config, train_dataset=dataset, callbacks=[steps]
        )
        trainer.train()
        return tokens, steps.ends
    if args.workload == "dpo":
        config = DPOConfig(
            per_device_train_batch_size=args.batch_size, max_length=args.prompt_length + args.completion_length,
            precompute_ref_log_probs=False, **common,
        )  # fmt: skip
        trainer = DPOTrainer(model=args.model_dir, args=config, train_dataset=dataset, callbacks=[steps])
        trainer.train()
        return [args.batch_size] * len(steps.ends), steps.ends
    samples = args.batch_size * args.num_generations  # TRL's batch counts completions
    config = GRPOConfig(
        per_device_train_batch_size=samples, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, use_vllm=False, beta=0.0, loss_type="dapo", **common,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=args.model_dir,
        reward_funcs=even_token_reward,
        args=config,
        train_dataset=dataset,
        callbacks=[steps],
    )
    trainer.train()
    return [samples] * len(steps.ends), steps.ends


def plain_run(args) -> tuple[list[float], list[float]]:
    """SFT as a plain PyTorch loop (``--plain``): the same model, ``--batch-size`` x ``--max-length`` random
    tokens per step (no padding, no packing: one causal sequence per row), full logits and transformers'
    cross-entropy, the same AdamW and clipping at 1.0; no Lightning, no metrics, no logging. Returns
    (tokens per step, wall-clock end of each step)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device)
    model.train()
    if (args.worker or "").endswith("+compile"):  # the decoder layers' forward through torch.compile, as CompileLayers
        compiled = torch.compile(type(model.model.layers[0]).forward, dynamic=True)
        for layer in model.model.layers:
            layer.forward = types.MethodType(compiled, layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    generator = torch.Generator().manual_seed(args.seed)
    units, ends = [], []
    for _ in range(total_steps(args)):
        input_ids = torch.randint(2, args.vocab_size, (args.batch_size, args.max_length), generator=generator)
        input_ids = input_ids.to(args.device)
        with autocast:
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the step's end: as a logged loss would, wait for the device
        units.append(input_ids.numel())
        ends.append(time.perf_counter())
    return units, ends


def total_steps(args) -> int:
    """Optimizer steps of one run: warm-up, measured, cool-down."""
    return args.warmup + args.steps + args.cooldown


def measured_window(args, units: list[float], ends: list[float]) -> tuple[list[float], float, list[float]]:
    """The measured steps ``warmup+1 .. warmup+steps`` of a run's per-step work and end times: their work,
    the wall time from the end of the last warm-up step to the end of the last measured one, and each
    measured step's time (the cool-down steps after them are left out)."""
    last = args.warmup + args.steps
    step_s = [b - a for a, b in zip(ends[args.warmup - 1 : last - 1], ends[args.warmup : last])]
    return units[args.warmup : last], ends[last - 1] - ends[args.warmup - 1], step_s


def worker(args) -> dict:
    """One run: train, then the rate over the measured steps and the process's peak RSS."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = {"trl": trl_run, "plain-pytorch": plain_run, "plain-pytorch+compile": plain_run}.get(args.worker, lit_posttrain_run)
    units, ends = run(args)
    if len(ends) != total_steps(args):
        raise RuntimeError(f"{args.worker}: expected {total_steps(args)} steps, timed {len(ends)}")
    measured, seconds, step_s = measured_window(args, units, ends)
    result = {
        "library": args.worker,
        "rate": sum(measured) / seconds,
        "unit": UNITS[args.workload],
        "median_step_s": statistics.median(step_s),
        "units_per_step": statistics.mean(measured),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available() and args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ---------------------------------------------------------------------------------------------
# Parent: build the model and data, run the workers interleaved, report
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per library (fresh processes, interleaved)"
    )
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per run")
    parser.add_argument(
        "--warmup", type=int, default=2, help="optimizer steps before the measured ones (>= 1)"
    )
    parser.add_argument(
        "--cooldown", type=int, default=1, help="optimizer steps after the measured ones, not measured (>= 0)"
    )
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument(
        "--lr", type=float, default=None, help="AdamW learning rate (default: TRL's for the method)"
    )
    parser.add_argument("--vllm", action="store_true", help="grpo: also run lit-posttrain with VLLMRollout")
    parser.add_argument("--plain", action="store_true", help="sft: also run a plain PyTorch loop (full logits)")
    parser.add_argument("--compile", action="store_true",
                        help="also run lit-posttrain with CompileLayers (and, with --plain, the plain loop with its layers compiled)")  # fmt: skip
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the report as JSON to PATH ('-' or no value: stdout, instead of the table)")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    model = parser.add_argument_group("model (a random-init Llama)")
    model.add_argument("--vocab-size", type=int, default=32000)
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--num-layers", type=int, default=4)
    data = parser.add_argument_group("workload sizes (default: the method's workload above)")
    data.add_argument(
        "--batch-size", type=int, default=None, help="sft: packed rows (8); dpo: pairs (4); grpo: prompts (8)"
    )
    data.add_argument("--max-length", type=int, default=512, help="sft: tokens per packed row")
    data.add_argument("--prompt-length", type=int, default=None, help="dpo: 128; grpo: 32")
    data.add_argument(
        "--completion-length", type=int, default=128, help="dpo: completion tokens, EOS included"
    )
    data.add_argument("--num-generations", type=int, default=4, help="grpo: completions per prompt")
    data.add_argument("--max-completion-length", type=int, default=64, help="grpo: tokens per completion")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the library this process runs
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = {"sft": 8, "dpo": 4, "grpo": 8}[args.workload]
    if args.prompt_length is None:
        args.prompt_length = {"sft": 0, "dpo": 128, "grpo": 32}[args.workload]
    if args.lr is None:
        args.lr = DEFAULT_LR[args.workload]
    if args.vllm and args.workload != "grpo":
        parser.error(f"--vllm applies to grpo only, got workload {args.workload!r}")
    if args.plain and args.workload != "sft":
        parser.error(f"--plain applies to sft only, got workload {args.workload!r}")
    if args.cooldown < 0:
        parser.error(f"--cooldown must be >= 0, got {args.cooldown}")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error(
            f"--warmup, --steps and --repeats must be >= 1, got {args.warmup}, {args.steps}, {args.repeats}"
        )
    return args


def worker_argv(args, library: str, model_dir: Path, data: Path, output_dir: Path) -> list[str]:
    """The command line that runs one library's run in a fresh process."""
    argv = [sys.executable, __file__, args.workload, "--worker", library, "--model-dir", str(model_dir),
            "--data", str(data), "--output-dir", str(output_dir)]  # fmt: skip
    for name in ("steps", "warmup", "cooldown", "precision", "lr", "device", "threads", "seed", "vocab_size", "hidden_size",
                 "num_layers", "batch_size", "max_length", "prompt_length", "completion_length", "num_generations",
                 "max_completion_length"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def summarize(args, runs: dict[str, list[dict]], peaks: dict[str, float], flops_per_unit: float) -> dict:
    """Medians per library and the ratios lit-posttrain / TRL."""
    from perf import compute_dtype

    peak = peaks[compute_dtype(args.precision)]
    libraries = {}
    for library, results in runs.items():
        rate = statistics.median(r["rate"] for r in results)
        libraries[library] = {
            "median_rate": rate,
            "rates": [r["rate"] for r in results],
            "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "median_step_s": statistics.median(r["median_step_s"] for r in results),
            "gflops": rate * flops_per_unit / 1e9,
            "mfu": rate * flops_per_unit / 1e9 / peak,
        }
    ratios = {}
    pairs = [(lib, "trl") for lib in libraries if lib.startswith("lit-posttrain")]
    pairs += [(lib, plain) for lib, plain in [("lit-posttrain", "plain-pytorch"), ("lit-posttrain+compile", "plain-pytorch"),
                                              ("lit-posttrain+compile", "plain-pytorch+compile")]
              if lib in libraries and plain in libraries]  # fmt: skip
    for library, baseline in pairs:
        ratios[f"{library}/{baseline}"] = {
            "rate": libraries[library]["median_rate"] / libraries[baseline]["median_rate"],
            "peak_rss": libraries[library]["median_peak_rss_mb"] / libraries[baseline]["median_peak_rss_mb"],
        }
    return {"libraries": libraries, "ratios": ratios}


def describe(args) -> str:
    if args.workload == "sft":
        return f"SFT, packed (bfd), {args.batch_size} x {args.max_length} tokens"
    if args.workload == "dpo":
        return f"DPO, {args.batch_size} pairs of {args.prompt_length} + {args.completion_length} tokens, reference on the fly"
    return (f"GRPO, HF generate, {args.batch_size} prompts of {args.prompt_length} tokens x {args.num_generations} "
            f"x {args.max_completion_length} tokens")  # fmt: skip


def print_table(report: dict) -> None:
    unit = report["unit"]
    print(f"{report['workload_description']}; {report['precision']}; {report['repeats']} interleaved repeat(s) of "
          f"{report['steps']} measured steps after {report['warmup']} warm-up (+ {report['cooldown']} cool-down); "
          f"torch threads {report['torch_threads']}")  # fmt: skip
    print(f"versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}")
    print(f"load average (1, 5, 15 min): before {report['load_before']}, after {report['load_after']}; "
          f"matmul peak fp32 {report['peak_gflops']['fp32']:.0f} / bf16 {report['peak_gflops']['bf16']:.0f} GFLOP/s; "
          f"model FLOPs per {unit.split('/')[0][:-1]}: {report['flops_per_unit'] / 1e6:.1f} M")  # fmt: skip
    print()
    width = max(len("ratio " + name) for name in [*report["ratios"], *report["libraries"]]) + 2
    print(f"{'library':<{width}}{unit + ' (median)':>20}{'runs':>30}{'peak RSS MiB':>15}{'GFLOP/s':>10}{'MFU':>8}")
    for library, r in report["libraries"].items():
        runs = ", ".join(f"{rate:.3g}" for rate in r["rates"])
        print(f"{library:<{width}}{r['median_rate']:>20.3f}{runs:>30}{r['median_peak_rss_mb']:>15.0f}"
              f"{r['gflops']:>10.1f}{r['mfu']:>8.1%}")  # fmt: skip
    for name, ratio in report["ratios"].items():
        print(f"{'ratio ' + name:<{width}}{ratio['rate']:>19.2f}x{'':>30}{ratio['peak_rss']:>14.2f}x")


def main() -> None:
    args = parse_args()
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return
    if importlib.util.find_spec("trl") is None:
        sys.exit(
            'vs_trl.py needs TRL, which lit-posttrain does not depend on: pip install "lit-posttrain[bench]"'
        )
    import torch
    import transformers
    import trl
    from perf import probe_peaks
    from transformers import AutoConfig

    import lit_posttrain

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    peaks = probe_peaks()
    libraries = ["lit-posttrain", "trl"] + (["lit-posttrain+vllm"] if args.vllm else [])
    libraries += ["lit-posttrain+compile"] if args.compile else []
    libraries += ["plain-pytorch"] if args.plain else []
    libraries += ["plain-pytorch+compile"] if args.plain and args.compile else []
    runs: dict[str, list[dict]] = {library: [] for library in libraries}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(
            Path(tmp) / "model", args.vocab_size, args.hidden_size, args.num_layers, args.seed
        )
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in make_rows(args)))
        flops_per_unit = workload_flops_per_unit(args, AutoConfig.from_pretrained(model_dir))
        for repeat in range(args.repeats):
            order = libraries if repeat % 2 == 0 else libraries[::-1]  # alternate who goes first
            for library in order:
                command = worker_argv(args, library, model_dir, data, Path(tmp) / f"out-{library}-{repeat}")
                start = time.perf_counter()
                out = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    sys.exit(f"{library} run {repeat + 1} failed ({out.returncode}):\n{out.stderr[-4000:]}")
                line = next(
                    line for line in reversed(out.stdout.splitlines()) if line.startswith(RESULT_PREFIX)
                )
                result = json.loads(line[len(RESULT_PREFIX) :])
                result["wall_s"] = time.perf_counter() - start
                runs[library].append(result)
                print(f"[{repeat + 1}/{args.repeats}] {library}: {result['rate']:.3f} {result['unit']}, peak RSS "
                      f"{result['peak_rss_mb']:.0f} MiB ({result['wall_s']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    report = {
        "benchmark": "vs_trl",
        "workload": args.workload,
        "workload_description": describe(args),
        "unit": UNITS[args.workload],
        "precision": args.precision,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "cooldown": args.cooldown,
        "lr": args.lr,
        "torch_threads": runs["lit-posttrain"][0]["torch_threads"],
        "versions": {
            "lit-posttrain": lit_posttrain.__version__,
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "peak_gflops": peaks,
        "flops_per_unit": flops_per_unit,
        **summarize(args, runs, peaks, flops_per_unit),
        "runs": runs,
    }
    if args.json is None:
        print_table(report)
    elif args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print_table(report)


if __name__ == "__main__":
    main()
