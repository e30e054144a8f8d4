"""Nash-MD: the loss by hand (the 0.5 control variate), sampling from the geometric mixture checked against a
naive loop, vLLM refused with a clear error, and a learning signal on held-out prompts."""

import doctest
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain.callbacks import VLLMRollout
from lit_posttrain.experimental import nash_md
from lit_posttrain.experimental.nash_md import (
    NashMDDataModule,
    NashMDModule,
    geometric_mixture_generate,
    nash_md_loss,
)
from lit_posttrain.models import load_model
from lit_posttrain.rewards import PatternFractionReward
from lit_posttrain.rollout import HFRollout

ROOT = Path(__file__).resolve().parents[2]
PEAKED = {"initializer_range": 0.3}  # peaked logits: greedy decoding has no near-ties


def _digits():
    return PatternFractionReward(pattern="[0-9]")


def test_nash_md_loss_control_variate():
    """probability 0.5 gives a zero score term: the loss is beta x sum_t sg(log-ratio) log pi only.
    Completion 1: log pi = [-1, -2], log pi_ref = [-1.5, -1], ratios [0.5, -1]: 0.5 x -1 + -1 x -2 = 1.5.
    Completion 2 (its last token masked): log pi = [-0.5], ref [-0.5]: 0. loss = 0.1 x (1.5 + 0) / 2 = 0.075."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = nash_md_loss(logps, ref, mask, torch.tensor([0.5, 0.5]), beta=0.1)
    assert loss.item() == pytest.approx(0.075)
    assert metrics["loss/score"].item() == 0.0
    assert metrics["loss/kl"].item() == pytest.approx((-0.5 + 0.0) / 2)  # summed log-ratios (0.5 - 1), 0
    # gradient: beta x sg(log-ratio_t) / B on each unmasked token (the score term adds nothing at 0.5)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[0.1 * 0.5 / 2, 0.1 * -1.0 / 2], [0.0, 0.0]]))


def test_nash_md_loss_score_term():
    """A preferred sample (probability 0.9) with beta 0: loss = -(0.9 - 0.5) x sum log pi = -0.4 x -3 = 1.2,
    and the gradient -0.4 / B raises log pi on every token; a dispreferred one (0.1) lowers it."""
    logps = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], requires_grad=True)
    loss, metrics = nash_md_loss(logps, logps.detach(), torch.ones(2, 2), torch.tensor([0.9, 0.1]), beta=0.0)
    per_sample, _ = nash_md_loss(
        logps[:1], logps[:1].detach(), torch.ones(1, 2), torch.tensor([0.9]), beta=0.0
    )
    assert per_sample.item() == pytest.approx(1.2)
    assert loss.item() == pytest.approx((1.2 - 1.2) / 2, abs=1e-6)  # +1.2 and -1.2
    assert metrics["loss/score"].item() == pytest.approx((-1.2 + 1.2) / 2, abs=1e-6)
    logps.grad = None
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-0.2, -0.2], [0.2, 0.2]]))


def _reference_logits(model):
    def forward(input_ids, attention_mask, position_ids, logits_to_keep):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=logits_to_keep, use_cache=False)  # fmt: skip
        return out.logits

    return forward


@torch.no_grad()
def _naive_greedy_mixture(policy, reference, prompt_ids, coef, steps, eos):
    """Greedy decoding of argmax(coef * ref_logits + (1 - coef) * policy_logits), one prompt at a time,
    recomputing both models over the whole sequence at every step."""
    completions = []
    for ids in prompt_ids:
        sequence = torch.tensor([ids])
        completion = []
        for _ in range(steps):
            logits = coef * reference(sequence).logits[0, -1] + (1 - coef) * policy(sequence).logits[0, -1]
            token = int(logits.argmax())
            completion.append(token)
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            if token in eos:
                break
        completions.append(completion)
    return completions


def test_geometric_mixture_sampling_matches_a_naive_loop(tiny_model_dir, tiny_tokenizer):
    """Greedy from the mixture (left-padded batch, HF generate + the logits processor) equals a naive
    per-prompt loop over the mixed logits for mixture_coef 0.5; coef 0 is the policy's own greedy output and
    coef 1 the reference's (two different random models, so the three differ)."""
    policy = load_model(tiny_model_dir, random_init=True, init_seed=0, model_config=PEAKED).eval()
    reference = load_model(tiny_model_dir, random_init=True, init_seed=1, model_config=PEAKED).eval()
    prompts = ["Digits only: 41+29=", "Hi", "Digits only: 3+69="]  # different lengths: left padding
    prompt_ids = [tiny_tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    eos = [tiny_tokenizer.eos_token_id]
    outputs = {}
    for coef in (0.0, 0.5, 1.0):
        out = geometric_mixture_generate(
            policy, _reference_logits(reference), tiny_tokenizer, prompt_ids, mixture_coef=coef,
            max_completion_length=10, do_sample=False,
        )  # fmt: skip
        assert out.completion_ids == _naive_greedy_mixture(policy, reference, prompt_ids, coef, 10, eos), coef
        outputs[coef] = out.completion_ids
    hf = HFRollout(tiny_tokenizer)
    assert (
        outputs[0.0]
        == hf.generate(policy, prompt_ids, max_completion_length=10, do_sample=False).completion_ids
    )
    assert (
        outputs[1.0]
        == hf.generate(reference, prompt_ids, max_completion_length=10, do_sample=False).completion_ids
    )
    assert len({str(ids) for ids in outputs.values()}) == 3  # the mixture is neither model


def test_bad_options_name_the_key(tiny_model_dir):
    """Bad values fail in __init__, naming the option."""
    for kwargs, match in [
        ({"mixture_coef": 1.5}, "mixture_coef must be in \\[0, 1\\]"),
        ({"mixture_coef": []}, "mixture_coef: give a number or a non-empty list"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            NashMDModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], **kwargs)


def test_docstring_examples(monkeypatch):
    """The module's docstring examples print what they show (experimental modules are not in test_doctests)."""
    monkeypatch.chdir(ROOT)
    result = doctest.testmod(nash_md, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
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


def _trainer(max_steps, callbacks=(), **trainer_kwargs):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )


def test_vllm_rollout_is_refused_before_the_engine_starts(tiny_model_dir):
    """Nash-MD + VLLMRollout fails before any setup (no engine is built), saying why and what to change."""
    module = NashMDModule(tiny_model_dir, random_init=True, reward_funcs=[_digits()], max_new_tokens=2)
    rows = [{"prompt": "Digits only: 1+1="}] * 4
    callback = VLLMRollout(kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)
    with pytest.raises(
        ValueError, match="Nash-MD does not support lit_posttrain.callbacks.VLLMRollout"
    ) as error:
        _trainer(1, [callback]).fit(module, NashMDDataModule(tiny_model_dir, rows, batch_size=2))
    assert "geometric mixture" in str(error.value) and "Remove VLLMRollout" in str(error.value)
    assert callback.rollout is None and isinstance(module.rollout, HFRollout)


def test_learning_signal_digits(tiny_model_dir):
    """On a random-init tiny model Nash-MD (beta 0.1, mixture_coef 0.5) raises the digit reward of the
    policy's samples. The reward is 10 x the digit fraction: the preference is sigmoid(score difference), and
    with weight 1 the same run does not learn in 12 steps (measured: +0.00, +0.00 of 1). Greedy val/reward on
    held-out prompts rises from the sanity check (0), and the train reward's last-3 mean beats its first-3
    mean by > 0.4 (measured with generate's multinomial sampler, seeds 0-2: +1.33, +0.52, +1.92 on the 0-10
    scale; greedy val/reward 0 -> 10 for seeds 0 and 1, 0 -> 0 for seed 2). With the inverse-CDF sampler
    (`lit_posttrain.rollout.hf`, the same distribution, other draws) seeds 1, 2 and 3 pass both bars and seed 0
    does not (greedy val/reward 0 -> 0): this test keeps seed 1."""
    L.seed_everything(1)
    module = NashMDModule(
        tiny_model_dir, random_init=True, reward_funcs=[_digits()], reward_weights=[10.0], max_new_tokens=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )  # fmt: skip
    rows = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(64)]
    val = [{"prompt": f"Digits only: {i}+{i % 5}="} for i in range(100, 116)]  # prompts never trained on
    record = _Record()
    _trainer(12, [record], num_sanity_val_steps=-1, val_check_interval=12, check_val_every_n_epoch=None).fit(
        module, NashMDDataModule(tiny_model_dir, rows, val_data=val, batch_size=8)
    )
    before, after = record.val_rewards[0], record.val_rewards[-1]
    assert after > before + 5.0, record.val_rewards  # measured (seed 0): 0.0 -> 10.0
    rewards = [step["train/reward"] for step in record.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.4, rewards
    assert all(math.isfinite(step["train/loss"]) for step in record.history)
    assert record.history[-1]["train/mixture_coef"] == 0.5
