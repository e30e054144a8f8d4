"""Pure tensor math with one right answer, shared by the methods. Each function is tested
against its naive form in `tests/test_ops.py`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


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
