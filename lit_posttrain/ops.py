"""Pure tensor math with one right answer, shared by the methods. Each function is tested
against its naive form in `tests/test_ops.py` (the chunked log-probs in `tests/test_chunked_logps.py`)."""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """``log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]`` without materialising the
    full-vocabulary log-softmax of the whole batch at once.

    For float32/float64 it gathers the chosen logit and subtracts ``logsumexp`` (one (B, T) tensor
    extra); for low precision (where logsumexp loses accuracy) it computes the log-softmax
    row-chunk by row-chunk.

    Args:
        logits: (..., V)
        index: (...) token ids
    Returns:
        (...) log-probabilities of ``index``
    """
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        # logsumexp row by row keeps the peak memory to one (chunk, T, V) intermediate
        lse = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in logits.split(chunk_size)])
        return selected - lse.view_as(selected)
    out = []
    for row_logits, row_index in zip(logits.split(chunk_size), index.split(chunk_size)):
        row_logps = F.log_softmax(row_logits.float(), dim=-1)
        out.append(torch.gather(row_logps, -1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.cat(out).to(logits.dtype)


# logits per chunk of `chunked_selective_log_softmax` (default): at least 2**24 values, 64 MiB in float32
# (111 positions of a 151,936-token vocabulary, 512 of a 32,768 one; a small vocabulary's batch at once).
# Not less: glibc's malloc serves blocks of 32 MiB or more (bfloat16 logits of the chunk too) with mmap and
# returns them to the system when they are freed; smaller chunk buffers come from the heap, where the small
# tensors each chunk leaves behind split the freed blocks, and the process's resident memory grew with the
# number of chunks (measured at vocab 150k over 1,024 positions: +1.9 to 2.4 GB with chunks of 8 or 55
# positions in most runs; +0.06 GB at most with chunks of 112).
LOGITS_CHUNK_NUMEL = 2**24

# logits `chunked_selective_log_softmax` keeps for backward instead of recomputing them (default): the trailing
# chunks whose positions x vocabulary fit in 2**27 values, 512 MiB of float32 log-softmax (4,096 positions of a
# 32,768-token vocabulary, 883 of a 151,936 one): what the full logits of an 8 x 512 step at vocabulary 32,000 cost.
# Recomputing a chunk costs one more head matmul and log-softmax over it (1.2x SFT tokens/s on vs_trl.py's 8 x 512
# workload when no chunk is recomputed, docs/benchmarks.md); keeping a bounded amount saves that for steps up to
# the budget while the peak memory stays bounded whatever the number of positions.
LOGITS_KEEP_NUMEL = 2**27

# log-softmax values per block of rows whose entropy `_logps_from_logits_in_place` computes at once (2 MiB of float32)
ENTROPY_BLOCK_NUMEL = 2**19


def _logps_from_logits(logits: torch.Tensor, index: torch.Tensor, temperature: float, with_stats: bool):
    """One chunk's work over the vocabulary: (C, V) logits -> (C,) float32 log-probs of ``index``, and
    with ``with_stats`` the entropy, mean logit and argmax of ``logits / temperature`` (detached).

    The plain form, which ``torch.compile`` gets (`compiled_logps_from_logits`); eager runs use
    `_logps_from_logits_in_place`, the same values and gradients with less memory traffic."""
    logits = logits.float()  # (C, V), float32 whatever dtype the head computes in
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax is one fused kernel that works row by row in cache, forward and backward; a
    # logsumexp-and-subtract form makes several passes over the whole (C, V) chunk in memory, which
    # costs more than the head's matmul once that runs in bfloat16 (docs/benchmarks.md, bf16 on CPU)
    all_logps = torch.log_softmax(logits, dim=-1)  # (C, V)
    logps = torch.gather(all_logps, -1, index.unsqueeze(-1)).squeeze(-1)  # (C,)
    if not with_stats:
        return logps
    with torch.no_grad():  # saves nothing for backward: the recomputation stops before this
        entropy = -torch.linalg.vecdot(all_logps.exp(), all_logps)  # (C,)
        # max's indices: the first maximum, as argmax's, and a faster CPU kernel over float32 rows
        return logps, entropy, logits.mean(-1), logits.max(-1).indices


class _TargetLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits, -1)`` gathered at ``index``, computed over ``logits``' own memory, with the gradient
    written over the saved log-softmax in the backward pass. Returns ``(logps, all_logps)``: the (C,) gathered
    log-probs and the (C, V) log-softmax (``logits`` itself, overwritten; not differentiable), read for the
    statistics.

    The same values and gradient as ``torch.log_softmax(logits, -1).gather(-1, index[:, None])``, without a
    (C, V) allocation past the logits: autograd's form allocates the log-softmax in the forward, and in the
    backward a zero-filled (C, V) gradient for the gather, scattered into, and a (C, V) gradient for the
    log-softmax. The gradient of ``logp_i = z_i - logsumexp(z)`` is ``d logp_i / dz = onehot(i) - softmax(z)``,
    so the backward turns the saved log-softmax into ``softmax(z)`` in place (``exp_``), scales it by ``-grad``
    and adds ``grad`` at the targets: two passes over the chunk and no new memory. Measured on this CPU over
    8 chunks of (525, 32000), the head's matmul included: forward 0.43 -> 0.31 s, backward 0.75 -> 0.51 s
    (a fresh buffer of a chunk's size is paged in anew each time, `LOGITS_CHUNK_NUMEL`, and costs about as
    much as the pass that fills it). The saved log-softmax is consumed: a second backward through the same
    graph (``retain_graph=True``) raises autograd's in-place error instead of giving a wrong gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor):
        ctx.set_materialize_grads(False)  # all_logps has no gradient: never allocate a (C, V) zero one for it
        all_logps = torch.log_softmax(logits, dim=-1, out=logits)  # (C, V), row by row in cache, in place
        ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(all_logps)
        ctx.save_for_backward(all_logps, index)
        return torch.gather(all_logps, -1, index.unsqueeze(-1)).squeeze(-1), all_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: torch.Tensor, _grad_all_logps: None):
        all_logps, index = ctx.saved_tensors
        grad_logits = all_logps.exp_().mul_(-grad_logps.unsqueeze(-1))  # -grad * softmax(z), in place
        grad_logits.scatter_add_(-1, index.unsqueeze(-1), grad_logps.unsqueeze(-1))  # + grad * onehot(index)
        return grad_logits, None


def _logps_from_logits_in_place(logits: torch.Tensor, index: torch.Tensor, temperature: float, with_stats: bool):
    """`_logps_from_logits` as eager PyTorch runs it fastest: the same values and gradients, with the log-softmax
    computed over the chunk's logits in place and a backward that allocates nothing of the chunk's size
    (`_TargetLogSoftmax`). ``logits``, the head's output for the chunk, is overwritten: a forward hook on the
    head that keeps its output sees the log-softmax there afterwards (a backward node that saved it raises
    autograd's in-place error)."""
    logits = logits.float()  # (C, V), float32 whatever dtype the head computes in
    if temperature != 1.0:
        logits = logits / temperature
    if with_stats:
        with torch.no_grad():  # before the log-softmax overwrites the logits
            mean_logit, argmax = logits.mean(-1), logits.max(-1).indices
    logps, all_logps = _TargetLogSoftmax.apply(logits, index)  # (C,), (C, V)
    if not with_stats:
        return logps
    with torch.no_grad():  # after the function that saves for backward: the recomputation stops before this
        # -sum(p log p) a block of rows at a time: a 2 MiB block's exp comes from memory the process reuses,
        # where one (C, V) exp is paged in anew per chunk (3x slower over the (525, 32000) chunks on this CPU)
        rows = max(1, ENTROPY_BLOCK_NUMEL // all_logps.shape[-1])
        buffer = all_logps.new_empty(min(rows, all_logps.shape[0]), all_logps.shape[-1])  # (rows, V), reused
        entropy = all_logps.new_empty(all_logps.shape[0])  # (C,)
        for start in range(0, all_logps.shape[0], rows):
            block = all_logps[start : start + rows]
            p_log_p = torch.exp(block, out=buffer[: block.shape[0]]).mul_(block)
            torch.sum(p_log_p, -1, out=entropy[start : start + rows])
        entropy.neg_()
    return logps, entropy, mean_logit, argmax


# set by `lit_posttrain.callbacks.CompileLayers` for the length of a run (None: the environment decides)
_compile_loss: bool | None = None


def compile_loss_enabled() -> bool:
    """Whether `chunked_selective_log_softmax` runs each chunk's work over the vocabulary through
    ``torch.compile`` (opt-in; docs/benchmarks.md, "Compiled loss"): during a run with the
    `lit_posttrain.callbacks.CompileLayers` callback (``loss=True``), else with
    ``LIT_POSTTRAIN_COMPILE_LOSS=1`` in the environment."""
    if _compile_loss is not None:
        return _compile_loss
    return os.environ.get("LIT_POSTTRAIN_COMPILE_LOSS", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def compiled_logps_from_logits():
    """`_logps_from_logits` through ``torch.compile`` (dynamic in the number of positions, compiled once
    per process and per dtype / ``with_stats`` / temperature on first use). Inductor fuses the upcast,
    log-softmax, gather and statistics into a pass or two over each row of the chunk's logits, forward and
    backward, where eager PyTorch makes one pass over the whole chunk in memory per operation."""
    return torch.compile(_logps_from_logits, dynamic=True)


class TokenStats(NamedTuple):
    """Per-token statistics of the temperature-scaled logits (detached), computed with the log-probs."""

    entropy: torch.Tensor  # (...) entropy of softmax(logits / temperature), in nats
    mean_logit: torch.Tensor  # (...) mean of logits / temperature over the vocabulary
    argmax: torch.Tensor  # (...) the most likely token id


def chunked_selective_log_softmax(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Module,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    keep_numel: int | None = None,
    with_stats: bool = False,
) -> tuple[torch.Tensor, TokenStats | None]:
    """``selective_log_softmax(lm_head(hidden_states) / temperature, index)`` without ever holding the
    logits of more than ``chunk_size`` positions.

    The positions are flattened and cut into chunks; each chunk's logits are computed by calling
    ``lm_head`` (so a tied head, a PEFT LoRA-wrapped head, a bitsandbytes layer and an FSDP2-unsharded
    weight all work as in the model's own forward), reduced to the gathered log-probs (in float32:
    the logits are upcast before the log-softmax; eagerly, the log-softmax overwrites the chunk's logits
    and its backward writes the gradient over it, `_TargetLogSoftmax`), and freed. With gradients enabled
    each chunk runs under ``torch.utils.checkpoint`` (non-reentrant), except the trailing ones within ``keep_numel``: the
    backward pass recomputes that chunk's logits (one more head matmul per position) instead of keeping
    them, so the peak memory is bounded (``keep_numel`` values of log-softmax plus one chunk) whatever the
    number of positions. The trailing chunks whose positions x vocabulary fit in ``keep_numel``, and always
    the last chunk, keep their log-softmax instead: where the log-probs feed the loss right away their
    backward runs first (the last chunk first), so they are freed before any other chunk is recomputed.
    Dropout inside the head replays the same mask (the RNG state is restored for the recomputation).
    Values and gradients equal the unchunked computation up to float rounding (tested to 1e-5 in float32).
    With ``LIT_POSTTRAIN_COMPILE_LOSS=1`` in the environment (or `lit_posttrain.callbacks.CompileLayers`'s
    ``loss=True`` during a run) each chunk's work over the vocabulary runs through ``torch.compile``
    (`compile_loss_enabled`, `_logps_from_logits`).

    Args:
        hidden_states: (..., H) final hidden states (after the model's last norm), e.g. (N, T, H).
        lm_head: the output layer, (..., H) -> (..., V); a linear layer (``out_features`` is read to size
            the chunks).
        index: (...) the token ids whose log-probs are gathered.
        temperature: the logits are divided by it before the log-softmax (and the statistics).
        chunk_size: positions per chunk; None: ``ceil(LOGITS_CHUNK_NUMEL / V)`` (64 MiB of float32 logits).
        keep_numel: positions x vocabulary of the trailing chunks kept for backward instead of recomputed;
            None: ``LOGITS_KEEP_NUMEL`` (512 MiB of float32 log-softmax); 0: only the last chunk.
        with_stats: also return `TokenStats` (entropy, mean logit, argmax per position, detached),
            computed from each chunk's logits while they exist; the backward's recomputation stops
            before the entropy (the mean and argmax, one pass each, are recomputed).
    Returns:
        per_token_logps (...) float32, and `TokenStats` of (...) tensors or None.
    """
    if chunk_size is None:
        chunk_size = -(-LOGITS_CHUNK_NUMEL // lm_head.out_features)  # ceil
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # (P, H)
    flat_index = index.reshape(-1)  # (P,)

    logps_from_logits = (
        compiled_logps_from_logits() if compile_loss_enabled() else _logps_from_logits_in_place
    )

    def chunk_logps(hidden: torch.Tensor, chunk_index: torch.Tensor):
        return logps_from_logits(lm_head(hidden), chunk_index, temperature, with_stats)

    if keep_numel is None:
        keep_numel = LOGITS_KEEP_NUMEL
    keep_positions = keep_numel // lm_head.out_features if keep_numel > 0 else 0
    num_positions = flat_index.numel()
    outputs = []
    for start in range(0, max(num_positions, 1), chunk_size):
        hidden, chunk_index = flat_hidden[start : start + chunk_size], flat_index[start : start + chunk_size]
        # the trailing chunks within keep_numel, and the last one, keep their log-softmax for backward instead
        # of recomputing it: where these log-probs go straight into the loss (every method here), their
        # backward runs first, last chunk first, and frees them before any other chunk is recomputed
        kept = start + chunk_size >= num_positions or num_positions - start <= keep_positions
        if torch.is_grad_enabled() and not kept:
            outputs.append(checkpoint(chunk_logps, hidden, chunk_index, use_reentrant=False))
        else:
            outputs.append(chunk_logps(hidden, chunk_index))
    if not with_stats:
        return torch.cat(outputs).view(index.shape), None
    logps, entropy, mean_logit, argmax = (torch.cat(parts).view(index.shape) for parts in zip(*outputs))
    return logps, TokenStats(entropy, mean_logit, argmax)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension, computed in row chunks.

    Args:
        logits: (B, ..., V)
    Returns:
        (B, ...) entropies in nats
    """
    out = []
    for chunk in logits.split(chunk_size):
        logps = F.log_softmax(chunk.float(), dim=-1)
        out.append(-(logps.exp() * logps).sum(-1))
    return torch.cat(out)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is true (over ``dim``, or everything)."""
    values = values * mask
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 where the mask is empty (not NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def pad(sequences: list[torch.Tensor], padding_value: float = 0, padding_side: str = "right") -> torch.Tensor:
    """Stack 1-D (or N-D, padded on the first dimension) tensors of different lengths.

    Args:
        sequences: list of (L_i, ...) tensors
        padding_side: ``"right"`` (pad after) or ``"left"`` (pad before, for generation)
    Returns:
        (N, max L_i, ...)
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    max_len = max(seq.size(0) for seq in sequences)
    out = sequences[0].new_full((len(sequences), max_len, *sequences[0].shape[1:]), padding_value)
    for i, seq in enumerate(sequences):
        if padding_side == "right":
            out[i, : seq.size(0)] = seq
        else:
            out[i, max_len - seq.size(0) :] = seq
    return out


def grad_norm(parameters) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients (what ``clip_grad_norm_`` measures before
    clipping); sharded (DTensor, FSDP2) gradients give the norm of the full gradient, which makes
    this a collective under FSDP2: call it on every rank. 0 when no parameter has a gradient."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite gradient: the run stops before it reaches the weights."""


def finite_grad_norm(parameters, step: int) -> torch.Tensor:
    """`grad_norm`, raising `NonFiniteError` when it is NaN or infinite (a diverged step: a NaN loss
    gives NaN gradients). Called before the optimizer step, so the weights, the last checkpoint and
    any export stay those of the last good step, and the run exits non-zero instead of training on."""
    norm = grad_norm(parameters)
    if not torch.isfinite(norm):
        raise NonFiniteError(
            f"step {step}: the gradient norm is {norm.item()} (a non-finite loss or gradient). The run stops "
            "before the optimizer step: the weights and the last checkpoint are those of the last good step. "
            "Lower the learning rate, clip gradients (trainer.gradient_clip_val) or check the data."
        )
    return norm
