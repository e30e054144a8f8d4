"""TrainingDiagnostics and `lit_posttrain.diagnostics`: every heuristic fires on the stream it is
about, with its evidence and action; the live callback and ``lit-posttrain diagnose`` agree; the
shipped quickstarts raise no error and no false warning; diagnostics.jsonl follows its schema and
is written once under DDP.

Most checks feed synthetic metric streams to the pure `Diagnoser` (fast); the recorded quickstart
streams in tests/data/diagnostics/ were made with TrainingDiagnostics on (see its README); a few
real short runs show the live path.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_posttrain.callbacks import TrainingDiagnostics
from lit_posttrain.diagnostics import CODES, MEASURED, Diagnoser, Thresholds, diagnose_file, main, run_context

DATA = Path(__file__).resolve().parents[1] / "data" / "diagnostics"
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- helpers
def feed(rows: list[dict], context: dict | None = None, **kwargs) -> Diagnoser:
    """A Diagnoser fed ``rows`` (row i at step i, unless the row has a "step")."""
    diagnoser = Diagnoser(context, **kwargs)
    for i, row in enumerate(rows):
        row = dict(row)
        diagnoser.update(row.pop("step", i), row)
    return diagnoser


def first(diagnoser: Diagnoser, code: str):
    """The first ``new`` event of ``code`` (fails if there is none)."""
    events = [e for e in diagnoser.events if e.code == code and e.status == "new"]
    assert events, f"{code} not raised; events: {[e.line() for e in diagnoser.events]}"
    return events[0]


def codes(diagnoser: Diagnoser) -> set[str]:
    return {e.code for e in diagnoser.events}


_FIELDS = {
    "schema": str,
    "version": int,
    "code": str,
    "name": str,
    "severity": str,
    "status": str,
    "step": int,
    "since": int,
    "count": int,
    "summary": str,
    "action": str,
    "evidence": dict,
    "line": str,
}


def validate(record: dict) -> None:
    """diagnostics.jsonl schema version 1 (docs/diagnostics.md)."""
    assert set(record) == set(_FIELDS), sorted(set(record) ^ set(_FIELDS))
    for key, kind in _FIELDS.items():
        assert isinstance(record[key], kind) and not isinstance(record[key], bool), (key, record[key])
    assert record["schema"] == "lit-posttrain.diagnostics" and record["version"] == 1
    assert re.fullmatch(r"LPT\d{3}", record["code"]) and CODES[record["code"]][0] == record["name"]
    assert record["severity"] in ("info", "warning", "error")
    assert record["status"] in ("new", "persisting", "resolved")
    assert 0 <= record["since"] <= record["step"] and record["count"] >= 1
    evidence = record["evidence"]
    assert {"metrics", "thresholds"} <= set(evidence) <= {"metrics", "thresholds", "window"}
    for value in [*evidence["metrics"].values(), *evidence["thresholds"].values()]:
        assert isinstance(value, (int, float, bool)) or value in ("nan", "inf", "-inf"), value
    if "window" in evidence:
        assert set(evidence["window"]) <= {"values", "first_step", "last_step", "early_values"}
        assert evidence["window"]["first_step"] <= evidence["window"]["last_step"]
    assert record["line"].startswith(
        f"[lit-posttrain] {record['severity'].upper()} {record['code']} {record['name']}"
    )


def read_jsonl(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        validate(record)
    return records


# ---------------------------------------------------------------------- every method
def test_non_finite_loss_is_an_error():
    """LPT001: a NaN train/loss is an error whose action lowers the learning rate 10x."""
    rows = [{"train/loss": 1.0, "diagnostics/lr": 1e-3}] * 3 + [
        {"train/loss": math.nan, "diagnostics/lr": 1e-3}
    ]
    diagnoser = feed(rows)
    event = first(diagnoser, "LPT001")
    assert (event.severity, event.step, diagnoser.has_error) == ("error", 3, True)
    assert math.isnan(event.evidence["metrics"]["train/loss"])
    assert "from 0.001 to 0.0001" in event.action and "gradient_clip_val: 1.0" in event.action
    assert event.to_json()["evidence"]["metrics"]["train/loss"] == "nan"


def test_non_finite_grad_error_and_fp16_warning():
    """LPT002: a non-finite gradient norm is an error; under fp16 loss scaling only when it persists."""
    rows = [{"diagnostics/grad_norm": 1.0}] * 3 + [{"diagnostics/grad_norm": math.inf}]
    assert first(feed(rows), "LPT002").severity == "error"
    fp16 = run_context({}, "16-mixed")
    assert "LPT002" not in codes(feed(rows, fp16))  # one overflow: the scaler skips the step
    event = first(feed(rows + [{"diagnostics/grad_norm": math.inf}] * 2, fp16), "LPT002")
    assert event.severity == "warning" and "bf16-mixed" in event.action


def test_grad_norm_spike_and_lifecycle():
    """LPT003: a gradient norm 50x its median is a spike; the finding persists while the spike is in
    the window, reminds every remind_every steps with a count, then resolves."""
    rows = [{"diagnostics/grad_norm": 1.0, "diagnostics/lr": 2e-5}] * 10 + [{"diagnostics/grad_norm": 50.0}]
    rows += [{"diagnostics/grad_norm": 1.0}] * 25
    diagnoser = feed(rows, remind_every=10)
    event = first(diagnoser, "LPT003")
    assert event.step == 10 and event.evidence["metrics"]["diagnostics/grad_norm"] == 50.0
    assert event.evidence["metrics"]["diagnostics/grad_norm (median before)"] == 1.0
    assert "50.0x its median" in event.summary and "from 2e-05 to 1e-05" in event.action
    lifecycle = [(e.status, e.step, e.count) for e in diagnoser.events if e.code == "LPT003"]
    # active while step 10 is among the last 20 logged steps (steps 10-29), resolved at step 30
    assert lifecycle == [("new", 10, 1), ("persisting", 20, 11), ("resolved", 30, 20)]
    assert diagnoser.counts() == {"diagnostics/LPT003": 0}


def test_lr_zero():
    """LPT004: lr 0 for 5 logged steps in a row."""
    diagnoser = feed([{"diagnostics/lr": 1e-4}] * 3 + [{"diagnostics/lr": 0.0}] * 5)
    event = first(diagnoser, "LPT004")
    assert event.step == 7 and "lr_scheduler" in event.action and "trainer.max_steps" in event.action


def test_memory_headroom():
    """LPT005: peak memory above 95% of the total; RL methods are told to lower micro_batch_size."""
    event = first(feed([{"diagnostics/memory/peak_fraction": 0.97}]), "LPT005")
    assert event.evidence["metrics"] == {"diagnostics/memory/peak_fraction": 0.97}
    assert "data.init_args.batch_size" in event.action and "gradient_checkpointing: true" in event.action
    rl = feed([{"train/reward_std": 0.3, "diagnostics/memory/peak_fraction": 0.97}])
    assert "model.init_args.micro_batch_size" in first(rl, "LPT005").action


def test_data_wait():
    """LPT006 (info): the loop waits for batches half of the time -> more DataLoader workers."""
    event = first(feed([{"diagnostics/data_wait_fraction": 0.5}] * 3, {"num_workers": 0}), "LPT006")
    assert event.severity == "info" and "num_workers from 0 to 2" in event.action


# ---------------------------------------------------------------------- online RL
def _rl_row(**values) -> dict:
    row = {"train/reward": 0.5, "train/reward_std": 0.3, "train/frac_reward_zero_std": 0.0}
    return {**row, **{f"train/{k.replace('__', '/')}": v for k, v in values.items()}}


def test_zero_std_groups_exact_split_reads_like_the_issue():
    """LPT101 with the per-group split logged: '9 of 10 such groups are all-correct', num_generations 4 -> 8."""
    split = {
        "frac_reward_zero_std": 0.82,
        "frac_reward_zero_std__all_max": 0.74,
        "frac_reward_zero_std__all_min": 0.08,
    }
    rows = [{"step": step, **_rl_row(**split)} for step in range(21, 41)]
    diagnoser = feed(rows, {"num_generations": 4}, min_values=20)  # the first full window ends at step 40
    event = first(diagnoser, "LPT101")
    assert event.evidence["metrics"]["train/frac_reward_zero_std"] == pytest.approx(0.82)
    assert event.evidence["metrics"]["train/frac_reward_zero_std/all_max"] == pytest.approx(0.74)
    assert event.evidence["window"] == {"values": 20, "first_step": 21, "last_step": 40}
    assert event.line() == (
        "[lit-posttrain] WARNING LPT101 zero-std-groups at step 40: 82% of groups have identical rewards "
        "(train/frac_reward_zero_std over the last 20 steps, threshold 50%); 9 of 10 such groups are "
        "all-correct: the prompts are too easy. Action: harder prompts (drop the ones the model already "
        "solves), or raise model.init_args.num_generations from 4 to 8."
    )
    constant = {**split, "frac_reward_zero_std__all_max": 0.82, "frac_reward_zero_std__all_min": 0.82}
    assert first(feed([_rl_row(**constant)] * 3), "LPT101").action.startswith("check the reward function")


def test_zero_std_groups_inferred_from_reward():
    """LPT101 without the split: near-1 rewards -> too easy; near-0 -> too hard; constant -> reward bug."""
    easy = first(feed([_rl_row(reward=0.95, frac_reward_zero_std=0.7)] * 5, {"num_generations": 8}), "LPT101")
    assert "likely all-correct" in easy.summary and "num_generations from 8 to 16" in easy.action
    hard = first(feed([_rl_row(reward=0.02, frac_reward_zero_std=0.9)] * 5), "LPT101")
    assert "likely all-wrong" in hard.summary and hard.action.startswith("easier prompts")
    constant = first(feed([_rl_row(reward=1.0, reward_std=0.0, frac_reward_zero_std=1.0)] * 3), "LPT101")
    assert constant.step == 2 and "train/reward has been 1 at every logged step" in constant.summary
    assert constant.action.startswith("check the reward function")


def test_reward_std_tiny():
    """LPT102: groups differ by 5e-4 only; with scale_rewards=group that noise is amplified."""
    rows = [_rl_row(reward_std=5e-4, frac_reward_zero_std=0.1)] * 3
    event = first(feed(rows, {"scale_rewards": "group"}), "LPT102")
    assert event.evidence["metrics"]["train/reward_std"] == pytest.approx(5e-4)
    assert "scale_rewards: batch" in event.action
    assert "full-size advantages" in event.summary
    assert "reward_weights" in first(feed(rows), "LPT102").action  # RLOO: no scale_rewards


def test_entropy_collapse_only_for_rl():
    """LPT103: entropy at 5% of its early value; SFT's falling entropy is not a finding."""
    rows = [_rl_row(entropy=2.0)] * 10 + [_rl_row(entropy=0.1)] * 10
    event = first(feed(rows, {"epsilon_high": None, "temperature": 1.0}), "LPT103")
    assert event.evidence["metrics"] == {"train/entropy": 0.1, "train/entropy (early)": 2.0}
    assert "epsilon_high: 0.28" in event.action and "temperature from 1 to 1.2" in event.action
    sft = [
        {"train/loss": 1.0, "train/mean_token_accuracy": 0.5, "train/entropy": e}
        for e in [2.0] * 10 + [0.1] * 10
    ]
    assert "LPT103" not in codes(feed(sft))


def test_kl_spike():
    """LPT104: train/kl 25x its median -> lower the lr and raise beta."""
    rows = [{**_rl_row(kl=0.02), "diagnostics/lr": 1e-3}] * 10 + [_rl_row(kl=0.5)]
    event = first(feed(rows, {"beta": 0.05}), "LPT104")
    assert event.step == 10 and event.evidence["metrics"]["train/kl"] == 0.5
    assert "from 0.001 to 0.0005" in event.action and "beta from 0.05 to 0.1" in event.action


def test_clip_ratio_high():
    """LPT105: 30% of tokens clipped -> lower the lr, fewer num_iterations."""
    rows = [{**_rl_row(clip_ratio__region_mean=0.3), "diagnostics/lr": 1e-6}] * 3
    event = first(feed(rows, {"num_iterations": 4}), "LPT105")
    assert event.evidence["metrics"] == {"train/clip_ratio/region_mean": 0.3}
    assert "from 1e-06 to 5e-07" in event.action and "num_iterations from 4 to 2" in event.action


def test_sampler_mismatch():
    """LPT106: sampler and trainer log-probs differ by 0.2 nats per token -> check dtypes."""
    rows = [_rl_row(sampling__logp_diff__mean=0.2, sampling__importance_ratio__max=3.0)] * 3
    event = first(feed(rows, {"dtype": "bfloat16", "vllm_importance_sampling_correction": False}), "LPT106")
    assert event.evidence["metrics"]["train/sampling/logp_diff/mean"] == 0.2
    assert event.evidence["metrics"]["train/sampling/importance_ratio/max"] == 3.0
    assert "check dtypes" in event.action and "model.init_args.dtype: bfloat16" in event.action
    assert "vllm_importance_sampling_correction: true" in event.action


def test_truncation_heavy():
    """LPT107: half the completions truncated -> raise max_completion_length 256 -> 512 or mask them."""
    rows = [_rl_row(completions__clipped_ratio=0.5, completions__mean_length=250.0)] * 3
    event = first(feed(rows, {"max_completion_length": 256, "mask_truncated_completions": False}), "LPT107")
    assert event.evidence["metrics"] == {
        "train/completions/clipped_ratio": 0.5,
        "train/completions/mean_length": 250.0,
    }
    assert event.action == (
        "raise model.init_args.max_completion_length from 256 to 512, or set "
        "model.init_args.mask_truncated_completions: true (DAPO's overlong filtering)"
    )
    masked = first(feed(rows, {"max_completion_length": 256, "mask_truncated_completions": True}), "LPT107")
    assert masked.action == "raise model.init_args.max_completion_length from 256 to 512"
    # a method without mask_truncated_completions, whose budget is max_new_tokens (Online DPO, XPO, Nash-MD)
    other = first(feed(rows, {"max_new_tokens": 64}), "LPT107")
    assert other.action == "raise model.init_args.max_new_tokens from 64 to 128"


def test_length_hacking():
    """LPT108: reward and mean length rise together (length x1.5+, correlation > 0.8)."""
    rows = [_rl_row(reward=0.1 + 0.02 * t, completions__mean_length=50.0 + 5 * t) for t in range(20)]
    event = first(feed(rows), "LPT108")
    assert event.evidence["metrics"]["correlation"] == pytest.approx(1.0)
    assert event.evidence["metrics"]["length growth"] >= 1.5
    assert "SoftOverlongPunishment" in event.action and "dr_grpo" in event.action
    flat = [_rl_row(reward=0.1 + 0.02 * t, completions__mean_length=50.0) for t in range(20)]
    assert "LPT108" not in codes(feed(flat))


def test_reward_fn_saturated():
    """LPT109: the format reward sits at 1.0 with std 0 while the accuracy reward stays flat."""
    rows = []
    for t in range(20):
        format_mean, format_std = min(1.0, 0.5 + 0.25 * t), 0.0 if t >= 2 else 0.4
        rows.append(
            _rl_row(
                rewards__format__mean=format_mean,
                rewards__format__std=format_std,
                rewards__accuracy__mean=0.1 + 0.001 * (t % 3),
                rewards__accuracy__std=0.3,
            )
        )
    event = first(feed(rows, {"reward_weights": [1.0, 1.0]}), "LPT109")
    assert event.evidence["metrics"]["train/rewards/format/mean"] == 1.0
    assert event.evidence["metrics"]["train/rewards/format/std"] == 0.0
    assert "format's weight in model.init_args.reward_weights (now [1.0, 1.0])" in event.action


def test_reward_none():
    """LPT110: a reward function scoring None for every sample at 15 of 20 steps; exact with frac_none."""
    rows = [_rl_row(rewards__answer__mean=math.nan if t % 4 else 0.5) for t in range(20)]
    event = first(feed(rows), "LPT110")
    assert "answer returned None" in event.summary and "train/rewards/answer/frac_none" in event.summary
    assert "dataset columns it needs" in event.action
    exact = first(feed([_rl_row(rewards__answer__mean=0.5, rewards__answer__frac_none=0.7)] * 3), "LPT110")
    assert exact.evidence["metrics"] == {"train/rewards/answer/frac_none": pytest.approx(0.7)}
    assert "70% of samples" in exact.summary


def test_reward_plateau():
    """LPT111 (info): reward flat over two windows while groups still differ."""
    rows = [
        {**_rl_row(reward=0.5 + 0.001 * (t % 2), reward_std=0.2), "diagnostics/lr": 1e-6} for t in range(40)
    ]
    diagnoser = feed(rows, {"num_generations": 8})
    event = first(diagnoser, "LPT111")
    assert (event.step, event.severity) == (39, "info")
    assert "from 1e-06 to 2e-06" in event.action and "num_generations from 8 to 16" in event.action
    rising = [_rl_row(reward=0.1 + 0.01 * t, reward_std=0.2) for t in range(40)]
    assert "LPT111" not in codes(feed(rising))


# ---------------------------------------------------------------------- preference and reward modeling
def _dpo_row(**values) -> dict:
    return {f"train/{k.replace('__', '/')}": v for k, v in values.items()}


def test_preference_saturation():
    """LPT201: train accuracy 100% and loss 0.01 while validation accuracy is 70%."""
    rows = [_dpo_row(loss=0.01, rewards__accuracies=1.0, rewards__margins=8.0)] * 10
    rows.append({"step": 9, "val/rewards/accuracies": 0.7, "val/loss": 1.2})
    rows.append({"step": 10, **_dpo_row(loss=0.01, rewards__accuracies=1.0, rewards__margins=8.0)})
    event = first(feed(rows, {"beta": 0.1}), "LPT201")
    assert event.step == 10
    assert event.evidence["metrics"] == {
        "train/rewards/accuracies": 1.0,
        "train/loss": 0.01,
        "val/rewards/accuracies": 0.7,
    }
    assert "beta from 0.1 to 0.2" in event.action and "loss_type: ipo" in event.action
    reward_model = [{"train/loss": 0.001, "train/accuracy": 1.0, "train/margin": 9.0}] * 3 + [
        {"step": 2, "val/accuracy": 0.6}
    ]
    reward_model.append({"step": 3, "train/loss": 0.001, "train/accuracy": 1.0, "train/margin": 9.0})
    assert "center_rewards_coefficient" in first(feed(reward_model), "LPT201").action


def test_likelihood_displacement():
    """LPT202: logps/chosen falls while margins rise -> add an sft term (RPO)."""
    rows = [_dpo_row(logps__chosen=-15.0 - 0.5 * t, rewards__margins=0.05 * t) for t in range(10)]
    event = first(feed(rows, {"loss_type": "sigmoid", "loss_weights": None}), "LPT202")
    assert event.step == 5
    assert event.evidence["metrics"]["train/logps/chosen (early)"] == pytest.approx(-15.5)
    assert event.evidence["metrics"]["train/logps/chosen"] == pytest.approx(-17.0)
    assert event.action == (
        "add an SFT term on the chosen responses: model.init_args.loss_type: [sigmoid, sft] with "
        "model.init_args.loss_weights: [1.0, 1.0] (RPO, arXiv 2404.19733)"
    )
    rpo = first(feed(rows, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}), "LPT202")
    assert rpo.action == "raise the sft weight in model.init_args.loss_weights from 0.5 to 1.0"


def test_accuracy_at_chance():
    """LPT203: accuracy 50% after the first window -> raise lr or beta; 30% -> swapped columns?"""
    rows = [{**_dpo_row(rewards__accuracies=0.5, rewards__margins=0.0), "diagnostics/lr": 1e-6}] * 25
    event = first(feed(rows, {"beta": 0.1}), "LPT203")
    assert event.step == 20  # the first window (20 logged steps) is warm-up
    assert "from 1e-06 to 3e-06" in event.action and "beta from 0.1 to 0.2" in event.action
    below = first(feed([_dpo_row(rewards__accuracies=0.3)] * 25), "LPT203")
    assert "swapped" in below.summary and "swapped" in below.action


# ---------------------------------------------------------------------- SFT
def _sft_row(**values) -> dict:
    return {
        "train/loss": 1.5,
        "train/mean_token_accuracy": 0.6,
        **{f"diagnostics/{k}": v for k, v in values.items()},
    }


def test_loss_plateau_sft_only():
    """LPT301 (info): SFT train/loss flat over two windows; not raised for DPO's loss."""
    event = first(feed([_sft_row()] * 40), "LPT301")
    assert (event.step, event.severity) == (39, "info") and "trainer.max_steps" in event.action
    assert "LPT301" not in codes(feed([_dpo_row(loss=0.6, rewards__margins=0.1)] * 40))


def test_loss_plateau_not_at_the_end_of_a_decayed_schedule():
    """A flat train/loss while a schedule has decayed the rate below loss_plateau_lr_fraction (0.1) of its
    peak is the schedule's end (the SFT quickstart's cosine), not a stall: no LPT301; at a constant rate,
    or while the rate is still >= 10 % of its peak, the same losses raise it."""
    cosine = [3e-3 * 0.5 * (1 + math.cos(math.pi * i / 40)) for i in range(40)]
    assert cosine[-1] < 0.1 * 3e-3 <= cosine[30]
    assert "LPT301" not in codes(feed([_sft_row(lr=lr) for lr in cosine]))
    assert first(feed([_sft_row(lr=3e-3)] * 40), "LPT301").step == 39
    first(feed([_sft_row(lr=lr) for lr in cosine[:31]] * 2), "LPT301")  # the rate still >= 10 % of its peak


def test_train_val_gap():
    """LPT302: val/loss rises at two evaluations in a row while train/loss falls."""
    rows = []
    for t in range(30):
        rows.append({"step": t, **_sft_row(), "train/loss": 2.0 - 0.05 * t})
        if t % 10 == 9:
            rows.append({"step": t, "val/loss": {9: 1.5, 19: 1.6, 29: 1.7}[t]})
    event = first(feed(rows), "LPT302")
    assert event.step == 29 and event.evidence["metrics"]["val/loss"] == 1.7
    assert event.evidence["window"] == {"values": 3, "first_step": 9, "last_step": 29}
    assert "ModelCheckpoint(monitor='val/loss')" in event.action


def test_truncated_rows():
    """LPT303: 60% of rows reach max_length 32 -> 64; not raised with packing (packs are full by design)."""
    event = first(
        feed([_sft_row(frac_rows_at_max_length=0.6)] * 3, {"max_length": 32, "packing": None}), "LPT303"
    )
    assert event.evidence["metrics"] == {"diagnostics/frac_rows_at_max_length": 0.6}
    assert event.action == "raise data.init_args.max_length from 32 to 64"
    assert "LPT303" not in codes(feed([_sft_row(frac_rows_at_max_length=1.0)] * 3, {"packing": "bfd"}))
    exact = feed([{**_sft_row(), "train/frac_truncated": 0.4}] * 3, {"max_length": 32})
    assert first(exact, "LPT303").evidence["metrics"] == {"train/frac_truncated": 0.4}


def test_padding_heavy():
    """LPT304 (info): 70% padding -> packing."""
    event = first(feed([_sft_row(padding_fraction=0.7)] * 3), "LPT304")
    assert event.severity == "info" and event.action.startswith("set data.init_args.packing: bfd")


def test_empty_loss_rows():
    """LPT305: a fifth of the rows have no trained token."""
    event = first(feed([_sft_row(frac_rows_no_loss_tokens=0.2)] * 3, {"max_length": 16}), "LPT305")
    assert event.evidence["metrics"] == {"diagnostics/frac_rows_no_loss_tokens": 0.2}
    assert "max_length from 16 to 32" in event.action and "{% generation %}" in event.action


# ---------------------------------------------------------------------- options, schema, command
def test_thresholds_override_and_unknown_name():
    """Thresholds are overridable by name; an unknown name raises naming the allowed ones."""
    rows = [_rl_row(completions__clipped_ratio=0.3)] * 3
    assert "LPT107" not in codes(feed(rows, thresholds={"clipped_ratio": 0.4}))
    assert first(feed(rows, thresholds=Thresholds(clipped_ratio=0.25)), "LPT107").evidence["thresholds"] == {
        "clipped_ratio": 0.25
    }
    with pytest.raises(ValueError, match="unknown name.*clip_ratio_typo.*allowed"):
        TrainingDiagnostics(thresholds={"clip_ratio_typo": 0.1})


def test_every_code_is_documented():
    """docs/diagnostics.md lists every code with its name and severity, every threshold and measurement."""
    docs = (REPO / "docs" / "diagnostics.md").read_text()
    for code, (name, severity, _) in CODES.items():
        assert re.search(rf"\| {code} \| `{name}` \| {severity} \|", docs), code
    for field in Thresholds.__dataclass_fields__:
        assert f"`{field}`" in docs, field
    for metric in MEASURED:
        assert f"| `{metric}` |" in docs, metric


def test_diagnose_command_exit_code(tmp_path, capsys, monkeypatch):
    """``lit-posttrain diagnose`` exits 1 on an error finding and 0 otherwise; it finds metrics.csv below a dir."""
    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss"])
        writer.writerows([[0, 0, 1.0], [0, 1, "nan"]])
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "[lit-posttrain] ERROR LPT001 non-finite-loss at step 1" in out
    assert main([str(run / "metrics.csv"), "--json"]) == 1
    validate(json.loads(capsys.readouterr().out.splitlines()[0]))
    from lit_posttrain.cli import main as cli_main

    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n0,1,0.9\n")
    monkeypatch.setattr(sys, "argv", ["lit-posttrain", "diagnose", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        cli_main()
    assert exit.value.code == 0 and "no findings (2 logged rows checked)" in capsys.readouterr().out


# ---------------------------------------------------------------------- the shipped quickstarts, as recorded
# legitimate findings of the quickstarts as shipped (tests/data/diagnostics/README.md says why)
QUICKSTART_FINDINGS = {
    "sft": set(),
    "dpo": set(),
    "reward": set(),
    "grpo": {"LPT107"},
    "rloo": {"LPT107"},
}


@pytest.mark.parametrize("name", sorted(QUICKSTART_FINDINGS))
def test_quickstarts_no_error_no_false_warning(name):
    """Each stable quickstart, recorded as shipped, raises no error and only its expected findings; offline
    diagnosis of its log dir gives the events the live callback wrote to diagnostics.jsonl."""
    run = DATA / f"quickstart-{name}"
    diagnoser = diagnose_file(run / "metrics.csv")  # with hparams.yaml beside it, as `diagnose` reads it
    assert not diagnoser.has_error
    assert codes(diagnoser) == QUICKSTART_FINDINGS[name], [e.line() for e in diagnoser.events]
    assert [e.to_json() for e in diagnoser.events] == read_jsonl(run / "diagnostics.jsonl")


# ---------------------------------------------------------------------- real short runs (the live path)
def _constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def test_live_grpo_constant_reward_matches_offline(tiny_model_dir, tmp_path, capsys):
    """GRPO with a constant reward: zero-std-groups (a reward bug) within 3 steps; diagnostics.jsonl
    validates; the logger gets diagnostics/LPT101; ``diagnose`` on the log dir prints the same findings."""
    from lit_posttrain import GRPODataModule, GRPOModule

    L.seed_everything(0)
    module = GRPOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[_constant_reward],
        num_generations=4,
        max_completion_length=6,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    callback = TrainingDiagnostics()
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    rows = [{"prompt": f"Digits only: {i}+1="} for i in range(16)]
    trainer.fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=2))

    event = next(e for e in callback.findings if e.code == "LPT101")
    assert (event.status, event.step, event.severity) == ("new", 2, "warning")
    assert event.evidence["metrics"]["train/frac_reward_zero_std"] == 1.0
    assert "train/reward has been 1 at every logged step so far" in event.summary
    assert (
        event.action
        == "check the reward function on a few completions by hand: better completions must score higher"
    )
    log_dir = Path(trainer.log_dir)
    records = read_jsonl(log_dir / "diagnostics.jsonl")
    assert records == [e.to_json() for e in callback.findings]
    counts = [row["diagnostics/LPT101"] for row in csv.DictReader((log_dir / "metrics.csv").open())]
    assert counts == ["", "", "1", "2"]
    assert "diagnostics/grad_norm" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    # offline: the same events from metrics.csv + hparams.yaml, the same lines from the command
    assert [e.to_json() for e in diagnose_file(log_dir / "metrics.csv").events] == records
    capsys.readouterr()
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[: len(records)] == [r["line"] for r in records]
    assert printed[len(records)] == callback.diagnoser.summary().splitlines()[0]


def test_live_without_a_logger(tiny_model_dir, tmp_path, monkeypatch):
    """Without a logger the callback reads callback_metrics: the same finding, and no file is written."""
    from lit_posttrain import GRPODataModule, GRPOModule

    monkeypatch.chdir(tmp_path)
    L.seed_everything(0)
    module = GRPOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[_constant_reward],
        num_generations=4,
        max_completion_length=6,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    callback = TrainingDiagnostics()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    rows = [{"prompt": f"Digits only: {i}+1="} for i in range(16)]
    trainer.fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=2))
    assert [(e.code, e.status) for e in callback.findings if e.code == "LPT101"] == [("LPT101", "new")]
    assert callback.path is None and list(tmp_path.iterdir()) == []


def test_live_non_finite_loss_stops_the_run(tiny_model_dir, tmp_path):
    """SFT with an absurd learning rate: the loss turns NaN and the run stops at that step, before the
    optimizer applies it (`ops.finite_grad_norm`, every method; LPT001 remains for `lit-posttrain
    diagnose` on a run's metrics.csv), with an error, not a quiet early stop."""
    from lit_posttrain import SFTDataModule, SFTModule
    from lit_posttrain.ops import NonFiniteError

    L.seed_everything(0)
    module = SFTModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.SGD(p, lr=1e12))
    rows = [
        json.loads(line) for line in (REPO / "examples/data/sft/train.jsonl").read_text().splitlines()[:64]
    ]
    callback = TrainingDiagnostics()
    trainer = L.Trainer(
        max_steps=10,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(NonFiniteError, match=r"step (\d+): the gradient norm is (nan|inf)") as caught:
        trainer.fit(module, SFTDataModule(tiny_model_dir, train_data=rows, batch_size=8, max_length=32))
    assert trainer.global_step == int(caught.value.args[0].split(":")[0].split()[1]) < 10
    assert all(torch.isfinite(p).all() for p in module.parameters())


_DDP_SCRIPT = '''
import json, sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_posttrain import SFTDataModule, SFTModule
from lit_posttrain.callbacks import TrainingDiagnostics


class Padding(L.Callback):
    """This rank's padded and total positions of every batch, and how many findings it emitted."""

    def __init__(self, out, diagnostics):
        self.out, self.diagnostics, self.values = out, diagnostics, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mask = batch["attention_mask"]
        self.values.append([int((mask == 0).sum()), mask.numel()])

    def on_fit_end(self, trainer, pl_module):
        record = {"padding": self.values, "findings": len(self.diagnostics.findings)}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out, model, data = sys.argv[1:4]
    torch.set_num_threads(1)
    L.seed_everything(0)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:64]]
    module = SFTModule(model, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    datamodule = SFTDataModule(model, train_data=rows, batch_size=4, max_length=9)
    diagnostics = TrainingDiagnostics()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, log_every_n_steps=1,
        logger=CSVLogger(out, name="logs"), callbacks=[diagnostics, Padding(out, diagnostics)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule)
'''


@pytest.mark.slow
def test_ddp_rank_zero_writes_reduced_metrics(tiny_model_dir, tmp_path):
    """2-process DDP (gloo): only rank 0 diagnoses and writes diagnostics.jsonl (each event once), and the
    measured diagnostics/padding_fraction counts both ranks' batches."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_SCRIPT)
    data = REPO / "examples" / "data" / "sft" / "train.jsonl"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), tiny_model_dir, str(data)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log_dir = tmp_path / "logs" / "version_0"
    records = read_jsonl(log_dir / "diagnostics.jsonl")
    assert [r["code"] for r in records if r["status"] == "new"] == ["LPT303"]  # rows cut at max_length 9
    assert len({(r["code"], r["status"], r["step"]) for r in records}) == len(records)  # written once
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["findings"] == len(records) and ranks[1]["findings"] == 0
    logged = [
        float(row["diagnostics/padding_fraction"]) for row in csv.DictReader((log_dir / "metrics.csv").open())
    ]
    expected = [(a[0] + b[0]) / (a[1] + b[1]) for a, b in zip(ranks[0]["padding"], ranks[1]["padding"])]
    assert logged == pytest.approx(expected, abs=1e-6)
    assert ranks[0]["padding"] != ranks[1]["padding"]  # the ranks saw different batches


def test_learning_signal_names_the_step_of_each_column_and_a_stale_after(tiny_model_dir, caplog):
    """LearningSignal labels its columns with the optimizer step they were measured at and says when the
    last validation is older than the final model."""
    import logging

    import lightning as L

    from lit_posttrain import SFTDataModule, SFTModule
    from lit_posttrain.callbacks import LearningSignal

    signal = LearningSignal(["val/loss"], final_validation=False)  # (by default the final step is validated)
    data = SFTDataModule(tiny_model_dir, train_data="examples/data/sft/val.jsonl", val_data="examples/data/sft/val.jsonl",
                         batch_size=8, max_length=16)  # fmt: skip
    trainer = L.Trainer(max_steps=3, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[signal])  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(SFTModule(tiny_model_dir, random_init=True, diagnostics=False), data)
    assert (signal.before_step, signal.after_step) == (0, 2)
    assert "step 0" in caplog.text and "step 2" in caplog.text
    assert "the last validation ran at step 2, training ended at step 3" in caplog.text


def test_learning_signal_measures_the_final_model(tiny_model_dir):
    """max_steps 5 with validation every 4 steps: the "after" column used to be step 4's validation
    (a stale model); LearningSignal now has the final step validated too, and labels it step 5."""
    import json as _json

    from lit_posttrain import SFTDataModule, SFTModule
    from lit_posttrain.callbacks import LearningSignal

    root = Path(__file__).resolve().parents[2]
    rows = [_json.loads(line) for line in (root / "examples/data/sft/train.jsonl").read_text().splitlines()[:48]]
    signal = LearningSignal(metrics=["val/loss"])
    validated = []

    class Steps(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                validated.append(trainer.global_step)

    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, val_check_interval=4, check_val_every_n_epoch=None,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=-1, callbacks=[signal, Steps()])
    dm = SFTDataModule(tiny_model_dir, train_data=rows[:40], val_data=rows[40:], batch_size=4)
    trainer.fit(SFTModule(tiny_model_dir, random_init=True, diagnostics=False), datamodule=dm)
    assert validated == [4, 5]  # the periodic one, then the final model once
    assert signal.before_step == 0 and signal.after_step == 5


def test_learning_signal_columns_stay_aligned_for_long_metric_names():
    """A metric name longer than the default name column (GKD's and SDFT's
    val/teacher_mean_token_accuracy) widens the column instead of pushing its figures right."""
    from lit_posttrain.callbacks import LearningSignal

    names = ["val/kl", "val/teacher_mean_token_accuracy", "val/a_much_longer_metric_name_than_any_other/x"]
    signal = LearningSignal(names)
    signal.before, signal.after = {n: 0.5 for n in names}, {n: 0.25 for n in names[:2]}
    signal.before_step, signal.after_step = 0, 200
    header, *rows = signal.table()
    assert len({len(row) for row in [header, *rows]}) == 1, [header, *rows]  # every column ends at the same place
    width = len(names[2]) + 2
    assert header[width:].split() == ["step", "0", "step", "200", "change"]
    assert rows[1][:width].rstrip() == names[1] and rows[1][width:].split() == ["0.5000", "0.2500", "-0.2500"]
    assert rows[2][width:].split() == ["0.5000", "-"]  # no "after" value
