"""RLOO: leave-one-out advantages, the sequence-level clipped loss, KL in the reward, a learning signal."""

import json
import math
import warnings
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# What a TRL user expects on day one (issue 16)
# ---------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def _quickstart_args(tmp_path, *extra: str) -> list[str]:
    """The RLOO quickstart shortened to 2 small generation batches, logging under tmp_path."""
    return [
        "fit", "--config", "configs/quickstart/rloo.yaml",
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
    assert metrics["train/rewards/reward_func/mean"] == 0  # a random model writes no \\boxed{...}


def character_codes(completions, **kwargs):
    """A reward that differs between different completions, so advantages (and gradients) are not 0."""
    return [float(sum(map(ord, completion))) for completion in completions]


def test_reward_functions_get_the_trainer_state_and_columns(tiny_model_dir):
    """Through the Python API, TRL's documented reward functions train unchanged, and a reward function
    is given trainer_state (global_step = optimizer steps before the generation batch, max_steps)."""
    from tests.helpers.trl_rewards import reward_func, reward_len

    seen = []

    def progress_reward(completions, trainer_state, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch))
        return [0.0 for _ in completions]

    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)]
    module = RLOOModule(
        tiny_model_dir, random_init=True, reward_funcs=[reward_len, reward_func, progress_reward], beta=0.0,
        max_completion_length=4,
    )  # fmt: skip
    datamodule = RLOODataModule(tiny_model_dir, rows, batch_size=2, columns={"ground_truth": "answer"})
    trainer = _fit(module, datamodule, max_steps=2)
    assert seen == [(0, 2, 0), (1, 2, 0)]
    assert trainer.callback_metrics["train/rewards/reward_len/mean"] <= -16  # completions of <= 4 characters


def test_unfillable_reward_parameter_fails_before_training(tiny_model_dir):
    """A reward function whose required parameter no keyword fills fails naming the function and the
    parameter: a positional-only one at construction, a missing column in setup, before any step."""

    def positional(prompts, completions, /, **kwargs):
        return [0.0 for _ in completions]

    with pytest.raises(TypeError, match="'positional'.*'prompts'"):
        RLOOModule(tiny_model_dir, random_init=True, reward_funcs=[positional])

    def needs_solution(completions, solution, **kwargs):
        return [0.0 for _ in completions]

    module = RLOOModule(tiny_model_dir, random_init=True, reward_funcs=[needs_solution], beta=0.0)
    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)]
    record = _Record()
    with pytest.raises(TypeError, match="'needs_solution' needs parameter 'solution'.*answer"):
        _fit(module, RLOODataModule(tiny_model_dir, rows, batch_size=2), max_steps=1, callbacks=[record])
    assert module.global_step == 0 and record.history == []


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
    module = RLOOModule(
        tiny_model_dir, random_init=True, reward_funcs=[character_codes], num_generations=4, max_completion_length=6,
        beta=0.0, max_grad_norm=1e-3,
    )  # fmt: skip
    record, after = _Record(), _GradNormAfterClipping()
    _fit(module, RLOODataModule(tiny_model_dir, rows, batch_size=2), max_steps=2, callbacks=[record, after])
    for step, clipped in zip(record.history, after.norms, strict=True):
        norm = step["train/grad_norm"]
        assert math.isfinite(norm) and norm > 1e-3
        assert clipped == pytest.approx(norm * 1e-3 / (norm + 1e-6), rel=1e-4)


def test_learning_rate_and_warmup_decay_count_optimizer_steps(tiny_model_dir):
    """One epoch of 2 generation batches x num_iterations 2 = 4 optimizer steps: WarmupDecayLR (linear, from
    0.1) gets 4, and train/learning_rate logs each batch's last step's rate: 0.1 x (1 - 1/4), 0.1 x (1 - 3/4)."""
    from lit_posttrain.schedulers import WarmupDecayLR

    rows = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)]
    module = RLOOModule(
        tiny_model_dir, random_init=True, reward_funcs=[character_codes], max_completion_length=4, beta=0.0,
        num_iterations=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda optimizer: WarmupDecayLR(optimizer, decay="linear"),
    )  # fmt: skip
    record = _Record()
    trainer = _fit(module, RLOODataModule(tiny_model_dir, rows, batch_size=2), max_steps=-1, callbacks=[record],
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
    module = RLOOModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits(), character_codes], max_completion_length=4,
        beta=0.0, log_completions=True, num_completions_to_print=3,
    )  # fmt: skip
    trainer = _fit(module, RLOODataModule(tiny_model_dir, rows, batch_size=2), max_steps=4,
                   logger=CSVLogger(tmp_path), log_every_n_steps=2)  # fmt: skip
    table = [json.loads(line) for line in (Path(trainer.log_dir) / "completions.jsonl").read_text().splitlines()]
    assert [row["step"] for row in table] == [2, 2, 2, 4, 4, 4]  # generation batches 2 and 4, 3 rows each
    for row in table:
        assert list(row) == ["step", "prompt", "completion", "PatternFractionReward", "character_codes", "advantage"]
        assert row["character_codes"] == sum(map(ord, row["completion"]))
        assert math.isfinite(row["advantage"]) and row["prompt"].endswith("+2=")
    # G = 2, beta 0: leave-one-out advantages are +-(r_1 - r_2) of the weighted reward sum
    first, second = table[0], table[1]
    difference = first["character_codes"] - second["character_codes"] + (
        (first["PatternFractionReward"] or 0) - (second["PatternFractionReward"] or 0)
    )
    assert first["advantage"] == pytest.approx(difference, rel=1e-5) and second["advantage"] == pytest.approx(
        -difference, rel=1e-5
    )
