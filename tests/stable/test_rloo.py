"""RLOO: leave-one-out advantages, the sequence-level clipped loss, KL in the reward, a learning signal."""

import math
import warnings

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
    """Keep the logged train metrics of every training step."""

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


def test_vllm_importance_sampling_ratio_is_sequence_level_only():
    """RLOO's rollout correction has one weight per completion: a token level is refused, naming the option."""
    logps, mask = torch.zeros(1, 2), torch.ones(1, 2)
    assert vllm_importance_sampling_ratio(logps, logps, mask)[0].shape == (1, 1)  # the default: sequence
    with pytest.raises(ValueError, match="vllm_importance_sampling_level must be one of \\['sequence'\\]"):
        vllm_importance_sampling_ratio(logps, logps, mask, level="token")


def _digits():
    return PatternFractionReward(pattern="[0-9]")


def test_micro_batching_does_not_change_the_update(tiny_model_dir):
    """One generation batch of 8 completions with the KL in the reward (beta 0.05): micro_batch_size 2
    (4 backward passes) gives the same SGD update as one pass over all 8 (same seed, same completions)."""
    rows = [{"prompt": f"Digits only: {i}+1="} for i in range(4)]
    params = []
    for micro_batch_size in (None, 2):
        L.seed_everything(0)
        module = RLOOModule(
            tiny_model_dir,
            random_init=True,
            reward_funcs=[_digits()],
            num_generations=4,
            max_completion_length=6,
            micro_batch_size=micro_batch_size,
            max_grad_norm=None,
            optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        )
        _fit(module, RLOODataModule(tiny_model_dir, rows, batch_size=2), max_steps=1)
        params.append(torch.cat([p.detach().flatten() for p in module.model.parameters()]))
    initial = torch.cat(
        [
            p.detach().flatten()
            for p in RLOOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()]).model.parameters()
        ]
    )
    assert not torch.equal(params[0], initial)  # the step did something
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_missing_reference_model_is_a_clear_error(tiny_model_dir):
    """beta > 0 with a Trainer that has no ReferenceModel fails naming the method and the callback."""
    module = RLOOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], beta=0.1)
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="RLOO needs exactly one lit_posttrain.callbacks.ReferenceModel"):
        module._ref_per_token_logps(ids, mask, 1, 2)


def test_datamodule_max_prompt_length_and_deprecated_aliases(tiny_model_dir, tiny_tokenizer):
    """max_prompt_length keeps a prompt's last tokens without a warning; the deprecated max_length and
    prompt_column still work, each with one FutureWarning naming its replacement and the removal version."""
    rows = [{"question": "Digits only: 41+29=", "answer": "70"}] * 2
    full = tiny_tokenizer(rows[0]["question"], add_special_tokens=False)["input_ids"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datamodule = RLOODataModule(tiny_model_dir, rows, max_prompt_length=4, columns={"prompt": "question"})
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deprecated = RLOODataModule(tiny_model_dir, rows, max_length=4, prompt_column="question")
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(messages) == 2 and all("0.3" in message for message in messages), messages
    assert "max_prompt_length" in messages[0] and "columns" in messages[1]
    for module in (datamodule, deprecated):
        module.setup("fit")
        assert module.train_examples[0]["prompt_ids"] == full[-4:]
        assert module.train_examples[0]["answer"] == "70"
    with pytest.raises(ValueError, match="not both"):
        RLOODataModule(tiny_model_dir, rows, max_prompt_length=8, max_length=4)
