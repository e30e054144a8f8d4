"""Peak memory of SFT with full fine-tuning, LoRA and QLoRA (4-bit NF4 base + LoRA). Prints JSON.

The model is the ~58M-parameter Llama of benchmarks/dpo.py and benchmarks/grpo.py (vocabulary 32000,
hidden 512, 8 layers, untied head) with a locally built word-level tokenizer; its random weights are
saved once to a temporary directory and every run loads them with ``from_pretrained``, as a real
fine-tuning run does (QLoRA then quantizes layer by layer while loading). Rows are random token
sequences of ``--length`` tokens; nothing is downloaded.

    python benchmarks/qlora.py                 # full, lora, qlora: 3 fresh runs each, medians
    python benchmarks/qlora.py --mode qlora --repeats 1

Each run is a fresh subprocess, so its peak RSS (``ru_maxrss``) belongs to that run alone. Reported
per mode (medians over ``--repeats``): ``peak_rss_mb`` (the whole process: Python, torch, the model,
its gradients, optimizer state, activations), ``rss_after_load_mb`` (after the module is built, before
``fit``), ``peak_rss_delta_mb`` (the peak during ``fit`` minus that: what training adds),
``model_mb`` (the bytes of the model's state dict, quantized weights and their statistics
included), ``trainable_params`` and ``tokens_per_s``. On this model the token embedding and the head
(2 x 16.4M parameters) are not quantized (transformers keeps the output layer in full precision and
bitsandbytes quantizes linear layers only), so QLoRA shrinks the 25M decoder-layer parameters only;
on a 7B model the decoder layers are ~95 % of the weights.
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

MODES = ("full", "lora", "qlora")


def make_model_dir(path: Path, vocab_size: int, hidden_size: int, num_layers: int) -> Path:
    """A Llama directory with random weights (seed 0) and a word-level tokenizer of ``vocab_size`` tokens
    (the model of benchmarks/dpo.py, saved with weights)."""
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
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=1).save_pretrained(path)
    return path


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(args) -> dict:
    """One run in this process (the worker)."""
    import lightning as L
    import torch

    from lit_posttrain import SFTDataModule, SFTModule
    from lit_posttrain.models import LoRAConfig

    class StepTimer(L.Callback):
        def __init__(self, warmup: int):
            self.warmup, self.steps = warmup, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= self.warmup:
                self.steps.append(time.perf_counter() - self.start)

    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(args.seed)
    lora = None if args.mode == "full" else LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=0.0)
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"} if args.mode == "qlora" else None
    module = SFTModule(
        args.model_dir,
        lora=lora,
        quantization=quantization,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
    )
    rss_after_load = current_rss_mb()
    generator = torch.Generator().manual_seed(args.seed)
    rows = [
        {"text": " ".join(f"t{i}" for i in torch.randint(2, args.vocab_size, (args.length - 1,), generator=generator).tolist())}
        for _ in range(args.batch_size * (args.steps + args.warmup))
    ]
    datamodule = SFTDataModule(args.model_dir, train_data=rows, batch_size=args.batch_size, max_length=args.length)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        max_steps=args.steps + args.warmup,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state = {t.data_ptr(): t.numel() * t.element_size() for t in module.model.state_dict().values()}
    return {
        "model_mb": sum(state.values()) / 2**20,
        "trainable_params": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "rss_after_load_mb": rss_after_load,
        "peak_rss_mb": peak,
        "peak_rss_delta_mb": peak - rss_after_load,
        "tokens_per_s": len(timer.steps) * args.batch_size * args.length / sum(timer.steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES + ("all",), default="all")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank), every linear layer")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="fresh runs per mode; medians are reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # worker: the model directory
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run(args)))
        return

    modes = MODES if args.mode == "all" else (args.mode,)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp), args.vocab_size, args.hidden_size, args.num_layers)
        argv = [a for a in sys.argv[1:] if not a.startswith("--mode") and a not in MODES + ("all",)]
        for mode in modes:
            runs = []
            for _ in range(args.repeats):
                command = [sys.executable, __file__, *argv, "--worker", "--mode", mode, "--model-dir", str(model_dir)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            results[mode] = {"runs": runs, "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]}}
    report = {
        "benchmark": "qlora",
        "config": {k: v for k, v in vars(args).items() if k not in ("repeats", "worker", "model_dir", "mode")},
        "repeats": args.repeats,
        **results,
    }
    if "full" in results:
        report["peak_rss_vs_full"] = {
            mode: round(results[mode]["median"]["peak_rss_mb"] / results["full"]["median"]["peak_rss_mb"], 3)
            for mode in results
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
