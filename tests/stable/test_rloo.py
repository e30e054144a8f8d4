"""RLOO: leave-one-out advantages, the sequence-level clipped loss, KL in the reward, a learning signal."""

import math

import lightning as L
import pytest
import torch

from lit_posttrain import RLOODataModule, RLOOModule, rloo_advantages
from lit_posttrain.rewards import PatternFractionReward
from lit_posttrain.stable.rloo import rloo_loss, vllm_importance_sampling_ratio

NAN = float("nan")


def test_rloo_advantages_by_hand():
    """Baseline = mean of the other rewards: [1, 2, 3, 6] -> 1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2."""
    advantages = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 1.0, 3.0, 5.0, 5.0]), 4)
    assert torch.allclose(advantages[:4], torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))
    # equivalently G / (G - 1) * (r - group mean); a group [1, 3, 5, 5] has mean 3.5
    assert torch.allclose(advantages[4:], 4 / 3 * (torch.tensor([1.0, 3.0, 5.0, 5.0]) - 3.5))
    assert torch.allclose(rloo_advantages(torch.tensor([1.0, 3.0]), 2), torch.tensor([-2.0, 2.0]))  # G = 2
    assert torch.equal(rloo_advantages(torch.full((3,), 0.25), 3), torch.zeros(3))  # constant group


def test_rloo_advantages_nan_is_unscorable():
    """NaN rewards get advantage 0 and are left out of the others' baselines; a lone scorable sample gets 0."""
    advantages = rloo_advantages(torch.tensor([1.0, NAN, 3.0, NAN, 5.0, NAN]), 3)
    assert torch.allclose(advantages, torch.tensor([1 - 3.0, 0.0, 3 - 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="num_generations=4"):
        rloo_advantages(torch.zeros(6), 4)


def test_rloo_loss_on_policy_is_reinforce():
    """Ratio exactly 1 (old = detached current): loss = -mean(A), gradient = -A / B on every token of o_i."""
    per_token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -3.0])
    loss, metrics = rloo_loss(per_token_logps, per_token_logps.detach(), advantages, mask)
    assert loss.item() == pytest.approx(-(1.0 - 3.0) / 2)
    loss.backward()
    assert torch.allclose(per_token_logps.grad, torch.tensor([[-0.5, -0.5, 0.0], [1.5, 1.5, 1.5]]))
    assert metrics["clip_ratio/region_mean"] == 0


def test_rloo_loss_sequence_ratio_clips():
    """Token ratios 1.1 and 1.1 make a sequence ratio 1.21 (sum of log-ratios): clipped to 1.2 for A > 0,
    while 0.9 * 0.9 = 0.81 stays inside [0.8, 1.2] for A < 0."""
    old = torch.zeros(2, 2)
    per_token_logps = torch.tensor([[math.log(1.1)] * 2, [math.log(0.9)] * 2], requires_grad=True)
    loss, metrics = rloo_loss(per_token_logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    assert loss.item() == pytest.approx((-1.2 + 0.81) / 2)
    assert metrics["clip_ratio/high_mean"] == 0.5 and metrics["clip_ratio/low_mean"] == 0
    loss.backward()
    assert torch.equal(per_token_logps.grad[0], torch.zeros(2))  # the clipped sequence has no gradient
    assert torch.allclose(per_token_logps.grad[1], torch.full((2,), 0.81 / 2))


class _Record(L.Callback):
    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        )


def _fit(module, datamodule, max_steps, callbacks=()):
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule)
    return trainer


def test_learning_signal_digits_with_kl_in_reward(tiny_model_dir):
    """On a random-init tiny model RLOO (beta=0.05, default ReferenceModel) raises the digit-fraction reward
    well above its start (~0.1); the KL to the reference starts at exactly 0 (policy == reference)."""
    L.seed_everything(0)
    module = RLOOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        num_generations=4,
        max_completion_length=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    rows = [{"prompt": f"Digits only: {i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(64)]
    record = _Record()
    _fit(module, RLOODataModule(tiny_model_dir, rows, batch_size=8), max_steps=12, callbacks=[record])
    assert record.history[0]["train/kl"] == 0.0
    assert record.history[-1]["train/kl"] != 0.0
    rewards = [step["train/reward"] for step in record.history]
    # num_iterations=1: old log-probs are the detached current ones, the ratio is exactly 1, nothing clips
    assert all(step["train/clip_ratio/region_mean"] == 0 for step in record.history)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.25, rewards  # measured (seeds 0-2): +0.40 to +0.53


def test_rloo_loss_importance_sampling_ratio_weights_each_completion():
    """The rollout-correction weight multiplies each completion's loss term: on policy the terms are
    -A = [-1, 2]; weighted by [2, 0.5] they average (-2 + 1) / 2 = -0.5."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    weights, _ = vllm_importance_sampling_ratio(
        logps, logps + torch.tensor([[-math.log(2.0), 0.0], [math.log(2.0), 0.0]]), torch.ones(2, 2), level="sequence"
    )  # (2, 1): 2 and 0.5
    loss, _ = rloo_loss(logps, logps, torch.tensor([1.0, -2.0]), torch.ones(2, 2), importance_sampling_ratio=weights)
    assert loss.item() == pytest.approx(-0.5)


def test_rloo_takes_sequence_level_importance_sampling_only(tiny_model_dir):
    """RLOO's loss has one term per completion: token-level correction weights are refused, naming why."""
    with pytest.raises(ValueError, match="RLOO's loss has one term per completion"):
        RLOOModule(
            tiny_model_dir, random_init=True, reward_funcs=[PatternFractionReward(pattern="[0-9]")],
            vllm_importance_sampling_level="token",
        )  # fmt: skip
