"""XPO: the DPO part and the alpha term by hand, the reference samples from the frozen reference, per-epoch
alpha, a learning signal on held-out prompts, and training with a colocated vLLM engine."""

import doctest
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain.callbacks import VLLMRollout
from lit_posttrain.experimental import xpo
from lit_posttrain.experimental.online_dpo import online_dpo_loss
from lit_posttrain.experimental.xpo import XPODataModule, XPOModule, xpo_loss
from lit_posttrain.rewards import PatternFractionReward
from lit_posttrain.rollout import HFRollout

ROOT = Path(__file__).resolve().parents[2]


def _digits():
    return PatternFractionReward(pattern="[0-9]")


def test_xpo_loss_by_hand():
    """Pair 1, the policy's sample chosen: h = (-1 - -2) - (-3 - -2) = 2, dpo = log(1 + e^-1) = 0.31326 at
    beta 0.5. Pair 2, the reference's sample chosen (mask False): chosen = the reference's sample
    (-3 vs ref -2), rejected = the policy's (-1 vs ref -2): h = -2, dpo = log(1 + e^1) = 1.31326.
    alpha term: 0.1 x log pi(reference's sample) = 0.1 x -3 = -0.3 for both. loss = mean(dpo) - 0.3."""
    t = torch.tensor
    loss, metrics = xpo_loss(
        t([-1.0, -1.0]),
        t([-3.0, -3.0]),
        t([-2.0, -2.0]),
        t([-2.0, -2.0]),
        t([True, False]),
        beta=0.5,
        alpha=0.1,
    )
    dpo = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert metrics["loss/dpo"].item() == pytest.approx(dpo, abs=1e-6)
    assert metrics["loss/xpo"].item() == pytest.approx(-0.3)
    assert loss.item() == pytest.approx(dpo - 0.3, abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 0.5  # the implicit reward agrees on pair 1 only
    assert metrics["logps/chosen"].item() == pytest.approx((-1.0 + -3.0) / 2)  # policy's, then reference's


def test_xpo_alpha_term_gradient():
    """The alpha term adds exactly alpha / B to d loss / d log pi(reference's sample) (it pushes that
    likelihood down: exploration), and alpha = 0 is Online DPO on the same pair."""
    t = torch.tensor
    grads = []
    for alpha in (0.0, 0.2):
        model_ref = t([-3.0, -4.0], requires_grad=True)
        loss, _ = xpo_loss(
            t([-1.0, -2.0]), model_ref, t([-2.0, -2.5]), t([-2.0, -3.5]), t([True, True]), alpha=alpha
        )
        loss.backward()
        grads.append(model_ref.grad.clone())
    assert torch.allclose(grads[1] - grads[0], torch.full((2,), 0.2 / 2))
    loss, _ = xpo_loss(
        t([-1.0, -2.0]), t([-3.0, -4.0]), t([-2.0, -2.5]), t([-2.0, -3.5]), t([True, False]), alpha=0.0
    )
    # Online DPO with chosen = (policy's, reference's) samples and rejected = (reference's, policy's)
    losses, _, _ = online_dpo_loss(t([-1.0, -4.0]), t([-3.0, -2.0]), t([-2.0, -3.5]), t([-2.0, -2.5]))
    assert loss.item() == pytest.approx(losses.mean().item())


def test_bad_options_name_the_key(tiny_model_dir):
    """Bad values fail in __init__, naming the option."""
    for kwargs, match in [
        ({"loss_type": "hinge"}, "loss_type must be one of"),
        ({"alpha": []}, "alpha: give a number or a non-empty list"),
        ({"beta": -0.1}, "beta must be > 0"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            XPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], **kwargs)


def test_docstring_examples(monkeypatch):
    """The module's docstring examples print what they show (experimental modules are not in test_doctests)."""
    monkeypatch.chdir(ROOT)
    result = doctest.testmod(xpo, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


class _Record(L.Callback):
    """Keep the logged train metrics of every step and val/reward of every validation (sanity check first)."""

    def __init__(self):
        self.history, self.val_rewards = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.history.append({k: float(v) for k, v in metrics.items() if k.startswith(("train/", "vllm/"))})

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val_rewards.append(float(trainer.callback_metrics["val/reward"]))


def _fit(module, datamodule, max_steps, callbacks=(), **trainer_kwargs):
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule)
    return trainer


def test_learning_signal_digits(tiny_model_dir):
    """On a random-init tiny model XPO (beta 0.1, alpha 1e-5) raises the digit reward of the policy's samples:
    greedy val/reward on held-out prompts rises from the sanity check (~0), the train reward's last-3 mean
    beats its first-3 mean by > 0.05 (measured, seeds 0-2: +0.31, +0.08, +0.25), while the reference's samples
    (the frozen initial policy) stay at the random-policy level (~0.1)."""
    L.seed_everything(0)
    module = XPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits()], max_new_tokens=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )  # fmt: skip
    rows = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(64)]
    val = [{"prompt": f"Digits only: {i}+{i % 5}="} for i in range(100, 116)]  # prompts never trained on
    record = _Record()
    _fit(
        module, XPODataModule(tiny_model_dir, rows, val_data=val, batch_size=8), max_steps=12,
        callbacks=[record], num_sanity_val_steps=-1, val_check_interval=12, check_val_every_n_epoch=None,
    )  # fmt: skip
    before, after = record.val_rewards[0], record.val_rewards[-1]
    assert after > before + 0.5, record.val_rewards  # measured (seeds 0-2): 0.0 -> 1.0
    rewards = [step["train/reward"] for step in record.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, rewards
    ref_scores = [step["train/objective/ref_scores"] for step in record.history]
    assert sum(ref_scores[-3:]) / 3 < 0.2, ref_scores  # the reference does not learn
    assert record.history[-1]["train/alpha"] == pytest.approx(1e-5)


def test_xpo_with_vllm_rollout(tiny_model_dir):
    """XPO trains with the policy's samples from a colocated vLLM engine (one weight sync per step) and the
    reference's from HF generate on the frozen reference; finite losses; HFRollout is given back."""
    L.seed_everything(0)
    module = XPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits()], max_new_tokens=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )  # fmt: skip
    rows = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(32)]
    record = _Record()
    callback = VLLMRollout(kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)
    _fit(module, XPODataModule(tiny_model_dir, rows, batch_size=8), max_steps=3, callbacks=[callback, record])
    assert [step["vllm/policy_version"] for step in record.history] == [0, 1, 2]
    assert all(math.isfinite(step["train/loss"]) for step in record.history)
    assert isinstance(module.rollout, HFRollout) and callback.rollout is None
    assert isinstance(module.ref_rollout, HFRollout)  # the reference's samples never go through vLLM
