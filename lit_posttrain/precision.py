"""Low precision on CPU: when ``trainer.precision`` pays, and a warning at setup when it does not.

On a CPU, bfloat16 pays only where the hardware multiplies bfloat16 natively (AVX512-BF16, AMX), and
float16 only where it has AMX-FP16; elsewhere the matmuls are emulated, so a run that sets
``trainer.precision: bf16-mixed`` (or ``16-mixed``) to go faster goes slower. `warn_if_slow_precision`
warns once, on rank zero, naming the precision, the measured slowdown and the alternative
(``32-true``). Figures: docs/benchmarks.md, "bf16 on CPU".

Measured on the project's CPU (2 cores, AVX512-BF16 and AMX), 1024 x 1024 matmuls, GFLOP/s per core:
float32 123, bfloat16 915, float16 137 (no AMX-FP16: float16 gains nothing). With oneDNN limited to
AVX-512 without BF16 (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``, as on a CPU that lacks it): float32 81,
bfloat16 22 (3.7x slower than float32), float16 1.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

BF16_PRECISIONS = ("bf16-mixed", "bf16-true")
FP16_PRECISIONS = ("16-mixed", "16-true")


class SlowPrecisionWarning(UserWarning):
    """``trainer.precision`` is expected to run slower than ``32-true`` on this device."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles), as oneDNN uses them."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_has_native_fp16() -> bool:
    """Whether this CPU multiplies float16 with AMX-FP16 (without it, float16 is no faster than float32)."""
    return torch.cpu._is_amx_fp16_supported()


def slow_precision_message(precision: str, device_type: str) -> str | None:
    """The warning for training in ``precision`` on ``device_type``, or None where it is expected to pay.

    Args:
        precision: Lightning's precision string, as ``trainer.precision`` gives it (``"32-true"``,
            ``"bf16-mixed"``, ``"bf16-true"``, ``"16-mixed"``, ...).
        device_type: ``"cpu"``, ``"cuda"``, ... (only CPU runs are checked).
    """
    if device_type != "cpu":
        return None
    if precision in BF16_PRECISIONS and not cpu_has_native_bf16():
        return (
            f"trainer.precision: {precision} on a CPU without AVX512-BF16 or AMX: bfloat16 matmuls are "
            "emulated there, about 3.7x slower than float32 ones (measured with oneDNN limited to AVX-512 "
            "without BF16), so this run is likely slower than with trainer.precision: 32-true. Use 32-true "
            "(the default) on this machine; bf16 pays on CPUs with AMX (docs/benchmarks.md, bf16 on CPU)."
        )
    if precision in FP16_PRECISIONS and not cpu_has_native_fp16():
        return (
            f"trainer.precision: {precision} on a CPU without AMX-FP16: float16 matmuls are no faster than "
            "float32 ones there (measured 137 vs 123 GFLOP/s per core with AVX512-FP16, about 1 GFLOP/s "
            "without it) and the casts add time, so this run is likely slower than with "
            "trainer.precision: 32-true. Use 32-true, or bf16-mixed on a CPU with AMX "
            "(docs/benchmarks.md, bf16 on CPU)."
        )
    return None


def warn_if_slow_precision(trainer) -> str | None:
    """Warn (`SlowPrecisionWarning`, rank zero only) when ``trainer.precision`` is expected to be slower
    than ``32-true`` on the trainer's device; returns the message, or None. Call it at setup."""
    message = slow_precision_message(str(trainer.precision), trainer.strategy.root_device.type)
    if message is not None:
        rank_zero_warn(message, category=SlowPrecisionWarning)
    return message


def fused_clipping_message(precision: str, clip_val: float | None, optimizers) -> str | None:
    """The error for clipping a fused optimizer's gradients under ``16-mixed``, or None where it works.

    ``16-mixed`` scales the loss (a GradScaler); an optimizer that unscales the gradients inside its
    own step (``torch.optim.AdamW(fused=True)``, the methods' default) leaves them scaled until then,
    so Lightning cannot clip them and raises at the first optimizer step. bf16 needs no scaler.

    Args:
        precision: Lightning's precision string (``trainer.precision``).
        clip_val: the clipping value in force (``trainer.gradient_clip_val`` or the module's
            ``max_grad_norm``); None or 0 is no clipping.
        optimizers: the run's optimizers (``trainer.optimizers``).
    """
    if precision != "16-mixed" or not clip_val:
        return None
    if not any(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers):
        return None
    return (
        f"trainer.precision: 16-mixed cannot clip the gradients (at {clip_val}) of a fused optimizer: its "
        "gradients stay loss-scaled until its own step. The methods' default AdamW is fused (as TRL's "
        "adamw_torch_fused); set model.init_args.optimizer to class_path: torch.optim.AdamW with "
        "init_args: {lr: ..., fused: false}, or use trainer.precision: bf16-mixed where the GPU has bfloat16."
    )


def check_fused_clipping(trainer, pl_module) -> None:
    """Raise `fused_clipping_message` as a ValueError before the first step (Lightning would raise at it)."""
    clip_val = trainer.gradient_clip_val or getattr(pl_module, "max_grad_norm", None)
    message = fused_clipping_message(str(trainer.precision), clip_val, trainer.optimizers)
    if message is not None:
        raise ValueError(message)
