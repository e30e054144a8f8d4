"""The benchmarks' measuring pieces: model FLOPs against hand counts, the MFU arithmetic, where a step's
time is attributed, and the side-by-side TRL script's arguments and data (TRL itself is not needed)."""

import json
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules

import perf
import vs_trl

# the side-by-side workload's model (issue #18): 4 layers, hidden 256, 4 heads of 64, MLP 640, vocab 32000
BENCH_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 640,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "tie_word_embeddings": False,
}


def test_matmul_params_count_the_linear_weights_of_a_built_model():
    """matmul_params(config) equals the weights of every nn.Linear of the model built from it (GQA, tied head)."""
    config = LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    decoder, lm_head = perf.matmul_params(config)
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert decoder == sum(m.weight.numel() for m in linears)
    assert lm_head == 128 * 300  # counted although tied: the head is a matmul


def test_flops_per_token_of_the_benchmark_model_by_hand():
    """Per layer: q, k, v, o = 4 x 256 x 256 = 262,144 and the MLP 3 x 256 x 640 = 491,520, so the
    decoder has 4 x 753,664 = 3,014,656 weights and the head 256 x 32,000 = 8,192,000: N = 11,206,656.
    Training at T = 512: 6 N = 67,239,936 plus 12 L H Q T = 12 x 4 x 4 x 64 x 512 = 6,291,456, i.e.
    73,531,392 FLOPs per token (the issue's "~74 MFLOP"); forward only is exactly a third."""
    config = LlamaConfig(**BENCH_CONFIG)
    assert perf.matmul_params(config) == (3_014_656, 8_192_000)
    assert perf.flops_per_token(config, 512) == 73_531_392
    assert perf.flops_per_token(config, 512, training=False) * 3 == 73_531_392
    # fewer rows of logits: 10 tokens, 4 of them with logits -> 6 x 256 x 32000 x 6 fewer FLOPs
    full = perf.model_flops(config, tokens=10, seq_len=512)
    assert full - perf.model_flops(config, tokens=10, seq_len=512, lm_head_tokens=4) == 6 * 8_192_000 * 6


def test_flops_reject_an_unknown_architecture():
    """A config whose blocks are not Llama-like is refused, naming the model type."""
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="gpt2"):
        perf.matmul_params(GPT2Config())


def test_mfu_against_the_peak_of_the_precision_s_dtype():
    """2e11 FLOPs in 2 s is 100 GFLOP/s: 25 % of a 400 GFLOP/s fp32 peak, 100/2800 of a bf16 one."""
    peaks = {"fp32": 400.0, "bf16": 2800.0}
    fp32 = perf.performance(2e11, 2.0, peaks, "32-true")
    assert fp32["gflops"] == pytest.approx(100.0) and fp32["mfu"] == pytest.approx(0.25)
    for precision in ("bf16-mixed", "bf16-true"):
        assert perf.performance(2e11, 2.0, peaks, precision)["mfu"] == pytest.approx(100 / 2800)
    with pytest.raises(ValueError, match="--precision"):
        perf.compute_dtype("16-mixed")


def test_probe_measures_a_positive_peak():
    """The matmul probe returns a finite GFLOP/s figure (small matrices here: the test stays fast)."""
    gflops = perf.probe_peak_gflops(torch.float32, n=256, repeats=2)
    assert 0 < gflops < float("inf")


class _SleepyBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.05)
        return grad


class _SleepySGD(torch.optim.SGD):
    def step(self, closure=None):
        loss = super().step(closure)
        time.sleep(0.02)
        return loss


class _SleepyEngine:
    def generate(self, model, prompt_ids, **kwargs):
        time.sleep(0.04)
        return type(
            "Output", (), {"completion_ids": [[1, 2, 3]] * len(prompt_ids) * kwargs["num_generations"]}
        )()


class _SleepyModule(L.LightningModule):
    """Known costs per step: data 0.01 s, generation 0.04 s, forward 0.03 s, backward 0.05 s, optimizer 0.02 s."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.rollout = _SleepyEngine()

    def training_step(self, batch, batch_idx):
        self.rollout.generate(self.layer, [[5, 6]], num_generations=2)
        time.sleep(0.03)
        return _SleepyBackward.apply(self.layer(batch).sum())

    def configure_optimizers(self):
        return _SleepySGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        def collate(rows):
            time.sleep(0.01)
            return torch.stack(rows)

        return torch.utils.data.DataLoader([torch.ones(4)] * 16, batch_size=2, collate_fn=collate)


def test_step_breakdown_attributes_each_phase_to_its_category(capsys):
    """With known sleeps in each phase, each category gets its own sleep (not a neighbour's, which
    differ by >= 10 ms), only the measured steps are kept, and the profiler prints its table."""
    breakdown = perf.StepBreakdown(warmup=1, steps=2, rollout=True)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[breakdown, perf.ProfileSteps(start=3, steps=1, row_limit=5)],
    )  # fmt: skip
    module = _SleepyModule()
    trainer.fit(module)
    assert len(breakdown.steps) == 2  # steps 1 and 2 of 0..3
    assert module.rollout.completion_lengths == [3, 3] and module.rollout.prompt_lengths == [2, 2]
    summary = breakdown.summary()
    expected = {"data": 0.01, "generation": 0.04, "forward": 0.03, "backward": 0.05, "optimizer": 0.02}
    for name, seconds in expected.items():
        assert seconds <= summary[f"{name}_s"] < seconds + 0.009 + 0.03, (name, summary)
    assert summary["weight_sync_s"] == 0.0
    assert summary["step_s"] == pytest.approx(sum(summary[f"{name}_s"] for name in perf.CATEGORIES))
    assert "torch.profiler: 1 step(s) after step 3" in capsys.readouterr().err


def test_vs_trl_defaults_are_the_issue_workloads():
    """Each workload's defaults: SFT 8 x 512 packed, DPO 4 pairs of 128 + 128, GRPO 8 prompts x 4 x 64;
    the learning rate is TRL's default for the method."""
    sft, dpo, grpo = (vs_trl.parse_args([w]) for w in ("sft", "dpo", "grpo"))
    assert (sft.batch_size, sft.max_length, sft.lr) == (8, 512, 2e-5)
    assert (dpo.batch_size, dpo.prompt_length, dpo.completion_length, dpo.lr) == (4, 128, 128, 1e-6)
    assert (grpo.batch_size, grpo.prompt_length, grpo.num_generations, grpo.max_completion_length) == (
        8,
        32,
        4,
        64,
    )
    assert (sft.repeats, sft.precision, sft.hidden_size, sft.num_layers, sft.vocab_size) == (
        3,
        "32-true",
        256,
        4,
        32000,
    )


def test_vs_trl_rejects_bad_options(capsys):
    """--vllm outside grpo, a zero warm-up and an unknown precision stop with a message naming the option."""
    for argv, message in [
        (["sft", "--vllm"], "--vllm applies to grpo only"),
        (["dpo", "--plain"], "--plain applies to sft only"),
        (["dpo", "--warmup", "0"], "--warmup"),
        (["sft", "--cooldown", "-1"], "--cooldown"),
        (["grpo", "--precision", "16-mixed"], "--precision"),
    ]:
        with pytest.raises(SystemExit):
            vs_trl.parse_args(argv)
        assert message in capsys.readouterr().err


def test_vs_trl_worker_gets_the_parent_s_settings(tmp_path):
    """The worker's command line parses back to the parent's settings."""
    args = vs_trl.parse_args(
        ["grpo", "--steps", "7", "--precision", "bf16-mixed", "--threads", "1", "--lr", "3e-6"]
    )
    argv = vs_trl.worker_argv(args, "trl", tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "o")
    worker = vs_trl.parse_args(argv[2:])
    assert worker.worker == "trl" and worker.data == str(tmp_path / "d.jsonl")
    for name in ("workload", "steps", "warmup", "cooldown", "precision", "lr", "threads", "batch_size", "prompt_length",
                 "num_generations", "max_completion_length", "hidden_size", "num_layers", "vocab_size"):  # fmt: skip
        assert getattr(worker, name) == getattr(args, name), name


def test_vs_trl_data_tokenizes_to_the_intended_lengths(tmp_path):
    """Both libraries read the same rows with the same word-level tokenizer: one token per word, and a
    DPO prompt + completion string tokenizes to the prompt's tokens followed by the completion's."""
    model_dir = vs_trl.make_model_dir(tmp_path, vocab_size=300, hidden_size=64, num_layers=1, seed=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = vs_trl.parse_args(
        ["dpo", "--vocab-size", "300", "--steps", "1", "--warmup", "1", "--batch-size", "2"]
    )
    rows = vs_trl.make_rows(args)
    assert len(rows) == 6  # 2 pairs x (1 warm-up + 1 measured + 1 cool-down step)
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        chosen = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
        assert len(prompt) == 128 and len(chosen) == 127 and 0 not in prompt + chosen  # no <pad> / unknown
        assert (
            tokenizer(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"] == prompt + chosen
        )
    sft = vs_trl.make_rows(vs_trl.parse_args(["sft", "--vocab-size", "300", "--steps", "1", "--warmup", "1"]))
    lengths = [len(row["text"].split()) for row in sft]
    assert (
        min(lengths) >= 16 and max(lengths) <= 512 and sum(lengths) > 2 * 8 * 512
    )  # enough for 2 steps of packs


def test_vs_trl_ratios_against_trl_and_the_plain_loop():
    """The summary's ratios: every lit-posttrain run against TRL, and lit-posttrain against the plain
    PyTorch loop (``--plain``; with ``--compile``, the compiled run against both plain loops), from the
    median rates and peak RSS by hand."""
    args = vs_trl.parse_args(["sft", "--plain", "--compile"])
    runs = {
        "lit-posttrain": [{"rate": r, "peak_rss_mb": 1000, "median_step_s": 1.0} for r in (900, 1000, 950)],
        "trl": [{"rate": r, "peak_rss_mb": 4000, "median_step_s": 1.0} for r in (400, 380, 500)],
        "lit-posttrain+compile": [{"rate": r, "peak_rss_mb": 1100, "median_step_s": 1.0} for r in (1300, 1400, 1350)],
        "plain-pytorch": [{"rate": r, "peak_rss_mb": 800, "median_step_s": 1.0} for r in (1200, 1100, 1250)],
        "plain-pytorch+compile": [{"rate": r, "peak_rss_mb": 1000, "median_step_s": 1.0} for r in (1500, 1600)],
    }
    report = vs_trl.summarize(args, runs, {"fp32": 100.0, "bf16": 400.0}, flops_per_unit=1e8)
    assert report["ratios"] == {
        "lit-posttrain/trl": {"rate": 950 / 400, "peak_rss": 0.25},
        "lit-posttrain+compile/trl": {"rate": 1350 / 400, "peak_rss": 1100 / 4000},
        "lit-posttrain/plain-pytorch": {"rate": 950 / 1200, "peak_rss": 1.25},
        "lit-posttrain+compile/plain-pytorch": {"rate": 1350 / 1200, "peak_rss": 1100 / 800},
        "lit-posttrain+compile/plain-pytorch+compile": {"rate": 1350 / 1550, "peak_rss": 1.1},
    }
    assert report["libraries"]["plain-pytorch"]["mfu"] == pytest.approx(1200 * 1e8 / 1e9 / 100.0)


def test_vs_trl_plain_loop_times_each_step(tmp_path):
    """The plain loop's run (one tiny model, 1 + 2 + 1 steps): each step's tokens are the batch's whole rows
    (no padding), one timed end per step, increasing."""
    model_dir = vs_trl.make_model_dir(tmp_path / "m", vocab_size=300, hidden_size=64, num_layers=1, seed=0)
    args = vs_trl.parse_args(["sft", "--plain", "--steps", "2", "--warmup", "1", "--batch-size", "2",
                              "--max-length", "16", "--vocab-size", "300", "--model-dir", str(model_dir)])  # fmt: skip
    units, ends = vs_trl.plain_run(args)
    assert units == [32, 32, 32, 32]
    assert ends == sorted(ends) and len(set(ends)) == 4


def test_vs_trl_measures_the_steps_between_warm_up_and_cool_down():
    """2 warm-up, 3 measured, 1 cool-down step ending at 1, 2, 4, 7, 11, 16 s: the window is steps 3-5,
    from the end of step 2 (2 s) to the end of step 5 (11 s)."""
    args = vs_trl.parse_args(["sft", "--warmup", "2", "--steps", "3", "--cooldown", "1"])
    assert vs_trl.total_steps(args) == 6
    units, seconds, step_s = vs_trl.measured_window(args, [10, 20, 30, 40, 50, 60], [1, 2, 4, 7, 11, 16])
    assert (units, seconds, step_s) == ([30, 40, 50], 9, [2, 3, 4])


def test_even_token_reward_by_hand():
    """t2 t3 t4 t5: two of four ids are even -> 0.5; no token -> 0."""
    assert vs_trl.even_token_reward(["t2 t3 t4 t5", "t7", ""]) == [0.5, 0.0, 0.0]


def test_workload_flops_per_dpo_pair_by_hand():
    """A DPO pair is 2 x 256 tokens at T = 256, each trained (6 N + 12 L H Q T = 67,239,936 + 3,145,728)
    and run once more through the reference (2 N + 4 L H Q T = 22,413,312 + 1,048,576): 512 x 93,847,552."""
    args = vs_trl.parse_args(["dpo"])
    assert vs_trl.workload_flops_per_unit(args, LlamaConfig(**BENCH_CONFIG)) == 512 * 93_847_552


@pytest.mark.parametrize("workload", ["sft", "dpo", "grpo"])
def test_vs_trl_lit_posttrain_run_times_every_step(workload, tmp_path):
    """The lit-posttrain side of vs_trl.py runs the workload on a tiny model and times each of its
    warm-up + measured steps, counting the work the rate is made of (tokens, pairs or completions)."""
    argv = [workload, "--vocab-size", "300", "--hidden-size", "64", "--num-layers", "1", "--steps", "2"]
    argv += ["--warmup", "1", "--batch-size", "2", "--max-length", "32", "--prompt-length", "8"]
    argv += ["--completion-length", "8", "--max-completion-length", "4", "--num-generations", "2"]
    args = vs_trl.parse_args(argv)
    args.model_dir = str(vs_trl.make_model_dir(tmp_path / "model", 300, 64, 1, seed=0))
    args.data = str(tmp_path / "data.jsonl")
    Path(args.data).write_text("".join(json.dumps(row) + "\n" for row in vs_trl.make_rows(args)))
    args.worker, args.output_dir = "lit-posttrain", str(tmp_path / "out")
    units, ends = vs_trl.lit_posttrain_run(args)
    assert len(units) == len(ends) == 4 and ends == sorted(ends)  # 1 warm-up + 2 measured + 1 cool-down
    if workload == "sft":  # packed rows of at most 32 tokens, nearly full
        assert all(32 < n <= 2 * 32 for n in units)
    else:  # 2 pairs; 2 prompts x 2 completions
        assert units == [2, 2, 2, 2] if workload == "dpo" else units == [4, 4, 4, 4]
