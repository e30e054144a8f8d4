"""Online DPO: the loss is DPO's on the same numbers, pairs ranked by reward (EOS penalty first), per-epoch
beta, a learning signal on held-out prompts, and training with a colocated vLLM engine."""

import doctest
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain.callbacks import ReferenceModel, VLLMRollout
from lit_posttrain.experimental import online_dpo
from lit_posttrain.experimental.online_dpo import OnlineDPODataModule, OnlineDPOModule, online_dpo_loss
from lit_posttrain.rewards import PatternFractionReward
from lit_posttrain.rollout import HFRollout
from lit_posttrain.stable.dpo import dpo_loss

ROOT = Path(__file__).resolve().parents[2]


def _digits():
    return PatternFractionReward(pattern="[0-9]")


def test_online_dpo_loss_by_hand():
    """h = (-1 - -2) - (-3 - -2) = 2. beta 0.5: sigmoid -log sigmoid(1) = log(1 + e^-1) = 0.31326;
    ipo (2 - 1 / (2 * 0.5))^2 = 1; implicit rewards 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5."""
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    losses, chosen, rejected = online_dpo_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert chosen.item() == 0.5 and rejected.item() == -0.5
    losses, _, _ = online_dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert losses.item() == pytest.approx(1.0)
    # policy == reference: h = 0, the sigmoid loss is log 2
    zeros = torch.zeros(3)
    assert torch.allclose(online_dpo_loss(zeros, zeros, zeros, zeros)[0], torch.full((3,), math.log(2.0)))


def test_online_dpo_loss_equals_dpo_loss():
    """On the same summed log-probs Online DPO's sigmoid is DPOModule's sigmoid, and its ipo is DPOModule's
    ipo with lengths 1 (TRL's OnlineDPOTrainer uses summed, not per-token, log-ratios)."""
    torch.manual_seed(0)
    logps = [-10 * torch.rand(5) for _ in range(4)]
    for beta in (0.1, 0.7):
        for loss_type in ("sigmoid", "ipo"):
            ours = online_dpo_loss(*logps, beta=beta, loss_type=loss_type)
            ones = torch.ones(5)
            theirs = dpo_loss(
                *logps, beta=beta, loss_type=loss_type, chosen_num_tokens=ones, rejected_num_tokens=ones
            )
            for a, b in zip(ours, theirs):
                assert torch.allclose(a, b)
    with pytest.raises(ValueError, match="loss_type must be one of \\['sigmoid', 'ipo'\\]"):
        online_dpo_loss(*logps, loss_type="hinge")


def test_online_dpo_loss_gradient_raises_chosen_lowers_rejected():
    """The gradient of the loss lowers -log pi(chosen) and raises -log pi(rejected): a step widens the margin."""
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = online_dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    losses.sum().backward()
    # d/dh -log sigmoid(beta h) at h = 0 is -beta / 2 = -0.05
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)


def test_bad_options_name_the_key(tiny_model_dir):
    """Bad values fail in __init__, naming the option."""
    for kwargs, match in [
        ({"loss_type": "hinge"}, "loss_type must be one of"),
        ({"beta": []}, "beta: give a number or a non-empty list"),
        ({"beta": [0.1, 0.0]}, "beta must be > 0"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            OnlineDPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], **kwargs)


def test_docstring_examples(monkeypatch):
    """The module's docstring examples print what they show (experimental modules are not in test_doctests)."""
    monkeypatch.chdir(ROOT)
    result = doctest.testmod(online_dpo, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
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


def test_per_epoch_beta_and_missing_eos_penalty(tiny_model_dir):
    """beta=[0.1, 0.5] gives 0.1 in epoch 0 and 0.5 in epoch 1 (2 batches per epoch); the EOS penalty is
    taken off every completion without EOS before ranking: scores = raw reward - 10 x (no-EOS fraction),
    and the chosen completion never scores below the rejected one."""
    L.seed_everything(0)
    module = OnlineDPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits()], max_new_tokens=3, beta=[0.1, 0.5],
        missing_eos_penalty=10.0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )  # fmt: skip
    rows = [{"prompt": f"Digits only: {i}+1="} for i in range(8)]
    record = _Record()
    _fit(module, OnlineDPODataModule(tiny_model_dir, rows, batch_size=4), max_steps=4, callbacks=[record])
    assert [step["train/beta"] for step in record.history] == pytest.approx([0.1, 0.1, 0.5, 0.5])
    for step in record.history:
        raw, eos = step["train/rewards/PatternFractionReward/mean"], step["train/val/contain_eos_token"]
        assert eos < 1.0  # 3 new tokens: some completions miss EOS, so the penalty shows
        assert step["train/objective/scores"] == pytest.approx(raw - 10.0 * (1.0 - eos), abs=1e-5)
        assert step["train/objective/scores_margin"] >= 0.0
        assert math.isfinite(step["train/loss"])


def test_learning_signal_digits(tiny_model_dir):
    """On a random-init tiny model Online DPO (beta 0.1, default ReferenceModel) raises the digit reward:
    greedy val/reward on held-out prompts rises from the sanity check (~0) to after training, and the train
    reward's last-3 mean beats its first-3 mean by > 0.08 (measured, seeds 0-2: +0.31, +0.19, +0.13)."""
    L.seed_everything(0)
    module = OnlineDPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits()], max_new_tokens=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )  # fmt: skip
    rows = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(64)]
    val = [{"prompt": f"Digits only: {i}+{i % 5}="} for i in range(100, 116)]  # prompts never trained on
    record = _Record()
    _fit(
        module, OnlineDPODataModule(tiny_model_dir, rows, val_data=val, batch_size=8), max_steps=12,
        callbacks=[record], num_sanity_val_steps=-1, val_check_interval=12, check_val_every_n_epoch=None,
    )  # fmt: skip
    before, after = record.val_rewards[0], record.val_rewards[-1]
    assert after > before + 0.5, record.val_rewards  # measured (seeds 0-2): 0.0 -> 1.0
    rewards = [step["train/reward"] for step in record.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.08, rewards
    assert record.history[-1]["train/rewards/accuracies"] > 0.5  # the implicit reward ranks the pairs
    assert record.history[0]["train/objective/kl"] == 0.0  # policy == reference before the first step


def test_missing_reference_is_refused_when_precomputed(tiny_model_dir):
    """ReferenceModel(precompute_ref_logps=True) has nothing to precompute for online samples: a clear error."""
    module = OnlineDPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], max_new_tokens=2)
    rows = [{"prompt": "Digits only: 1+1="}] * 4
    with pytest.raises(ValueError, match="precompute_ref_logps=True\\) does not apply"):
        _fit(module, OnlineDPODataModule(tiny_model_dir, rows, batch_size=2), max_steps=1,
             callbacks=[ReferenceModel(precompute_ref_logps=True)])  # fmt: skip


def test_online_dpo_with_vllm_rollout(tiny_model_dir):
    """Online DPO trains on a colocated vLLM engine's completions: one weight sync per step, finite losses,
    and the module gets its HFRollout back afterwards."""
    L.seed_everything(0)
    module = OnlineDPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits()], max_new_tokens=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )  # fmt: skip
    rows = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(32)]
    record = _Record()
    callback = VLLMRollout(kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)
    _fit(
        module,
        OnlineDPODataModule(tiny_model_dir, rows, batch_size=8),
        max_steps=3,
        callbacks=[callback, record],
    )
    assert [step["vllm/policy_version"] for step in record.history] == [0, 1, 2]
    assert all(math.isfinite(step["train/loss"]) for step in record.history)
    assert all(step["train/objective/scores_margin"] >= 0 for step in record.history)
    assert isinstance(module.rollout, HFRollout) and callback.rollout is None
