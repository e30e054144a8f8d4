"""Low precision on CPU: the slow-precision warning (lit_posttrain/precision.py)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lit_posttrain import precision
from lit_posttrain.precision import (
    SlowPrecisionWarning,
    fused_clipping_message,
    slow_precision_message,
    warn_if_slow_precision,
)


def _slow_warnings(trainer: L.Trainer) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_slow_precision(trainer)
    return [str(w.message) for w in caught if issubclass(w.category, SlowPrecisionWarning)]


@pytest.fixture
def cpu_without_native_low_precision(monkeypatch):
    """A CPU without AVX512-BF16, AMX or AMX-FP16 (what this machine looks like to oneDNN with
    ONEDNN_MAX_CPU_ISA=AVX512_CORE)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: False)


@pytest.mark.parametrize("trainer_precision", ["bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true"])
def test_low_precision_on_a_cpu_without_native_support_warns(trainer_precision, cpu_without_native_low_precision):
    """bf16 / fp16 on a CPU that emulates them: one SlowPrecisionWarning naming the precision as the
    Trainer resolved it, the slowdown and the 32-true alternative."""
    trainer = L.Trainer(accelerator="cpu", precision=trainer_precision, logger=False)
    messages = _slow_warnings(trainer)
    assert len(messages) == 1
    assert f"trainer.precision: {trainer.precision} " in messages[0]
    assert "slower" in messages[0] and "32-true" in messages[0]
    assert ("3.7x" if trainer.precision.startswith("bf16") else "137 vs 123") in messages[0]


def test_32_true_never_warns(cpu_without_native_low_precision):
    """The float32 default gets no warning, even on a CPU without any native low precision."""
    assert _slow_warnings(L.Trainer(accelerator="cpu", precision="32-true", logger=False)) == []
    assert slow_precision_message("32-true", "cpu") is None


def test_bf16_on_a_cpu_with_native_bf16_does_not_warn(monkeypatch):
    """bf16 on a CPU with AVX512-BF16 / AMX (where bf16 was measured faster than fp32, docs/benchmarks.md)
    is not flagged; neither is any precision on a GPU."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    for trainer_precision in ("bf16-mixed", "bf16-true"):
        assert _slow_warnings(L.Trainer(accelerator="cpu", precision=trainer_precision, logger=False)) == []
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert slow_precision_message("bf16-mixed", "cuda") is None


def test_this_cpu_is_probed_for_its_own_support():
    """The capability probes read this CPU (no mock): bf16-mixed warns exactly when it lacks native bf16."""
    message = slow_precision_message("bf16-mixed", "cpu")
    assert (message is None) == precision.cpu_has_native_bf16()


def test_a_fit_warns_at_setup(tiny_model_dir, cpu_without_native_low_precision):
    """Every method's default TrainingDiagnostics callback issues the warning when a fit starts (one step of SFT in
    bf16-mixed on a CPU without native bf16), and not for the same fit in 32-true."""
    from lit_posttrain import SFTDataModule, SFTModule

    rows = [{"prompt": "1+2=", "completion": "3"}] * 4

    def fit_warnings(trainer_precision: str) -> list[str]:
        module = SFTModule(tiny_model_dir, random_init=True)
        trainer = L.Trainer(
            accelerator="cpu", precision=trainer_precision, max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, SFTDataModule(tiny_model_dir, train_data=rows, batch_size=2))
        return [str(w.message) for w in caught if issubclass(w.category, SlowPrecisionWarning)]

    assert len(fit_warnings("bf16-mixed")) == 1
    assert fit_warnings("32-true") == []


def test_16_mixed_with_clipping_refuses_a_fused_optimizer_before_the_first_step():
    """Lightning's 16-mixed cannot clip the still-scaled gradients of an optimizer that unscales in its
    own step (fused AdamW, the methods' default), and raises at the first step; `check_fused_clipping`
    (the default TrainingDiagnostics' on_fit_start) says so before it, naming the option to set. bf16
    (no scaler), no clipping, or an unfused AdamW pass."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    params = [torch.nn.Parameter(torch.zeros(2))]
    fused, unfused = torch.optim.AdamW(params, fused=True), torch.optim.AdamW(params)
    # the premise, in Lightning's own plugin (16-mixed itself is turned into bf16-mixed on a CPU Trainer)
    with pytest.raises(RuntimeError, match="fused"):
        MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")).clip_gradients(fused, 1.0)
    message = fused_clipping_message("16-mixed", 1.0, [fused])
    assert "16-mixed" in message and "fused: false" in message and "bf16-mixed" in message
    assert fused_clipping_message("16-mixed", 1.0, [unfused]) is None
    assert fused_clipping_message("16-mixed", None, [fused]) is None
    assert fused_clipping_message("16-mixed", 0.0, [fused]) is None
    assert fused_clipping_message("bf16-mixed", 1.0, [fused]) is None
    assert fused_clipping_message("32-true", 1.0, [fused]) is None
