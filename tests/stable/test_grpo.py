"""GRPO: advantages, loss variants (hand-derived), the training loop, and a learning signal."""

import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain import GRPODataModule, GRPOModule, group_advantages, grpo_loss
from lit_posttrain.rewards import PatternFractionReward
from lit_posttrain.stable.grpo import vllm_importance_sampling_ratio

ROOT = Path(__file__).resolve().parents[2]

NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------
def test_group_advantages_three_scalings_by_hand():
    """Groups [1, 2] and [3, 4]: deviations -0.5 / +0.5; group std sqrt(0.5), batch std of 1..4 sqrt(5/3)."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    deviations = torch.tensor([-0.5, 0.5, -0.5, 0.5])
    group = group_advantages(rewards, 2, scale_rewards="group")
    assert torch.allclose(group, deviations / (math.sqrt(0.5) + 1e-4))
    batch = group_advantages(rewards, 2, scale_rewards="batch")
    assert torch.allclose(batch, deviations / (math.sqrt(5 / 3) + 1e-4))
    assert torch.allclose(group_advantages(rewards, 2, scale_rewards="none"), deviations)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(rewards, 2, scale_rewards="rank")


def test_group_advantages_constant_group_is_zero():
    """A group whose completions all score the same gives no signal: advantage exactly 0."""
    advantages = group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.0, 1.0, 0.5]), 3)
    assert torch.equal(advantages[:3], torch.zeros(3))
    assert advantages[3] < 0 < advantages[4] and advantages[5] == 0


def test_group_advantages_nan_is_unscorable():
    """NaN rewards get advantage 0 and are left out of their group's mean and std."""
    advantages = group_advantages(torch.tensor([1.0, NAN, 3.0, NAN, NAN, NAN, NAN, 5.0, 9.0]), 3)
    # group 1: mean 2 and std sqrt(2) over [1, 3]; group 2 unscorable; group 3: one scorable sample
    expected = torch.tensor([-1 / (math.sqrt(2) + 1e-4), 0.0, 1 / (math.sqrt(2) + 1e-4), 0, 0, 0, 0, 0, 0])
    expected[7:] = torch.tensor([-2, 2]) / (math.sqrt(8) + 1e-4)
    assert torch.allclose(advantages, expected)
    with pytest.raises(ValueError, match="num_generations=4"):
        group_advantages(torch.zeros(6), 4)


# ---------------------------------------------------------------------------------------------
# grpo_loss
# ---------------------------------------------------------------------------------------------
def _on_policy_batch():
    """Two completions, 2 and 3 tokens, advantages +1 and -2, ratio exactly 1 (old = current)."""
    per_token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return per_token_logps, per_token_logps.detach(), torch.tensor([1.0, -2.0]), mask


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        # per-token losses: -A -> row 0: -1, -1; row 1: 2, 2, 2 (sum over tokens = -2 + 6 = 4)
        ("grpo", {}, (-1 + 2) / 2),  # mean of per-sequence means
        ("bnpo", {}, 4 / 5),  # over the batch's 5 tokens
        ("dr_grpo", {"max_completion_length": 4}, 4 / (2 * 4)),  # batch x max_completion_length
        ("dapo", {}, 4 / 5),  # default: this batch's tokens
        ("dapo", {"num_items_in_batch": 10}, 4 / 10),  # the whole optimizer step's tokens
    ],
)
def test_grpo_loss_types_by_hand(loss_type, kwargs, expected):
    """With ratio 1 the per-token loss is -A; each loss_type normalises it as its paper says."""
    per_token_logps, old, advantages, mask = _on_policy_batch()
    loss, metrics = grpo_loss(per_token_logps, old, advantages, mask, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected)
    assert metrics["clip_ratio/region_mean"] == 0 and "kl" not in metrics


def test_grpo_loss_gradient_is_the_policy_gradient():
    """On-policy (num_iterations=1: old = detached current, ratio exactly 1) d loss / d logp = -A / |o_i| (grpo)."""
    per_token_logps, old, advantages, mask = _on_policy_batch()
    assert torch.equal(torch.exp(per_token_logps - old), torch.ones(2, 3))
    loss, _ = grpo_loss(per_token_logps, old, advantages, mask, loss_type="grpo")
    loss.backward()
    expected = torch.tensor([[-1 / 2, -1 / 2, 0.0], [2 / 3, 2 / 3, 2 / 3]]) / 2  # mean over 2 sequences
    assert torch.allclose(per_token_logps.grad, expected)


def test_grpo_loss_unknown_values_raise():
    """An unknown loss_type or importance_sampling_level, or dr_grpo without its normaliser, raises naming it."""
    per_token_logps, old, advantages, mask = _on_policy_batch()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(per_token_logps, old, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(per_token_logps, old, advantages, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        grpo_loss(per_token_logps, old, advantages, mask, importance_sampling_level="word")


def test_grpo_loss_clipping_low_and_high():
    """Ratio 1.5 with A=+1 is clipped to 1.2 (high); ratio 0.5 with A=-1 to 0.8 (low): no gradient, metrics 1/2 each."""
    old = torch.zeros(2, 1)
    per_token_logps = torch.tensor([[math.log(1.5)], [math.log(0.5)]], requires_grad=True)
    advantages, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 1)
    loss, metrics = grpo_loss(per_token_logps, old, advantages, mask, loss_type="bnpo", epsilon=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    loss.backward()
    assert torch.equal(per_token_logps.grad, torch.zeros(2, 1))
    assert metrics["clip_ratio/low_mean"] == 0.5 and metrics["clip_ratio/high_mean"] == 0.5
    assert metrics["clip_ratio/region_mean"] == 1.0
    # epsilon_high = 0.6 (clip-higher): 1.5 is inside [0.8, 1.6], only the low side clips
    loss, metrics = grpo_loss(
        per_token_logps, old, advantages, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.6
    )
    assert loss.item() == pytest.approx((-1.5 + 0.8) / 2)
    assert metrics["clip_ratio/high_mean"] == 0 and metrics["clip_ratio/low_mean"] == 0.5
    # the pessimistic side is never clipped: ratio 1.5 with A = -1 keeps its loss 1.5 and its gradient
    loss, metrics = grpo_loss(per_token_logps[:1], old[:1], torch.tensor([-1.0]), mask[:1], loss_type="bnpo")
    assert loss.item() == pytest.approx(1.5) and metrics["clip_ratio/region_mean"] == 0


def test_grpo_loss_k3_kl():
    """pi_ref / pi_theta = 2 on one token: k3 = 2 - ln 2 - 1; with A = 0 the loss is beta * k3."""
    per_token_logps = torch.tensor([[-1.0]])
    ref = per_token_logps + math.log(2.0)
    k3 = 2 - math.log(2) - 1
    loss, metrics = grpo_loss(
        per_token_logps, per_token_logps, torch.zeros(1), torch.ones(1, 1), beta=0.1, ref_per_token_logps=ref
    )
    assert loss.item() == pytest.approx(0.1 * k3) and metrics["kl"].item() == pytest.approx(k3)
    loss, metrics = grpo_loss(
        per_token_logps,
        per_token_logps,
        torch.zeros(1),
        torch.ones(1, 1),
        beta=0.1,
        ref_per_token_logps=per_token_logps,
    )
    assert loss.item() == 0 and metrics["kl"].item() == 0  # policy == reference
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo_loss(per_token_logps, per_token_logps, torch.zeros(1), torch.ones(1, 1), beta=0.1)


def test_grpo_loss_sequence_level_ratio():
    """GSPO: token log-ratios [ln 2, 0] give one ratio exp(ln 2 / 2) = sqrt 2 for the sequence."""
    old = torch.zeros(1, 3)
    per_token_logps = torch.tensor([[math.log(2.0), 0.0, 5.0]])  # the third token is padding
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = grpo_loss(
        per_token_logps,
        old,
        torch.ones(1),
        mask,
        importance_sampling_level="sequence",
        epsilon=0.2,
        epsilon_high=0.5,
    )
    assert loss.item() == pytest.approx(-math.sqrt(2))
    loss, metrics = grpo_loss(per_token_logps, old, torch.ones(1), mask, importance_sampling_level="sequence")
    assert (
        loss.item() == pytest.approx(-1.2) and metrics["clip_ratio/high_mean"] == 1.0
    )  # one clipped sequence


def test_grpo_loss_dapo_is_invariant_to_micro_batching():
    """dapo with num_items_in_batch = the step's tokens: micro-batch losses add up to the full-batch loss."""
    torch.manual_seed(0)
    per_token_logps, old = torch.randn(4, 5), torch.randn(4, 5)
    advantages, mask = torch.randn(4), (torch.rand(4, 5) > 0.3).long()
    full, _ = grpo_loss(per_token_logps, old, advantages, mask)
    halves = [
        grpo_loss(per_token_logps[s], old[s], advantages[s], mask[s], num_items_in_batch=mask.sum())[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert torch.allclose(sum(halves), full)


def test_grpo_loss_entropy_mask_drops_policy_term_only():
    """Masked-out (low-entropy) tokens keep no policy-gradient term but still count in the normaliser."""
    per_token_logps, old, advantages, mask = _on_policy_batch()
    entropy_mask = torch.tensor([[1, 0, 0], [0, 0, 1]])
    loss, _ = grpo_loss(per_token_logps, old, advantages, mask, loss_type="bnpo", entropy_mask=entropy_mask)
    assert loss.item() == pytest.approx((-1 + 2) / 5)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
def _digits():
    return PatternFractionReward(pattern="[0-9]")


def test_batch_size_that_does_not_fit_names_the_options(tiny_model_dir):
    """3 prompts x 2 generations = 6 completions cannot make 4 optimizer steps: the error says what to change."""
    module = GRPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits()], num_generations=2, steps_per_generation=4
    )
    with pytest.raises(ValueError) as info:
        module._split_sizes(3)
    message = str(info.value)
    for option in (
        "data.batch_size (3)",
        "model.num_generations (2)",
        "model.steps_per_generation (4)",
        "model.micro_batch_size",
    ):
        assert option in message
    assert "e.g. data.batch_size: 4" in message
    module.steps_per_generation, module.micro_batch_size = 1, 4
    with pytest.raises(ValueError, match="divisible by 4"):
        module._split_sizes(3)  # 6 completions in micro-batches of 4
    assert module._split_sizes(4) == (8, 4)  # one optimizer step of 8 completions, two micro-batches


def test_bad_options_raise(tiny_model_dir):
    """Out-of-range num_generations, mismatched reward_weights and an unknown loss_type raise naming the key."""
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], num_generations=1)
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1 reward_funcs"):
        GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], loss_type="ppo")


def _fit(module, datamodule, max_steps, callbacks=(), **trainer_kwargs):
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **{"logger": False, **trainer_kwargs},
    )
    trainer.fit(module, datamodule)
    return trainer


class _Record(L.Callback):
    """Keep the logged train metrics of every training step."""

    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        )


def test_all_options_together_conversational(tiny_model_dir):
    """mu=2 x 2 optimizer steps with micro-batches, beta>0 (default ReferenceModel), chat prompts, extra
    columns for the reward, truncated masking, top-entropy tokens, and validation logging val/reward."""
    seen = {}

    def answer_reward(prompts, completions, answer, completion_ids, **kwargs):
        if not seen:  # the first call: training (no sanity check)
            seen.update(prompt=prompts[0], completion=completions[0], answer=answer, ids=completion_ids[0])
        return [float(a == "4") if i % 3 else None for i, a in enumerate(answer)]

    rows = [{"prompt": [{"role": "user", "content": f"{i}+2"}], "answer": str(i + 2)} for i in range(8)]
    module = GRPOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[_digits(), answer_reward],
        reward_weights=[1.0, 0.5],
        num_generations=4,
        max_completion_length=6,
        num_iterations=2,
        steps_per_generation=2,
        micro_batch_size=2,
        beta=0.04,
        epsilon_high=0.28,
        loss_type="grpo",
        mask_truncated_completions=True,
        top_entropy_quantile=0.5,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    datamodule = GRPODataModule(tiny_model_dir, rows, val_data=rows[:2], batch_size=2)
    record = _Record()
    trainer = _fit(
        module,
        datamodule,
        max_steps=4,
        callbacks=[record],
        limit_val_batches=1,
        val_check_interval=1,
        num_sanity_val_steps=0,
    )
    assert (
        trainer.global_step == 4 and len(record.history) == 1
    )  # one generation batch, 2 x 2 optimizer steps
    metrics = trainer.callback_metrics
    assert seen["prompt"][0]["role"] == "user" and seen["completion"][0]["role"] == "assistant"
    assert len(seen["answer"]) == 8 and isinstance(seen["ids"], list)  # columns repeated per generation
    for name in (
        "train/kl",
        "train/entropy",
        "train/clip_ratio/region_mean",
        "train/rewards/answer_reward/mean",
        "train/rewards/PatternFractionReward/std",
        "train/frac_reward_zero_std",
        "train/num_tokens",
        "train/completions/clipped_ratio",
        "val/reward",
        "val/rewards/answer_reward/mean",
    ):
        assert name in metrics, name
    assert metrics["train/kl"] >= 0


def test_learning_signal_digits(tiny_model_dir):
    """On a random-init tiny model GRPO raises the digit-fraction reward well above its start (~0.1)."""
    L.seed_everything(0)
    module = GRPOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[_digits()],
        num_generations=8,
        max_completion_length=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    rows = [{"prompt": f"Digits only: {i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(64)]
    record = _Record()
    _fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=4), max_steps=12, callbacks=[record])
    rewards = [step["train/reward"] for step in record.history]
    # num_iterations=1: old log-probs are the detached current ones, the ratio is exactly 1, nothing clips
    assert all(step["train/clip_ratio/region_mean"] == 0 for step in record.history)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards  # measured (seeds 0-2): +0.57 to +0.62


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_micro_batching_does_not_change_the_update(tiny_model_dir, loss_type):
    """One generation batch of 8 completions: micro_batch_size 2 (4 backward passes) gives the same SGD update
    as one pass over all 8 (same seed, so the same completions)."""
    rows = [{"prompt": f"Digits only: {i}+1="} for i in range(4)]
    params = []
    for micro_batch_size in (None, 2):
        L.seed_everything(0)
        module = GRPOModule(
            tiny_model_dir,
            random_init=True,
            reward_funcs=[_digits()],
            num_generations=4,
            max_completion_length=6,
            micro_batch_size=micro_batch_size,
            loss_type=loss_type,
            max_grad_norm=None,
            optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        )
        _fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=2), max_steps=1)
        params.append(torch.cat([p.detach().flatten() for p in module.model.parameters()]))
    initial = torch.cat(
        [
            p.detach().flatten()
            for p in GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()]).model.parameters()
        ]
    )
    assert not torch.equal(params[0], initial)  # the step did something
    assert torch.allclose(params[0], params[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# rollout/trainer mismatch: vLLM importance-sampling correction
# ---------------------------------------------------------------------------------------------
def test_vllm_importance_sampling_ratio_by_hand():
    """token/sequence x truncate/mask weights pi_old / pi_sampler on hand-computed log-prob gaps;
    padding tokens take no part."""
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.5, -1.0, -3.0]])  # gaps +0.5, -1.0 on the two completion tokens
    mask = torch.tensor([[1, 1, 0]])
    e = math.exp
    weights, metrics = vllm_importance_sampling_ratio(old, sampler, mask, level="token", mode="truncate", cap=1.5)
    assert torch.allclose(weights, torch.tensor([[1.5, e(-1.0), 1.0]]))  # e^0.5 = 1.65 truncated to 1.5
    assert metrics["sampling/logp_diff/mean"].item() == pytest.approx(0.75)
    assert metrics["sampling/logp_diff/max"].item() == pytest.approx(1.0)
    assert metrics["sampling/importance_ratio/min"].item() == pytest.approx(e(-1.0))
    assert metrics["sampling/importance_ratio/mean"].item() == pytest.approx((1.5 + e(-1.0)) / 2)
    assert metrics["sampling/importance_ratio/max"].item() == pytest.approx(1.5)
    weights, _ = vllm_importance_sampling_ratio(old, sampler, mask, level="token", mode="mask", cap=1.5)
    assert torch.allclose(weights, torch.tensor([[0.0, e(-1.0), 1.0]]))  # above the cap: dropped
    weights, metrics = vllm_importance_sampling_ratio(old, sampler, mask, level="sequence", mode="mask", cap=3.0)
    assert weights.shape == (1, 1) and weights.item() == pytest.approx(e(-0.5))  # e^(0.5 - 1.0)
    assert metrics["sampling/importance_ratio/max"].item() == pytest.approx(e(-0.5))
    high = torch.tensor([[-3.0, -3.0, -3.0]])  # gaps +2.0, +1.0: the sequence ratio e^3 = 20.1
    assert vllm_importance_sampling_ratio(old, high, mask, level="sequence", mode="truncate")[0].item() == 3.0
    assert vllm_importance_sampling_ratio(old, high, mask, level="sequence", mode="mask")[0].item() == 0.0
    with pytest.raises(ValueError, match="vllm_importance_sampling_level must be one of"):
        vllm_importance_sampling_ratio(old, sampler, mask, level="tokens")
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be one of"):
        vllm_importance_sampling_ratio(old, sampler, mask, mode="clip")


def test_grpo_loss_importance_sampling_ratio_weights_policy_term_only():
    """The correction weights scale each token's policy-gradient term; the KL term is not weighted.

    On policy (ratio 1, A = 1) the policy terms are -w_t = -2, -0.5; the k3 KL of the first token
    to a reference 0.5 nats below is e^-0.5 + 0.5 - 1 = 0.1065, of the second 0: bnpo averages
    (-2 + 0.1 * 0.1065 - 0.5) / 2 = -1.24467."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]])
    loss, _ = grpo_loss(
        logps, logps.detach(), torch.tensor([1.0]), torch.ones(1, 2), loss_type="bnpo", beta=0.1,
        ref_per_token_logps=ref, importance_sampling_ratio=torch.tensor([[2.0, 0.5]]),
    )  # fmt: skip
    assert loss.item() == pytest.approx((-2 + 0.1 * (math.exp(-0.5) + 0.5 - 1) - 0.5) / 2, abs=1e-6)
    loss.backward()
    # d/dlogp of -w * exp(logp - old) * A is -w; the KL adds 0.1 * (1 - e^(ref - logp)) on the first token
    expected = torch.tensor([[-2.0 + 0.1 * (1 - math.exp(-0.5)), -0.5]]) / 2
    assert torch.allclose(logps.grad, expected, atol=1e-6)


def test_vllm_importance_sampling_options_are_checked(tiny_model_dir):
    """An unknown vllm_importance_sampling_mode or a cap below 1 raises naming the option."""
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be one of"):
        GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], vllm_importance_sampling_mode="clip")
    with pytest.raises(ValueError, match="vllm_importance_sampling_cap must be >= 1"):
        GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], vllm_importance_sampling_cap=0.5)


def test_missing_reference_model_is_a_clear_error(tiny_model_dir):
    """beta > 0 with a Trainer that has no ReferenceModel fails naming the method and the callback."""
    module = GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], beta=0.1)
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="GRPO needs exactly one lit_posttrain.callbacks.ReferenceModel"):
        module._ref_per_token_logps(ids, mask, 1, 2)


# ---------------------------------------------------------------------------------------------
# The DataModule
# ---------------------------------------------------------------------------------------------
def _future_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_max_prompt_length_keeps_the_end_of_each_prompt(tiny_model_dir, tiny_tokenizer):
    """max_prompt_length keeps a prompt's last tokens (None: all of them), without any warning."""
    rows = [{"prompt": "Digits only: 41+29=", "answer": "70"}] * 2
    full = tiny_tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datamodule = GRPODataModule(tiny_model_dir, rows, max_prompt_length=4)
        datamodule.setup("fit")
        whole = GRPODataModule(tiny_model_dir, rows, max_prompt_length=None)
        whole.setup("fit")
    assert not _future_warnings(caught)
    assert datamodule.train_examples[0]["prompt_ids"] == full[-4:]
    assert whole.train_examples[0]["prompt_ids"] == full


def test_deprecated_max_length_warns_once_and_is_used(tiny_model_dir, tiny_tokenizer):
    """max_length (the old name of max_prompt_length) still works: one FutureWarning naming the new name
    and the removal version; giving both names is an error."""
    rows = [{"prompt": "Digits only: 41+29="}] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datamodule = GRPODataModule(tiny_model_dir, rows, max_length=4)
    messages = _future_warnings(caught)
    assert len(messages) == 1 and "max_prompt_length" in messages[0] and "0.3" in messages[0], messages
    datamodule.setup("fit")
    assert datamodule.max_prompt_length == 4 and len(datamodule.train_examples[0]["prompt_ids"]) == 4
    with pytest.raises(ValueError, match="max_prompt_length .* or its deprecated alias max_length"):
        GRPODataModule(tiny_model_dir, rows, max_prompt_length=8, max_length=4)


@pytest.mark.parametrize("option, warns", [("max_length", True), ("max_prompt_length", False)])
def test_quickstart_prompt_length_on_the_command_line(option, warns, monkeypatch):
    """`lit-posttrain fit --config configs/quickstart/grpo.yaml --data.init_args.max_length 64` works with one
    FutureWarning; the new name --data.init_args.max_prompt_length works without one."""
    from lit_posttrain.cli import cli_main

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["--config", "configs/quickstart/grpo.yaml", f"--data.init_args.{option}", "64"], run=False)
    messages = _future_warnings(caught)
    assert len(messages) == (1 if warns else 0), messages
    assert all("max_prompt_length" in message and "0.3" in message for message in messages)
    assert cli.datamodule.max_prompt_length == 64


def test_columns_maps_the_prompt_and_prompt_column_is_a_deprecated_alias(tiny_model_dir):
    """columns={"prompt": "question"} reads the data's question column as the prompt; the deprecated
    prompt_column does the same with one FutureWarning; giving both is an error."""
    rows = [{"question": "2+2=", "answer": "4"}, {"question": "3+3=", "answer": "6"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = GRPODataModule(tiny_model_dir, rows, columns={"prompt": "question"})
        mapped.setup("fit")
    assert not _future_warnings(caught)
    assert [e["prompt"] for e in mapped.train_examples] == ["2+2=", "3+3="]
    assert mapped.train_examples[0]["answer"] == "4" and "question" not in mapped.train_examples[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aliased = GRPODataModule(tiny_model_dir, rows, prompt_column="question")
    messages = _future_warnings(caught)
    assert len(messages) == 1 and "columns" in messages[0] and "0.3" in messages[0], messages
    aliased.setup("fit")
    assert aliased.train_examples == mapped.train_examples
    with pytest.raises(ValueError, match="not both"):
        GRPODataModule(tiny_model_dir, rows, columns={"prompt": "question"}, prompt_column="question")


def test_splits_and_dataset_config_reach_the_loader(tiny_model_dir, monkeypatch):
    """train_data is read from dataset_split, val_data from val_dataset_split (default: dataset_split), both
    with dataset_config and columns."""
    import lit_posttrain.stable.grpo as grpo

    calls, load_rows = [], grpo.load_rows

    def recording_load_rows(source, *, split, name, columns):
        calls.append((source, split, name, columns))
        return load_rows([{"prompt": f"{source} {split}"}])

    monkeypatch.setattr(grpo, "load_rows", recording_load_rows)
    columns = {"prompt": "prompt"}
    GRPODataModule(tiny_model_dir, "org/data", val_data="org/data", dataset_split="train_x",
                   val_dataset_split="test", dataset_config="main", columns=columns).setup("fit")  # fmt: skip
    assert calls == [("org/data", "train_x", "main", columns), ("org/data", "test", "main", columns)]
    calls.clear()
    GRPODataModule(tiny_model_dir, "org/data", val_data="org/data", dataset_split="train_x").setup("fit")
    assert [split for _, split, _, _ in calls] == ["train_x", "train_x"]


# ---------------------------------------------------------------------------------------------
# What a TRL user expects on day one (issue 16)
# ---------------------------------------------------------------------------------------------
def _quickstart_args(tmp_path, *extra: str) -> list[str]:
    """The GRPO quickstart shortened to 2 small generation batches, logging under tmp_path."""
    return [
        "fit", "--config", "configs/quickstart/grpo.yaml",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks", "[]", "--data.init_args.batch_size", "2", "--model.init_args.num_generations", "2",
        *extra,
    ]  # fmt: skip


def test_trl_documented_reward_functions_train_through_the_cli(tmp_path, monkeypatch):
    """TRL's documented `reward_len(completions, **kwargs)` and `reward_func(completions, ground_truth, **kwargs)`
    (the data's answer column mapped to ground_truth) train unchanged from the command line."""
    from lit_posttrain.cli import cli_main

    monkeypatch.chdir(ROOT)
    cli = cli_main(
        _quickstart_args(
            tmp_path,
            "--model.init_args.reward_funcs+=tests.helpers.trl_rewards.reward_len",
            "--model.init_args.reward_funcs+=tests.helpers.trl_rewards.reward_func",
            "--data.init_args.columns", "{ground_truth: answer}",
        ),  # fmt: skip
        run=True,
    )
    assert cli.trainer.global_step == 2
    assert cli.model.reward_func_names == ["PatternFractionReward", "reward_len", "reward_func"]
    metrics = cli.trainer.callback_metrics
    assert metrics["train/rewards/reward_len/mean"] <= 0  # -|20 - len|
    assert metrics["train/rewards/reward_func/mean"] == 0  # a random model writes no \boxed{...}


def test_reward_functions_get_the_trainer_state_and_columns(tiny_model_dir):
    """Through the Python API, TRL's documented reward functions train unchanged, and a reward function
    is given trainer_state (global_step = optimizer steps before the generation batch, max_steps)."""
    from tests.helpers.trl_rewards import reward_func, reward_len

    seen = []

    def progress_reward(completions, trainer_state, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch))
        return [0.0 for _ in completions]

    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)]
    module = GRPOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[reward_len, reward_func, progress_reward],
        num_generations=2,
        max_completion_length=4,
    )
    datamodule = GRPODataModule(tiny_model_dir, rows, batch_size=2, columns={"ground_truth": "answer"})
    trainer = _fit(module, datamodule, max_steps=2)
    assert seen == [(0, 2, 0), (1, 2, 0)]
    assert trainer.callback_metrics["train/rewards/reward_len/mean"] <= -16  # completions of <= 4 characters


def test_unfillable_reward_parameter_fails_before_training(tiny_model_dir):
    """A reward function whose required parameter no keyword fills fails naming the function and the
    parameter: a positional-only one at construction, a missing column in setup, before any step."""

    def positional(prompts, completions, /, **kwargs):
        return [0.0 for _ in completions]

    with pytest.raises(TypeError, match="'positional'.*'prompts'"):
        GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[positional])

    def needs_solution(completions, solution, **kwargs):
        return [0.0 for _ in completions]

    module = GRPOModule(tiny_model_dir, random_init=True, reward_funcs=[needs_solution], num_generations=2)
    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)]
    record = _Record()
    with pytest.raises(TypeError, match="'needs_solution' needs parameter 'solution'.*answer"):
        _fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=2), max_steps=1, callbacks=[record])
    assert module.global_step == 0 and record.history == []


def character_codes(completions, **kwargs):
    """A reward that differs between different completions, so advantages (and gradients) are not 0."""
    return [float(sum(map(ord, completion))) for completion in completions]


class _GradNormAfterClipping(L.Callback):
    """The gradient norm Lightning's on_before_optimizer_step sees (inside optimizer.step(), after clipping)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


def test_grad_norm_is_logged_before_clipping(tiny_model_dir):
    """train/grad_norm is the norm before clipping: clipping to 1e-3 scales it by 1e-3 / (norm + 1e-6)."""
    L.seed_everything(0)
    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)]
    module = GRPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[character_codes], num_generations=4, max_completion_length=6,
        max_grad_norm=1e-3,
    )  # fmt: skip
    record, after = _Record(), _GradNormAfterClipping()
    _fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=2), max_steps=2, callbacks=[record, after])
    for step, clipped in zip(record.history, after.norms, strict=True):
        norm = step["train/grad_norm"]
        assert math.isfinite(norm) and norm > 1e-3
        assert clipped == pytest.approx(norm * 1e-3 / (norm + 1e-6), rel=1e-4)


def test_learning_rate_and_warmup_decay_count_optimizer_steps(tiny_model_dir):
    """One epoch of 2 generation batches x num_iterations 2 = 4 optimizer steps: WarmupDecayLR (linear, from
    0.1) gets 4, and train/learning_rate logs each batch's last step's rate: 0.1 x (1 - 1/4), 0.1 x (1 - 3/4)."""
    from lit_posttrain.schedulers import WarmupDecayLR

    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)]
    module = GRPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[character_codes], num_generations=2, max_completion_length=4,
        num_iterations=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda optimizer: WarmupDecayLR(optimizer, decay="linear"),
    )  # fmt: skip
    record = _Record()
    trainer = _fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=2), max_steps=-1, callbacks=[record],
                   max_epochs=1)  # fmt: skip
    assert trainer.global_step == 4 and trainer.lr_scheduler_configs[0].scheduler.num_training_steps == 4
    assert [step["train/learning_rate"] for step in record.history] == pytest.approx([0.075, 0.025])
    assert all(math.isfinite(step["train/grad_norm"]) for step in record.history)


@pytest.mark.parametrize(
    "option, value, ours",
    [("accumulate_grad_batches", "2", "model.init_args.micro_batch_size"),
     ("gradient_clip_val", "1.0", "model.init_args.max_grad_norm")],
)  # fmt: skip
def test_lightning_options_that_do_not_apply_name_ours(option, value, ours, tmp_path, monkeypatch):
    """--trainer.accumulate_grad_batches / --trainer.gradient_clip_val raise a ValueError naming the option
    and the model option to use instead, not Lightning's generic manual-optimization error."""
    from lit_posttrain.cli import cli_main

    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=rf"trainer\.{option} \({value}\).*{ours}"):
        cli_main(_quickstart_args(tmp_path, f"--trainer.{option}", value), run=True)


def test_log_completions_jsonl_with_the_csv_logger(tiny_model_dir, tmp_path):
    """log_completions writes <log_dir>/completions.jsonl every log_every_n_steps generation batches: rows
    of step, prompt, completion, each reward function's value and the advantage, consistent with the rewards."""
    from lightning.pytorch.loggers import CSVLogger

    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(8)]
    module = GRPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits(), reward_len_kwargs], num_generations=2,
        max_completion_length=4, log_completions=True, num_completions_to_print=3,
    )  # fmt: skip
    logger = CSVLogger(tmp_path)
    trainer = _fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=2), max_steps=4, logger=logger,
                   log_every_n_steps=2)  # fmt: skip
    lines = (Path(trainer.log_dir) / "completions.jsonl").read_text().splitlines()
    table = [json.loads(line) for line in lines]
    assert [row["step"] for row in table] == [2, 2, 2, 4, 4, 4]  # generation batches 2 and 4, 3 rows each
    for row in table:
        assert list(row) == ["step", "prompt", "completion", "PatternFractionReward", "reward_len_kwargs", "advantage"]
        digits = sum(c.isdigit() for c in row["completion"]) / max(len(row["completion"]), 1)
        assert row["PatternFractionReward"] == pytest.approx(digits) or not row["completion"]
        assert row["reward_len_kwargs"] == -abs(20 - len(row["completion"]))
        assert math.isfinite(row["advantage"]) and row["prompt"].endswith("+2=")


def reward_len_kwargs(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def test_log_completions_wandb_table_offline(tiny_model_dir, tmp_path, monkeypatch):
    """With WandbLogger(offline=True) the completions table is logged: the offline run holds its table file."""
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)]
    module = GRPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits()], num_generations=2, max_completion_length=4,
        log_completions=True,
    )  # fmt: skip
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lit-posttrain-tests")
    try:
        _fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=2), max_steps=1, logger=logger, log_every_n_steps=1)
        run_dir = Path(logger.experiment.dir).parent  # .../wandb/offline-run-*/files -> the run
    finally:
        logger.experiment.finish()
    tables = list(run_dir.glob("files/media/table/completions_*.table.json"))
    assert len(tables) == 1, sorted(p.name for p in run_dir.rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "PatternFractionReward", "advantage"]
    assert len(table["data"]) == 4 and all(row[0] == 1 for row in table["data"])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_entropy_only_on_logged_generation_batches(method, tiny_model_dir, tmp_path, with_stats_calls):
    """GRPO departure 8 / RLOO departure 6: with 2 optimizer steps of 2 micro-batches per generation batch, the
    entropy is computed on the batches Lightning logs (every 2nd here) and on the one that holds the run's last
    step, in all 4 of their forwards, and in none of the others'; the rows written hold the same values as a
    run that computes it every batch (the same completions: the sampling does not depend on it)."""
    from helpers.metrics import assert_rows_match, sparse_and_dense_runs

    from lit_posttrain import RLOODataModule, RLOOModule
    from lit_posttrain.stable import grpo, rloo

    module_class, datamodule_class, method_file = {
        "grpo": (GRPOModule, GRPODataModule, grpo), "rloo": (RLOOModule, RLOODataModule, rloo),
    }[method]  # fmt: skip
    computed = with_stats_calls(method_file)  # with_stats of each training forward of the policy
    rows = [{"prompt": f"Digits only: {i}+1="} for i in range(10)]

    def make():
        module = module_class(
            tiny_model_dir, random_init=True, reward_funcs=[_digits()], num_generations=4, max_completion_length=6,
            steps_per_generation=2, micro_batch_size=2, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        )  # fmt: skip
        return module, datamodule_class(tiny_model_dir, rows, batch_size=2)

    # 5 generation batches of 2 optimizer steps: batches 2 and 4 are logged, batch 5 holds step 10, the last
    (sparse, sparse_rows), (dense, dense_rows) = sparse_and_dense_runs(computed, make, tmp_path, 2, max_steps=10)
    assert sparse == [batch in (2, 4, 5) for batch in range(1, 6) for _ in range(4)]
    assert dense == [True] * 20
    assert sorted(sparse_rows) == [1, 3]  # CSVLogger's step: generation batches done before the logged one
    assert_rows_match(sparse_rows, dense_rows, ("train/loss", "train/reward", "train/entropy"))
