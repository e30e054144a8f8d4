"""What the benchmarks share: the machine's matmul peak, model FLOPs, MFU, a step-time breakdown, a profiler.

- `probe_peak_gflops`: this machine's matmul peak in GFLOP/s for fp32 and bf16, measured at start-up
  with a few square matmuls (``2 n^3`` FLOPs each, best of several after a warm-up), with the
  threads the run itself uses. It is the denominator of MFU: what *this* machine does on the
  friendliest possible workload, under the load it has right now, not a datasheet figure.
- `model_flops` / `flops_per_token`: model FLOPs of a decoder from its Hugging Face config, by the
  PaLM formula (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311, appendix B, the convention
  Chinchilla's appendix F also uses up to its embedding term): per trained token
  ``6 N + 12 L H Q T`` and per forward-only token (generation, reference and no-grad passes)
  ``2 N + 4 L H Q T``, with N the weights that take part in a matmul per token (every decoder
  layer's projections plus the LM head; the input embedding is a lookup and norms are negligible),
  L layers, H query heads of Q dims, T the row length. Attention is counted over the whole row (no
  causal halving), as PaLM does; "model" FLOPs are independent of the implementation (KV cache,
  recomputation and padding are not counted).
- MFU (`mfu`) = achieved model GFLOP/s / probe peak of the dtype the matmuls run in
  (``32-true`` -> fp32; ``bf16-mixed`` and ``bf16-true`` -> bf16).
- `StepBreakdown`: a Lightning callback that splits every training step's wall time into ``data``,
  ``generation``, ``weight_sync``, ``forward``, ``backward``, ``optimizer`` and ``other`` with
  ``time.perf_counter`` marks at Lightning's hooks and the optimizer's step hooks.
- `ProfileSteps`: a Lightning callback that runs ``torch.profiler`` over a few steps and prints the
  top operators (by self CPU time) to stderr.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import lightning as L
import torch

from lit_posttrain.rollout import VLLMColocateRollout, VLLMServerRollout

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
# decoder families whose blocks are Llama's: q/k/v/o projections and a gated MLP (gate, up, down)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


# ---------------------------------------------------------------------------------------------
# The machine's peak
# ---------------------------------------------------------------------------------------------
def probe_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of ``repeats`` (n, n) x (n, n) matmuls in ``dtype`` on the CPU, after two warm-up ones.

    About 0.5 s for fp32 and 0.2 s for bf16 at n = 2048 on a 2-core AVX-512/AMX machine.
    """
    a = torch.randn(n, n).to(dtype)  # (n, n)
    b = torch.randn(n, n).to(dtype)  # (n, n)
    for _ in range(2):  # warm-up: thread pool, oneDNN kernel selection
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def probe_peaks() -> dict[str, float]:
    """``{"fp32": GFLOP/s, "bf16": GFLOP/s}`` measured now, with the current torch thread count."""
    return {"fp32": probe_peak_gflops(torch.float32), "bf16": probe_peak_gflops(torch.bfloat16)}


def compute_dtype(precision: str) -> str:
    """The dtype the matmuls run in under a Lightning ``precision``: ``"fp32"`` or ``"bf16"``."""
    if precision == "32-true":
        return "fp32"
    if precision in ("bf16-mixed", "bf16-true"):
        return "bf16"
    raise ValueError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}")


# ---------------------------------------------------------------------------------------------
# Model FLOPs
# ---------------------------------------------------------------------------------------------
def matmul_params(config) -> tuple[int, int]:
    """(decoder, lm_head): the weights each token multiplies with, from a Llama-like HF config.

    decoder = layers x (q, k, v, o projections + gate, up, down of the MLP); lm_head = hidden x vocab
    (counted whether or not it is tied to the input embedding: it is a matmul either way).
    """
    if config.model_type not in LLAMA_LIKE:
        raise ValueError(
            f"model FLOPs are counted for {list(LLAMA_LIKE)} configs, got model_type {config.model_type!r}"
        )
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = _head_dim(config)
    attention = (
        hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    )  # q, k+v, o
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    return config.num_hidden_layers * (attention + mlp), hidden * config.vocab_size


def _head_dim(config) -> int:
    """Per-head dimension: ``head_dim`` where the config has it (Llama, Qwen3), else hidden / heads (Qwen2)."""
    return config.to_dict().get("head_dim") or config.hidden_size // config.num_attention_heads


def model_flops(
    config, *, tokens: float, seq_len: int, backward: bool = True, lm_head_tokens: float | None = None
) -> float:
    """Model FLOPs of ``tokens`` tokens in rows of ``seq_len`` (PaLM appendix B).

    Args:
        config: a Llama-like Hugging Face config.
        tokens: tokens that go through the decoder (padding excluded: it is wasted work).
        seq_len: the row length T each token attends over (counted in full: no causal halving).
        backward: training (forward + backward, factor 6) or forward only (factor 2).
        lm_head_tokens: tokens whose logits are computed, when fewer than ``tokens`` (GRPO keeps the
            completion's logits only; generation computes one row of logits per new token).
    Returns:
        factor x (N_decoder x tokens + N_lm_head x lm_head_tokens + 2 L H Q T x tokens), factor 6 or 2.
    """
    decoder, lm_head = matmul_params(config)
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    factor = 6 if backward else 2
    lm_head_tokens = tokens if lm_head_tokens is None else lm_head_tokens
    attention = (
        2 * config.num_hidden_layers * heads * head_dim * seq_len
    )  # QK^T and AV: 2 x (T x Q) MACs per head
    return factor * (decoder * tokens + lm_head * lm_head_tokens + attention * tokens)


def flops_per_token(config, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: ``6 N + 12 L H Q T`` (training) or ``2 N + 4 L H Q T`` (forward only)."""
    return model_flops(config, tokens=1, seq_len=seq_len, backward=training)


def mfu(achieved_gflops: float, peak_gflops: float) -> float:
    """Model FLOPs utilisation: achieved model GFLOP/s over the probe's peak GFLOP/s (0..1)."""
    return achieved_gflops / peak_gflops


# ---------------------------------------------------------------------------------------------
# Where the time goes
# ---------------------------------------------------------------------------------------------
CATEGORIES = ("data", "generation", "weight_sync", "forward", "backward", "optimizer", "other")


class StepBreakdown(L.Callback):
    """Split each training step's wall time into `CATEGORIES` (seconds), for the steps after ``warmup``.

    Every mark attributes the time since the previous mark to one category:
    - ``data``: from the end of the previous step to the start of this one (fetching and collating
      the batch, Lightning's loop between steps);
    - ``generation`` / ``weight_sync``: inside the rollout engine's ``generate`` (``rollout=True``
      wraps ``pl_module.rollout`` at setup, after a rollout callback listed before this one swapped
      its engine in); a vLLM engine's weight sync, which ``generate`` starts with, is ``weight_sync``;
    - ``forward``: up to each ``backward``: the forward pass and the loss, and everything else
      computed before it (a DPO reference forward, GRPO's reward scoring and no-grad log-prob passes);
    - ``backward``: ``on_before_backward`` to ``on_after_backward``;
    - ``optimizer``: from the last backward to the end of ``optimizer.step`` (gradient-norm logging,
      clipping, the step), marked by the optimizer's own step pre/post hooks;
    - ``other``: from the last optimizer step to the end of the step (logging, LR scheduler) and,
      in GRPO, before the ``generate`` call.
    On CUDA every mark synchronises the device, so the split is the GPU's, at a small cost.
    """

    def __init__(self, warmup: int = 0, steps: int | None = None, rollout: bool = False):
        self.warmup, self.max_steps, self.wrap_rollout = warmup, steps, rollout
        self.steps: list[dict[str, float]] = []  # the measured steps
        self._current: dict[str, float] | None = None
        self._last = self._step_end = None
        self._seen, self._cuda, self._handles = 0, False, []

    def mark(self, category: str) -> None:
        """Attribute the time since the previous mark to ``category``."""
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._current is not None:
            self._current[category] += now - self._last
        self._last = now

    def move(self, seconds: float, source: str, target: str) -> None:
        """Move ``seconds`` of the current step from category ``source`` to ``target``."""
        if self._current is not None:
            self._current[source] -= seconds
            self._current[target] += seconds

    def setup(self, trainer, pl_module, stage):
        self._cuda = trainer.strategy.root_device.type == "cuda"
        if self.wrap_rollout:
            pl_module.rollout = TimedRollout(pl_module.rollout, self)

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.mark("optimizer")))
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.mark("optimizer")))
        self._step_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._current = defaultdict(float)
        self._last = self._step_end
        self.mark("data")

    def on_before_backward(self, trainer, pl_module, loss):
        self.mark("forward")

    def on_after_backward(self, trainer, pl_module):
        self.mark("backward")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mark("other")
        self._step_end = self._last
        measured = self._seen >= self.warmup and (self.max_steps is None or len(self.steps) < self.max_steps)
        if measured:
            self.steps.append({name: self._current[name] for name in CATEGORIES})
        self._seen += 1
        self._current = None

    def on_train_end(self, trainer, pl_module):
        for handle in self._handles:
            handle.remove()

    def summary(self) -> dict[str, float]:
        """Mean seconds per measured step in each category, ``step_s`` their sum, and each category's
        share of it (``<category>_fraction``)."""
        n = max(len(self.steps), 1)
        means = {f"{name}_s": sum(step[name] for step in self.steps) / n for name in CATEGORIES}
        total = sum(means.values())
        fractions = {f"{name}_fraction": means[f"{name}_s"] / total if total else 0.0 for name in CATEGORIES}
        return {**means, "step_s": total, **fractions}


class TimedRollout:
    """Wraps a rollout engine (not replaces it): marks ``other`` before ``generate``, ``generation``
    after it, and moves a vLLM engine's weight-sync time (``last_sync_time``) to ``weight_sync``.
    Keeps the last output's token counts (``prompt_lengths``, ``completion_lengths``) for FLOPs."""

    def __init__(self, engine, breakdown: StepBreakdown):
        self.engine, self.breakdown = engine, breakdown
        self.prompt_lengths: list[int] = []
        self.completion_lengths: list[int] = []

    def generate(self, model, prompt_ids, **kwargs):
        vllm = isinstance(self.engine, (VLLMColocateRollout, VLLMServerRollout))
        syncs = self.engine.num_syncs if vllm else 0
        self.breakdown.mark("other")
        output = self.engine.generate(model, prompt_ids, **kwargs)
        self.breakdown.mark("generation")
        if vllm and self.engine.num_syncs != syncs:  # this call pushed the policy's weights first
            self.breakdown.move(self.engine.last_sync_time, "generation", "weight_sync")
        num_generations = kwargs.get("num_generations", 1)
        self.prompt_lengths = [len(ids) for ids in prompt_ids for _ in range(num_generations)]  # (N,)
        self.completion_lengths = [len(ids) for ids in output.completion_ids]  # (N,)
        return output


# ---------------------------------------------------------------------------------------------
# Profiler
# ---------------------------------------------------------------------------------------------
class ProfileSteps(L.Callback):
    """Run ``torch.profiler`` over ``steps`` training steps starting at step ``start`` and print the
    ``row_limit`` operators with the most self CPU time (and CUDA time on a GPU) to stderr."""

    def __init__(self, start: int, steps: int, row_limit: int = 25):
        self.start, self.steps, self.row_limit = start, steps, row_limit
        self._seen, self.profiler = 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._seen == self.start and self.steps > 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._seen += 1
        if self.profiler is not None and self._seen == self.start + self.steps:
            self.profiler.__exit__(None, None, None)
            sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=self.row_limit)
            print(f"torch.profiler: {self.steps} step(s) after step {self.start}, top {self.row_limit} by {sort_by}\n{table}",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.profiler = None


def performance(flops: float, seconds: float, peaks: dict[str, float], precision: str) -> dict[str, float]:
    """Achieved model GFLOP/s over ``seconds``, the probe peaks and the MFU against the peak of the
    dtype that ``precision`` computes in."""
    gflops = flops / seconds / 1e9
    peak = peaks[compute_dtype(precision)]
    return {
        "gflops": gflops,
        "peak_gflops_fp32": peaks["fp32"],
        "peak_gflops_bf16": peaks["bf16"],
        "mfu": mfu(gflops, peak),
    }
