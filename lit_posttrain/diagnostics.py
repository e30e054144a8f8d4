"""Training diagnostics: turn the metrics a run logs into findings with a code, evidence and an action.

One place for the heuristics, used two ways with the same results:

- live, by the `lit_posttrain.callbacks.TrainingDiagnostics` callback, which feeds `Diagnoser`
  every row the Trainer writes to its logger;
- offline, by ``lit-posttrain diagnose RUN_DIR`` (or a ``metrics.csv`` path), which feeds it the
  rows of the run's CSVLogger file:

      lit-posttrain diagnose outputs/quickstart-grpo
      [lit-posttrain] WARNING LPT107 truncation-heavy at step 2: 85% of completions ...

`Diagnoser` is pure: ``update(step, metrics)`` takes one logged row (metric name -> float) and
returns the finding events of that row (a finding first seen, a reminder while it persists, its
resolution). A check runs on the rows that carry its metrics; windows count logged rows
("the last 20 logged steps"), so the live callback and the offline command, which see the same
rows, give the same findings. The codes, thresholds and sources are listed in `CODES`, in
`Thresholds` and in docs/diagnostics.md; the JSON record of a finding is `Finding.to_json`
(schema version `SCHEMA_VERSION`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import statistics
import sys
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCHEMA = "lit-posttrain.diagnostics"
SCHEMA_VERSION = 1
PREFIX = "[lit-posttrain]"

# code -> (name, default severity, what it means); the order of the checks in `Diagnoser`
CODES: dict[str, tuple[str, str, str]] = {
    # every method
    "LPT001": ("non-finite-loss", "error", "train/loss is NaN or infinite"),
    "LPT002": ("non-finite-grad", "error", "the gradient norm is NaN or infinite"),
    "LPT003": ("grad-norm-spike", "warning", "the gradient norm jumped far above its recent median"),
    "LPT004": ("lr-zero", "warning", "the learning rate has been 0 for several logged steps"),
    "LPT005": ("memory-headroom", "warning", "peak memory is close to the device's (or host's) total"),
    "LPT006": ("data-wait", "info", "the training loop spends much of its time waiting for batches"),
    # online RL (GRPO, RLOO)
    "LPT101": ("zero-std-groups", "warning", "many groups have identical rewards: no advantage, no gradient"),
    "LPT102": ("reward-std-tiny", "warning", "rewards differ within groups by tiny amounts only"),
    "LPT103": ("entropy-collapse", "warning", "the policy's entropy fell far below its early value"),
    "LPT104": ("kl-spike", "warning", "train/kl jumped far above its recent median"),
    "LPT105": ("clip-ratio-high", "warning", "many tokens hit the clipped region of the surrogate"),
    "LPT106": ("sampler-mismatch", "warning", "the rollout engine's log-probs differ from the trainer's"),
    "LPT107": ("truncation-heavy", "warning", "many completions stop at max_completion_length"),
    "LPT108": ("length-hacking", "warning", "reward and completion length rise together"),
    "LPT109": ("reward-fn-saturated", "warning", "one reward function is saturated while another is flat"),
    "LPT110": ("reward-none", "warning", "a reward function returns None for most samples"),
    "LPT111": ("reward-plateau", "info", "the reward stopped improving although groups still differ"),
    # preference optimization (DPO family) and reward modeling
    "LPT201": ("preference-saturation", "warning", "train accuracy ~1 and loss ~0 while validation lags"),
    "LPT202": ("likelihood-displacement", "warning", "logps/chosen falls while the margins rise"),
    "LPT203": ("accuracy-at-chance", "warning", "preference accuracy stays at (or below) chance"),
    # SFT (and val/loss for every offline method)
    "LPT301": ("loss-plateau", "info", "train/loss stopped decreasing"),
    "LPT302": ("train-val-gap", "warning", "val/loss rises while train/loss falls"),
    "LPT303": ("truncated-rows", "warning", "many rows are cut at max_length"),
    "LPT304": ("padding-heavy", "info", "a large fraction of every batch is padding"),
    "LPT305": ("empty-loss-rows", "warning", "rows without a single trained token"),
}

# what `TrainingDiagnostics` measures itself and adds to the logged rows (definitions: docs/diagnostics.md)
MEASURED = (
    "diagnostics/grad_norm",
    "diagnostics/lr",
    "diagnostics/memory/peak_fraction",
    "diagnostics/data_wait_fraction",
    "diagnostics/padding_fraction",
    "diagnostics/frac_rows_at_max_length",
    "diagnostics/frac_rows_no_loss_tokens",
)


@dataclass(frozen=True)
class Thresholds:
    """Where each check fires. Defaults are the field's rules of thumb; each says its source.

    Pass overrides by name: ``TrainingDiagnostics(thresholds={"zero_std_fraction": 0.7})`` or
    ``lit-posttrain diagnose RUN --threshold zero_std_fraction=0.7``.
    """

    # LPT003: a value above this multiple of the median of the previous window is a spike
    # (loss/gradient-spike monitoring in LLM training, e.g. OLMo 2, arXiv 2501.00656)
    grad_spike_factor: float = 10.0
    # LPT004: this many consecutive logged steps at lr 0 (a schedule that ended before max_steps)
    lr_zero_steps: int = 5
    # LPT005: peak memory over total; above it the next longer batch may not fit
    memory_fraction: float = 0.95
    # LPT006: median share of wall time spent waiting for the next batch
    data_wait_fraction: float = 0.3
    # LPT101: mean frac_reward_zero_std over the window (TRL users' "loss is 0" reports; DAPO's
    # dynamic sampling, arXiv 2503.14476 §3.2, drops such groups)
    zero_std_fraction: float = 0.5
    # LPT102: mean reward_std below this (but groups not all identical): differences are noise
    reward_std_floor: float = 1e-3
    # LPT103: entropy below this fraction of its early median, or below the floor in nats
    # (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617)
    entropy_collapse_fraction: float = 0.1
    entropy_floor: float = 0.02
    # LPT104: a KL value above factor x the previous window's median and above median + floor
    kl_spike_factor: float = 5.0
    kl_spike_floor: float = 0.05
    # LPT105: mean clip_ratio/region_mean (PPO practice: clip fractions beyond ~0.1-0.2 mean too large steps)
    clip_ratio: float = 0.2
    # LPT106: median sampling/logp_diff/mean in nats per token (Yao et al. 2025, "Your efficient RL
    # framework secretly brings you off-policy RL training"; TRL's vllm_importance_sampling_correction)
    logp_diff: float = 0.05
    # LPT107: mean completions/clipped_ratio (REFERENCE.md: ~0.1-0.2; DAPO's overlong filtering)
    clipped_ratio: float = 0.2
    # LPT108: Pearson correlation of reward and mean length, and growth of the mean length
    # (Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF", arXiv 2310.03716)
    length_reward_correlation: float = 0.8
    length_growth: float = 1.5
    # LPT109: a reward function with a mean std below this is saturated; one whose mean moved less
    # than ``reward_fn_flat`` between the early and the recent window is flat
    reward_fn_saturated_std: float = 0.01
    reward_fn_flat: float = 0.02
    # LPT110: fraction of samples (or of logged steps with every sample) scored None
    reward_none_fraction: float = 0.5
    # LPT111: the mean reward moved less than this fraction of the mean reward_std over a window
    reward_plateau_fraction: float = 0.1
    # LPT201: train accuracy at least this, train loss below ``saturation_loss``, validation accuracy
    # at least ``saturation_val_gap`` below train (IPO, Azar et al. 2023, arXiv 2310.12036 §4.2)
    saturation_accuracy: float = 0.98
    saturation_loss: float = 0.1
    saturation_val_gap: float = 0.1
    # LPT202: logps/chosen fell by more than this fraction of its early magnitude (and at least
    # ``displacement_min_nats``) while margins rose (Razin et al. 2024, arXiv 2410.08847)
    displacement_fraction: float = 0.05
    displacement_min_nats: float = 1.0
    # LPT203: mean accuracy within this distance of 0.5 (or below 0.5 - it) after the first window
    chance_margin: float = 0.05
    # LPT301: train/loss decreased by less than this fraction between two consecutive windows, while the
    # learning rate is at least ``loss_plateau_lr_fraction`` of its peak (a decayed schedule's end is flat
    # by design)
    loss_plateau_fraction: float = 0.01
    loss_plateau_lr_fraction: float = 0.1
    # LPT302: val/loss rose at this many consecutive evaluations (early stopping's patience, Prechelt 1998)
    val_rises: int = 2
    # LPT303: fraction of rows cut at max_length
    truncated_rows_fraction: float = 0.1
    # LPT304: padded fraction of the batch positions
    padding_fraction: float = 0.5
    # LPT305: fraction of rows with no trained token
    empty_rows_fraction: float = 0.01

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, float] | None) -> Thresholds:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides or {}) - set(names))
        if unknown:
            raise ValueError(f"thresholds: unknown name(s) {unknown}; allowed: {names}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) if types[k] == "int" else float(v) for k, v in (overrides or {}).items()})


@dataclass
class Finding:
    """One event of one finding: first seen (``new``), still there (``persisting``) or gone (``resolved``).

    ``evidence`` holds ``metrics`` (name -> value the check read), ``window`` (``values``,
    ``first_step``, ``last_step``: the logged rows it read) and ``thresholds`` (name -> value).
    """

    code: str
    step: int
    summary: str  # the evidence in words and what it means
    action: str  # what to change: the option and a suggested value
    evidence: dict
    severity: str = ""
    name: str = ""
    status: str = "new"
    since: int = -1  # first step of this episode
    count: int = 1  # logged steps (rows where the check ran) the finding has been active

    def __post_init__(self):
        self.name = self.name or CODES[self.code][0]
        self.severity = self.severity or CODES[self.code][1]
        self.since = self.step if self.since < 0 else self.since

    def line(self) -> str:
        head = f"{PREFIX} {self.severity.upper()} {self.code} {self.name}"
        if self.status == "resolved":
            return (
                f"{head} resolved at step {self.step} (active for {self.count} logged steps since step "
                f"{self.since})."
            )
        if self.status == "persisting":
            head += f" persists at step {self.step} ({self.count} logged steps since step {self.since})"
        else:
            head += f" at step {self.step}"
        return f"{head}: {self.summary}. Action: {self.action}."

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "code": self.code,
            "name": self.name,
            "severity": self.severity,
            "status": self.status,
            "step": self.step,
            "since": self.since,
            "count": self.count,
            "summary": self.summary,
            "action": self.action,
            "evidence": _json_safe(self.evidence),
            "line": self.line(),
        }


@dataclass
class _Series:
    """A metric's logged values: the last ``2 * window`` (with steps) and the first ``window``."""

    window: int
    steps: deque = field(init=False)
    values: deque = field(init=False)
    early: list = field(default_factory=list)
    count: int = 0

    def __post_init__(self):
        self.steps, self.values = deque(maxlen=2 * self.window), deque(maxlen=2 * self.window)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)
        if len(self.early) < self.window:
            self.early.append(value)
        self.count += 1


class Diagnoser:
    """The heuristics, fed one logged row at a time.

    Args:
        context: the run's options (module and DataModule hyperparameters, ``precision``), used to
            word actions ("raise model.init_args.num_generations from 4 to 8") and by a few checks
            (``packing``, ``max_length``, fp16). Build it with `run_context`.
        window: logged steps per window.
        remind_every: while a finding persists, repeat it at most every this many steps.
        thresholds: a `Thresholds` (or overrides by name).
        min_values: fewest logged values a windowed check needs (early-versus-recent comparisons
            need twice as many).
    """

    def __init__(
        self,
        context: Mapping | None = None,
        *,
        window: int = 20,
        remind_every: int = 50,
        thresholds: Thresholds | Mapping[str, float] | None = None,
        min_values: int = 3,
    ):
        if window < 2 or min_values < 1 or remind_every < 1:
            raise ValueError(
                f"window must be >= 2, min_values >= 1 and remind_every >= 1; got window={window}, "
                f"min_values={min_values}, remind_every={remind_every}"
            )
        self.context = dict(context or {})
        self.window, self.remind_every, self.min_values = window, remind_every, min_values
        if not isinstance(thresholds, Thresholds):
            thresholds = Thresholds.with_overrides(thresholds)
        self.t = thresholds
        self.series: dict[str, _Series] = {}
        # (step, value, median of the previous window) of the values checked for spikes
        self.spikes: dict[str, deque] = {
            name: deque(maxlen=window) for name in ("train/grad_norm", "diagnostics/grad_norm", "train/kl")
        }
        self.val_points: list[tuple[int, float, float]] = []  # (step, val/loss, train/loss mean before it)
        self.reward_range = (math.inf, -math.inf)  # min and max train/reward so far
        self.active: dict[str, Finding] = {}  # code -> its latest finding while active
        self.last_emitted: dict[str, int] = {}  # code -> step of its last new/persisting event
        self.events: list[Finding] = []  # every event so far
        self.episodes: list[Finding] = []  # every episode's latest event (for the summary)
        self.episode_of: dict[str, int] = {}  # code -> index of its current episode in `episodes`
        self.rows = 0
        # (code, metrics whose presence in a row runs the check, check)
        self.checks = (
            ("LPT001", ("train/loss",), self._non_finite_loss),
            ("LPT002", ("train/grad_norm", "diagnostics/grad_norm"), self._non_finite_grad),
            ("LPT003", ("train/grad_norm", "diagnostics/grad_norm"), self._grad_norm_spike),
            ("LPT004", ("diagnostics/lr",), self._lr_zero),
            ("LPT005", ("diagnostics/memory/peak_fraction",), self._memory_headroom),
            ("LPT006", ("diagnostics/data_wait_fraction",), self._data_wait),
            ("LPT101", ("train/frac_reward_zero_std",), self._zero_std_groups),
            ("LPT102", ("train/reward_std",), self._reward_std_tiny),
            ("LPT103", ("train/entropy",), self._entropy_collapse),
            ("LPT104", ("train/kl",), self._kl_spike),
            ("LPT105", ("train/clip_ratio/region_mean",), self._clip_ratio_high),
            ("LPT106", ("train/sampling/logp_diff/mean",), self._sampler_mismatch),
            ("LPT107", ("train/completions/clipped_ratio",), self._truncation_heavy),
            ("LPT108", ("train/completions/mean_length",), self._length_hacking),
            ("LPT109", ("train/reward",), self._reward_fn_saturated),
            ("LPT110", ("train/reward",), self._reward_none),
            ("LPT111", ("train/reward",), self._reward_plateau),
            ("LPT201", ("train/rewards/accuracies", "train/accuracy"), self._preference_saturation),
            ("LPT202", ("train/logps/chosen",), self._likelihood_displacement),
            ("LPT203", ("train/rewards/accuracies", "train/accuracy"), self._accuracy_at_chance),
            ("LPT301", ("train/loss",), self._loss_plateau),
            ("LPT302", ("val/loss",), self._train_val_gap),
            ("LPT303", ("train/frac_truncated", "diagnostics/frac_rows_at_max_length"), self._truncated_rows),
            ("LPT304", ("diagnostics/padding_fraction",), self._padding_heavy),
            ("LPT305", ("diagnostics/frac_rows_no_loss_tokens",), self._empty_loss_rows),
        )

    # ------------------------------------------------------------------ feeding
    def update(self, step: int, metrics: Mapping[str, float]) -> list[Finding]:
        """Read one logged row; -> the events it raises (new, persisting, resolved findings)."""
        row = {k: float(v) for k, v in metrics.items() if _is_input(k)}
        if not row:
            return []
        self.rows += 1
        if "val/loss" in row and "train/loss" in self.series:
            train = self.series["train/loss"]
            self.val_points.append((step, row["val/loss"], _mean(list(train.values)[-self.window :])))
        for name, value in row.items():
            self._add(step, name, value)
        events = []
        for code, triggers, check in self.checks:
            if not any(name in row for name in triggers):
                continue
            finding = check(step, row)
            events.extend(self._track(code, step, finding))
        self.events.extend(events)
        return events

    def _add(self, step: int, name: str, value: float) -> None:
        series = self.series.get(name)
        if series is None:
            series = self.series[name] = _Series(self.window)
        if name in self.spikes and math.isfinite(value):
            previous = [v for v in list(series.values)[-self.window :] if math.isfinite(v)]
            if len(previous) >= max(5, self.min_values):
                self.spikes[name].append((step, value, statistics.median(previous)))
        if name == "train/reward" and math.isfinite(value):
            self.reward_range = (min(self.reward_range[0], value), max(self.reward_range[1], value))
        series.add(step, value)

    def _track(self, code: str, step: int, finding: Finding | None) -> list[Finding]:
        active = self.active.get(code)
        if finding is None:
            if active is None:
                return []
            del self.active[code]
            resolved = dataclasses.replace(active, step=step, status="resolved")
            self.episodes[self.episode_of.pop(code)] = resolved
            return [resolved]
        if active is None:
            finding.status, finding.since, finding.count = "new", step, 1
            self.active[code] = finding
            self.episode_of[code] = len(self.episodes)
            self.episodes.append(finding)
            self.last_emitted[code] = step
            return [finding]
        finding.since, finding.count = active.since, active.count + 1
        finding.status = "persisting"
        self.active[code] = finding
        self.episodes[self.episode_of[code]] = finding
        if step - self.last_emitted[code] >= self.remind_every:
            self.last_emitted[code] = step
            return [finding]
        return []

    # ------------------------------------------------------------------ results
    @property
    def has_error(self) -> bool:
        return any(e.severity == "error" and e.status == "new" for e in self.events)

    def counts(self) -> dict[str, int]:
        """``diagnostics/<code>`` -> logged steps its finding has been active (0 once resolved)."""
        counts = {f"diagnostics/{e.code}": 0 for e in self.episodes}
        counts.update({f"diagnostics/{code}": f.count for code, f in self.active.items()})
        return counts

    def summary(self) -> str:
        if not self.episodes:
            return f"{PREFIX} TrainingDiagnostics: no findings ({self.rows} logged rows checked)."
        lines = [
            f"{PREFIX} TrainingDiagnostics: {len(self.episodes)} finding(s) ({self.rows} logged rows checked)"
        ]
        for f in self.episodes:
            until = (
                f"resolved at step {f.step}" if f.status == "resolved" else f"still active at step {f.step}"
            )
            lines.append(
                f"  {f.severity.upper()} {f.code} {f.name}: from step {f.since}, {f.count} logged steps, {until}. "
                f"Action: {f.action}."
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ helpers
    def _finding(self, code, step, summary, action, metrics, thresholds, window=None, severity="") -> Finding:
        # 6 significant digits: a mean of equal values reads 0.2, not 0.20000000000000004
        metrics = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in metrics.items()}
        evidence = {"metrics": metrics, "thresholds": thresholds}
        if window is not None:
            evidence["window"] = window
        return Finding(
            code=code, step=step, summary=summary, action=action, evidence=evidence, severity=severity
        )

    def _recent(self, name: str, n: int | None = None) -> tuple[list[float], dict] | None:
        """The last ``n`` (default window) values of a metric, if at least ``min_values``, and their window."""
        series = self.series.get(name)
        if series is None or series.count < self.min_values:
            return None
        n = min(n or self.window, len(series.values))
        steps = list(series.steps)[-n:]
        return list(series.values)[-n:], {"values": n, "first_step": steps[0], "last_step": steps[-1]}

    def _early_recent(self, name: str) -> tuple[list[float], list[float], dict] | None:
        """(first k, last k values, window of the last k), k = min(window, count // 2), if count >= 2 min_values."""
        series = self.series.get(name)
        if series is None or series.count < 2 * self.min_values:
            return None
        k = min(self.window, series.count // 2)
        steps = list(series.steps)[-k:]
        window = {"values": k, "first_step": steps[0], "last_step": steps[-1], "early_values": k}
        return series.early[:k], list(series.values)[-k:], window

    def _grad_name(self) -> str:
        return "train/grad_norm" if "train/grad_norm" in self.series else "diagnostics/grad_norm"

    def _family(self) -> str | None:
        """Which kind of method logged these metrics: rl, preference, reward, sft (or None yet)."""
        if "train/frac_reward_zero_std" in self.series or "train/reward_std" in self.series:
            return "rl"
        if "train/rewards/margins" in self.series:
            return "preference"
        if "train/margin" in self.series and "train/accuracy" in self.series:
            return "reward"
        if "train/mean_token_accuracy" in self.series:
            return "sft"
        return None

    def _reward_funcs(self) -> list[str]:
        return [n[len("train/rewards/") : -len("/mean")] for n in self.series if _is_reward_fn_mean(n)]

    def _lr_action(self, verb: str, factor: float) -> str:
        lr = self._latest("diagnostics/lr")
        option = "the learning rate (model.init_args.optimizer.init_args.lr)"
        if lr is None or not lr > 0:
            return f"{verb} {option} by {_num(factor if factor > 1 else 1 / factor)}x"
        return f"{verb} {option} from {_num(lr)} to {_num(lr * factor)}"

    def _latest(self, name: str) -> float | None:
        series = self.series.get(name)
        return series.values[-1] if series else None

    # ------------------------------------------------------------------ every method
    def _non_finite_loss(self, step, row):
        loss = row["train/loss"]
        if math.isfinite(loss):
            return None
        fp16 = _is_fp16(self.context)
        action = (
            f"{self._lr_action('lower', 0.1)}, keep gradient clipping on (trainer.gradient_clip_val: 1.0; "
            "GRPO/RLOO: model.init_args.max_grad_norm: 1.0)"
            + ("; with fp16 prefer trainer.precision: bf16-mixed" if fp16 else "")
            + "; resume from the last finite checkpoint"
        )
        return self._finding(
            "LPT001",
            step,
            f"train/loss is {loss} at step {step}: the weights are (or are about to be) corrupted, every later step is wasted",
            action,
            {"train/loss": loss},
            {"finite": True},
        )

    def _non_finite_grad(self, step, row):
        name = "train/grad_norm" if "train/grad_norm" in row else "diagnostics/grad_norm"
        got = self._recent(name, 3) if _is_fp16(self.context) else ([row[name]], None)
        if got is None:
            return None
        values, _ = got
        if any(math.isfinite(v) for v in values):
            return None
        fp16 = _is_fp16(self.context)
        summary = f"{name} is {row[name]} at step {step}" + (
            " and the 2 logged steps before it: fp16 loss scaling keeps overflowing"
            if fp16
            else ": the update is NaN/inf and corrupts the weights unless the optimizer step is skipped"
        )
        action = (
            f"{self._lr_action('lower', 0.1)}, clip gradients (trainer.gradient_clip_val: 1.0; GRPO/RLOO: "
            "model.init_args.max_grad_norm: 1.0)" + ("; prefer trainer.precision: bf16-mixed" if fp16 else "")
        )
        return self._finding(
            "LPT002",
            step,
            summary,
            action,
            {name: row[name]},
            {"finite": True},
            severity="warning" if fp16 else "error",
        )

    def _grad_norm_spike(self, step, row):
        return self._spike(
            "LPT003",
            self._grad_name(),
            step,
            self.t.grad_spike_factor,
            0.0,
            "the update at that step was far larger than usual (a bad batch or too high a learning rate)",
            f"{self._lr_action('lower', 0.5)}, and clip gradients (trainer.gradient_clip_val: 1.0; "
            "GRPO/RLOO: model.init_args.max_grad_norm: 1.0)",
            {"grad_spike_factor": self.t.grad_spike_factor},
        )

    def _spike(self, code, name, step, factor, floor, meaning, action, thresholds):
        recent = self._recent(name)
        if recent is None:
            return None
        first = recent[1]["first_step"]
        spikes = [
            (s, v, m) for s, v, m in self.spikes[name] if s >= first and v > factor * m and v > m + floor
        ]
        if not spikes:
            return None
        s, v, m = max(spikes, key=lambda spike: spike[1] / max(spike[2], 1e-12))
        ratio = "inf" if m <= 0 else f"{v / m:.1f}"
        summary = (
            f"{name} jumped to {_num(v)} at step {s}, {ratio}x its median ({_num(m)}) over the logged steps "
            f"before it (threshold {_num(factor)}x{f', and +{_num(floor)}' if floor else ''}); "
            f"{len(spikes)} such spike(s) in the last {recent[1]['values']} logged steps: {meaning}"
        )
        return self._finding(
            code,
            step,
            summary,
            action,
            {name: v, f"{name} (median before)": m, "spikes in window": len(spikes)},
            thresholds,
            recent[1],
        )

    def _lr_zero(self, step, row):
        got = self._recent("diagnostics/lr", self.t.lr_zero_steps)
        if got is None or len(got[0]) < self.t.lr_zero_steps or any(v > 0 for v in got[0]):
            return None
        return self._finding(
            "LPT004",
            step,
            f"diagnostics/lr has been 0 for the last {len(got[0])} logged steps (threshold {self.t.lr_zero_steps}): "
            "the optimizer no longer changes the weights",
            "check the learning-rate schedule (model.init_args.lr_scheduler): its length (e.g. T_max, total_iters) "
            "should match trainer.max_steps, or stop the run here",
            {"diagnostics/lr": row["diagnostics/lr"]},
            {"lr_zero_steps": self.t.lr_zero_steps},
            got[1],
        )

    def _memory_headroom(self, step, row):
        fraction = row["diagnostics/memory/peak_fraction"]
        if not fraction > self.t.memory_fraction:
            return None
        batch = "model.init_args.micro_batch_size" if self._family() == "rl" else "data.init_args.batch_size"
        return self._finding(
            "LPT005",
            step,
            f"peak memory is {_pct(fraction)} of the total (diagnostics/memory/peak_fraction, threshold "
            f"{_pct(self.t.memory_fraction)}): a longer batch may run out of memory",
            f"lower {batch} (raise trainer.accumulate_grad_batches to keep the global batch), or set "
            "model.init_args.gradient_checkpointing: true",
            {"diagnostics/memory/peak_fraction": fraction},
            {"memory_fraction": self.t.memory_fraction},
        )

    def _data_wait(self, step, row):
        got = self._recent("diagnostics/data_wait_fraction")
        if got is None:
            return None
        wait = _median(got[0])
        if not wait > self.t.data_wait_fraction:
            return None
        workers = self.context.get("num_workers")
        raise_to = f" from {workers} to {max(2, 2 * workers)}" if isinstance(workers, int) else ""
        return self._finding(
            "LPT006",
            step,
            f"the loop waits for the next batch {_pct(wait)} of the time (diagnostics/data_wait_fraction, median "
            f"{_over(got[1])}, threshold {_pct(self.t.data_wait_fraction)}): the accelerator idles",
            f"raise data.init_args.num_workers{raise_to}, or move tokenization out of the training loop",
            {"diagnostics/data_wait_fraction": wait},
            {"data_wait_fraction": self.t.data_wait_fraction},
            got[1],
        )

    # ------------------------------------------------------------------ online RL
    def _zero_std_groups(self, step, row):
        got = self._recent("train/frac_reward_zero_std")
        if got is None:
            return None
        values, window = got
        frac = _mean(values)
        if not frac > self.t.zero_std_fraction:
            return None
        metrics = {"train/frac_reward_zero_std": frac}
        g = self.context.get("num_generations")
        more = (
            f"raise model.init_args.num_generations from {g} to {2 * g}"
            if isinstance(g, int)
            else "raise model.init_args.num_generations (e.g. double it)"
        )
        reward = self._recent("train/reward")
        reward_mean = _mean(reward[0]) if reward else math.nan
        metrics["train/reward"] = reward_mean
        all_max, all_min = (
            self._recent("train/frac_reward_zero_std/all_max"),
            self._recent("train/frac_reward_zero_std/all_min"),
        )
        lo, hi = self.reward_range
        std = self._recent("train/reward_std")
        if all_max is not None and all_min is not None:  # exact: the module logs the split
            top, bottom = _mean(all_max[0]), _mean(all_min[0])
            metrics.update(
                {"train/frac_reward_zero_std/all_max": top, "train/frac_reward_zero_std/all_min": bottom}
            )
            kind = "constant" if min(top, bottom) >= 0.9 * frac else "easy" if top >= bottom else "hard"
            share = top if kind != "hard" else bottom
            outcome = "wrong" if kind == "hard" else "correct"
            split = f"{min(10, round(10 * share / frac))} of 10 such groups are all-{outcome}"
        elif std is not None and max(std[0]) <= 1e-9 and hi - lo <= 1e-6:
            kind, split = "constant", f"train/reward has been {_num(hi)} at every logged step so far"
        elif (
            0.0 <= lo
            and hi <= 1.0
            and math.isfinite(reward_mean)
            and (reward_mean >= 0.8 or reward_mean <= 0.2)
        ):
            kind = "easy" if reward_mean >= 0.8 else "hard"
            split = (
                f"train/reward is {_num(reward_mean)}, near the {'top' if kind == 'easy' else 'bottom'} of [0, 1], "
                f"so most such groups are likely all-{'correct' if kind == 'easy' else 'wrong'} (inferred from "
                "train/reward; train/frac_reward_zero_std/all_max|all_min would say exactly)"
            )
        else:
            kind = "mixed"
            split = (
                "whether they are all-correct or all-wrong is unknown "
                "(log train/frac_reward_zero_std/all_max|all_min)"
            )
        meaning = {
            "constant": "every completion gets the same score, so the reward function does not separate them "
            "(a constant reward, or a parse that always fails)",
            "easy": "the prompts are too easy",
            "hard": "the prompts are too hard for this model, or the reward function never pays",
            "mixed": "such groups have zero advantage and teach nothing",
        }[kind]
        action = {
            "constant": "check the reward function on a few completions by hand: "
            "better completions must score higher",
            "easy": f"harder prompts (drop the ones the model already solves), or {more}",
            "hard": f"easier prompts, check the reward function on a few completions by hand, or {more}",
            "mixed": f"{more}, or filter prompts whose groups all score the same",
        }[kind]
        summary = (
            f"{_pct(frac)} of groups have identical rewards (train/frac_reward_zero_std {_over(window)}, threshold "
            f"{_pct(self.t.zero_std_fraction)}); {split}: {meaning}"
        )
        return self._finding(
            "LPT101", step, summary, action, metrics, {"zero_std_fraction": self.t.zero_std_fraction}, window
        )

    def _reward_std_tiny(self, step, row):
        got = self._recent("train/reward_std")
        if got is None:
            return None
        std = _mean(got[0])
        zero = self._recent("train/frac_reward_zero_std")
        if not 0.0 < std < self.t.reward_std_floor or (zero and _mean(zero[0]) > self.t.zero_std_fraction):
            return None
        if self.context.get("scale_rewards") == "group":
            meaning = (
                "advantages are divided by this std, so differences this small become full-size advantages: "
                "the policy learns from noise"
            )
            action = (
                "set model.init_args.scale_rewards: batch (or none, Dr. GRPO), or make the reward separate "
                "completions by more"
            )
        else:
            meaning = "advantages are this small, so the policy gradient nearly vanishes"
            action = (
                "scale the reward up (model.init_args.reward_weights) or make it separate completions by more"
            )
        return self._finding(
            "LPT102",
            step,
            f"within-group reward std is {_num(std)} (train/reward_std {_over(got[1])}, threshold "
            f"{_num(self.t.reward_std_floor)}): {meaning}",
            action,
            {"train/reward_std": std},
            {"reward_std_floor": self.t.reward_std_floor},
            got[1],
        )

    def _entropy_collapse(self, step, row):
        if self._family() != "rl":
            return None  # SFT and DPO entropy falls by design
        got = self._early_recent("train/entropy")
        if got is None:
            return None
        early, recent, window = got
        e0, e1 = _median(early), _median(recent)
        if not (e1 < self.t.entropy_collapse_fraction * e0 or e1 < self.t.entropy_floor):
            return None
        eps_high, temperature = self.context.get("epsilon_high"), self.context.get("temperature")
        clip_higher = (
            "set model.init_args.epsilon_high: 0.28 (clip-higher, DAPO)"
            if eps_high is None
            else f"raise model.init_args.epsilon_high from {_num(eps_high)} to {_num(eps_high + 0.08)} (clip-higher, DAPO)"
        )
        hotter = (
            f"raise model.init_args.temperature from {_num(temperature)} to {_num(temperature + 0.2)}"
            if isinstance(temperature, (int, float))
            else "raise model.init_args.temperature"
        )
        return self._finding(
            "LPT103",
            step,
            f"train/entropy fell to {_num(e1)} (median {_over(window)}) from {_num(e0)} early in the run "
            f"({_pct(e1 / e0) if e0 > 0 else '-'} of it; thresholds {_pct(self.t.entropy_collapse_fraction)} of the "
            f"early value or {_num(self.t.entropy_floor)} nats): the policy is nearly deterministic, so groups stop "
            "exploring and their rewards stop varying",
            f"{clip_higher}, {hotter}, or {self._lr_action('lower', 0.5)}",
            {"train/entropy": e1, "train/entropy (early)": e0},
            {
                "entropy_collapse_fraction": self.t.entropy_collapse_fraction,
                "entropy_floor": self.t.entropy_floor,
            },
            window,
        )

    def _kl_spike(self, step, row):
        beta = self.context.get("beta")
        more_beta = (
            f"raise model.init_args.beta from {_num(beta)} to {_num(2 * beta)}"
            if isinstance(beta, (int, float)) and beta > 0
            else "raise model.init_args.beta"
        )
        return self._spike(
            "LPT104",
            "train/kl",
            step,
            self.t.kl_spike_factor,
            self.t.kl_spike_floor,
            "the policy moved abruptly away from the reference",
            f"{self._lr_action('lower', 0.5)}, or {more_beta} to hold the policy nearer the reference",
            {"kl_spike_factor": self.t.kl_spike_factor, "kl_spike_floor": self.t.kl_spike_floor},
        )

    def _clip_ratio_high(self, step, row):
        got = self._recent("train/clip_ratio/region_mean")
        if got is None:
            return None
        ratio = _mean(got[0])
        if not ratio > self.t.clip_ratio:
            return None
        iterations = self.context.get("num_iterations")
        fewer = (
            f", or lower model.init_args.num_iterations from {iterations} to {max(1, iterations // 2)}"
            if isinstance(iterations, int) and iterations > 1
            else ""
        )
        return self._finding(
            "LPT105",
            step,
            f"{_pct(ratio)} of tokens fall in the clipped region (train/clip_ratio/region_mean {_over(got[1])}, "
            f"threshold {_pct(self.t.clip_ratio)}): each update moves the policy too far from the one that sampled",
            f"{self._lr_action('lower', 0.5)}{fewer}",
            {"train/clip_ratio/region_mean": ratio},
            {"clip_ratio": self.t.clip_ratio},
            got[1],
        )

    def _sampler_mismatch(self, step, row):
        got = self._recent("train/sampling/logp_diff/mean")
        if got is None:
            return None
        if float(row.get("async/staleness/mean") or 0) > 0:  # asynchronous GRPO: the policy lag, by design
            return None
        diff = _median(got[0])
        if not diff > self.t.logp_diff:
            return None
        metrics = {"train/sampling/logp_diff/mean": diff}
        for name in ("train/sampling/importance_ratio/min", "train/sampling/importance_ratio/max"):
            if name in row:
                metrics[name] = row[name]
        dtype, correction = self.context.get("dtype"), self.context.get("vllm_importance_sampling_correction")
        action = (
            "check dtypes: run the rollout engine (VLLMRollout dtype) in the policy's compute dtype "
            f"(model.init_args.dtype: {dtype}, and trainer.precision)"
            + (
                "; turn on model.init_args.vllm_importance_sampling_correction: true"
                if correction is False
                else "; keep model.init_args.vllm_importance_sampling_correction on"
            )
        )
        return self._finding(
            "LPT106",
            step,
            f"the sampler's and the trainer's log-probs of the sampled tokens differ by {_num(diff)} nats per token "
            f"(train/sampling/logp_diff/mean, median {_over(got[1])}, threshold {_num(self.t.logp_diff)}): the "
            "samples are off-policy for the trainer, which destabilises the update",
            action,
            metrics,
            {"logp_diff": self.t.logp_diff},
            got[1],
        )

    def _truncation_heavy(self, step, row):
        got = self._recent("train/completions/clipped_ratio")
        if got is None:
            return None
        ratio = _mean(got[0])
        if not ratio > self.t.clipped_ratio:
            return None
        # the option the method has for its completion budget (TRL's names differ between methods)
        option = next(
            (name for name in ("max_completion_length", "max_new_tokens") if name in self.context),
            "max_completion_length",
        )
        length, masked = self.context.get(option), self.context.get("mask_truncated_completions")
        longer = (
            f"raise model.init_args.{option} from {length} to {2 * length}"
            if isinstance(length, int)
            else f"raise model.init_args.{option}"
        )
        limit = f" ({length} tokens)" if isinstance(length, int) else ""
        if masked:
            meaning, action = (
                "they are masked out of the loss (mask_truncated_completions), so they are wasted samples",
                longer,
            )
        else:
            meaning = "the loss is taken on unfinished answers and the model never sees how they end"
            action = longer
            if "mask_truncated_completions" in self.context:  # only where the method has the option (GRPO, RLOO)
                meaning = "the reward judges unfinished answers and the model never sees how they end"
                action += ", or set model.init_args.mask_truncated_completions: true (DAPO's overlong filtering)"
        metrics = {"train/completions/clipped_ratio": ratio}
        mean_length = self._recent("train/completions/mean_length")
        if mean_length:
            metrics["train/completions/mean_length"] = _mean(mean_length[0])
        return self._finding(
            "LPT107",
            step,
            f"{_pct(ratio)} of completions stop at max_completion_length{limit} without ending "
            f"(train/completions/clipped_ratio {_over(got[1])}, threshold {_pct(self.t.clipped_ratio)}): {meaning}",
            action,
            metrics,
            {"clipped_ratio": self.t.clipped_ratio},
            got[1],
        )

    def _length_hacking(self, step, row):
        lengths, rewards = (
            self._early_recent("train/completions/mean_length"),
            self._early_recent("train/reward"),
        )
        if lengths is None or rewards is None:
            return None
        growth = _median(lengths[1]) / max(_median(lengths[0]), 1e-9)
        rising = _mean(rewards[1]) > _mean(rewards[0])
        pairs = self._aligned("train/reward", "train/completions/mean_length")
        corr = _pearson(pairs)
        if not (rising and growth >= self.t.length_growth and corr > self.t.length_reward_correlation):
            return None
        return self._finding(
            "LPT108",
            step,
            f"train/reward ({_num(_mean(rewards[0]))} -> {_num(_mean(rewards[1]))}) and "
            f"train/completions/mean_length ({_num(_median(lengths[0]))} -> {_num(_median(lengths[1]))}, "
            f"x{growth:.2f}) rose together (correlation {corr:.2f} over the last {len(pairs)} logged steps; thresholds "
            f"x{_num(self.t.length_growth)} and {_num(self.t.length_reward_correlation)}): the policy may be earning "
            "reward by writing more rather than better",
            "read a few high-reward completions; if length is what pays, add a length penalty "
            "(lit_posttrain.rewards.SoftOverlongPunishment in model.init_args.reward_funcs) or use "
            "model.init_args.loss_type: dr_grpo",
            {
                "train/reward": _mean(rewards[1]),
                "train/completions/mean_length": _median(lengths[1]),
                "length growth": growth,
                "correlation": corr,
            },
            {
                "length_growth": self.t.length_growth,
                "length_reward_correlation": self.t.length_reward_correlation,
            },
            lengths[2],
        )

    def _aligned(self, a: str, b: str) -> list[tuple[float, float]]:
        sa, sb = self.series[a], self.series[b]
        values_b = dict(zip(sb.steps, sb.values))
        return [
            (va, values_b[s])
            for s, va in zip(sa.steps, sa.values)
            if s in values_b and math.isfinite(va) and math.isfinite(values_b[s])
        ]

    def _reward_fn_saturated(self, step, row):
        names = self._reward_funcs()
        if len(names) < 2:
            return None
        saturated, flat = [], []
        for name in names:
            mean, std = (
                self._early_recent(f"train/rewards/{name}/mean"),
                self._recent(f"train/rewards/{name}/std"),
            )
            if mean is None or std is None:
                return None
            early, recent = _mean(mean[0]), _mean(mean[1])
            spread = _mean(std[0][-len(mean[1]) :])
            if spread < self.t.reward_fn_saturated_std:
                saturated.append((name, recent, spread))
            elif abs(recent - early) < self.t.reward_fn_flat:
                flat.append((name, early, recent))
        if not saturated or not flat:
            return None
        (s_name, s_mean, s_std), (f_name, f_early, f_recent) = saturated[0], flat[0]
        weights = self.context.get("reward_weights")
        return self._finding(
            "LPT109",
            step,
            f"rewards/{s_name} is saturated (mean {_num(s_mean)}, std {_num(s_std)} over the last logged steps; "
            f"threshold std {_num(self.t.reward_fn_saturated_std)}) while rewards/{f_name} stays flat "
            f"({_num(f_early)} -> {_num(f_recent)}; threshold {_num(self.t.reward_fn_flat)}): {s_name} no longer "
            f"separates completions and {f_name}, the part not yet learned, is not improving",
            f"lower {s_name}'s weight in model.init_args.reward_weights (now {weights if weights else 'all 1.0'}), "
            f"or make {f_name} reachable (easier prompts, partial credit)",
            {
                f"train/rewards/{s_name}/mean": s_mean,
                f"train/rewards/{s_name}/std": s_std,
                f"train/rewards/{f_name}/mean": f_recent,
                f"train/rewards/{f_name}/mean (early)": f_early,
            },
            {
                "reward_fn_saturated_std": self.t.reward_fn_saturated_std,
                "reward_fn_flat": self.t.reward_fn_flat,
            },
            self._recent(f"train/rewards/{s_name}/mean")[1],
        )

    def _reward_none(self, step, row):
        worst = None  # (fraction, name, how, window)
        for name in self._reward_funcs():
            exact = self._recent(f"train/rewards/{name}/frac_none")
            if exact is not None:
                fraction, how, window = _mean(exact[0]), f"train/rewards/{name}/frac_none", exact[1]
            else:
                got = self._recent(f"train/rewards/{name}/mean")
                if got is None:
                    continue
                fraction = sum(math.isnan(v) for v in got[0]) / len(got[0])
                how, window = (
                    f"logged steps where train/rewards/{name}/mean is NaN (None for every sample)",
                    got[1],
                )
            if fraction > self.t.reward_none_fraction and (worst is None or fraction > worst[0]):
                worst = (fraction, name, how, window)
        if worst is None:
            return None
        fraction, name, how, window = worst
        exact = how.endswith("frac_none")
        return self._finding(
            "LPT110",
            step,
            f"{name} returned None for {_pct(fraction)} of {'samples' if exact else 'the logged steps'} ({how}, "
            f"{_over(window)}, threshold {_pct(self.t.reward_none_fraction)}): samples no function scores get "
            "advantage 0 and teach nothing"
            + ("" if exact else f"; train/rewards/{name}/frac_none would show partial None rates"),
            f"check that {name} receives the dataset columns it needs (e.g. answer) and parses this model's "
            "completions (None means 'does not apply')",
            {how if exact else f"train/rewards/{name}/mean is NaN (fraction of steps)": fraction},
            {"reward_none_fraction": self.t.reward_none_fraction},
            window,
        )

    def _reward_plateau(self, step, row):
        series = self.series["train/reward"]
        std = self._recent("train/reward_std")
        if series.count < 2 * self.window or std is None:
            return None
        values = [v for v in list(series.values)[-2 * self.window :]]
        before, recent = _mean(values[: self.window]), _mean(values[self.window :])
        spread = _mean(std[0])
        zero = self._recent("train/frac_reward_zero_std")
        if spread < self.t.reward_std_floor or (zero and _mean(zero[0]) > self.t.zero_std_fraction):
            return None  # LPT101 / LPT102 say why
        if not abs(recent - before) < self.t.reward_plateau_fraction * spread:
            return None
        g = self.context.get("num_generations")
        more = (
            f"model.init_args.num_generations from {g} to {2 * g}"
            if isinstance(g, int)
            else "model.init_args.num_generations"
        )
        window = {"values": self.window, "first_step": list(series.steps)[-self.window], "last_step": step}
        return self._finding(
            "LPT111",
            step,
            f"train/reward moved from {_num(before)} to {_num(recent)} between the previous and the last "
            f"{self.window} logged steps, less than {_pct(self.t.reward_plateau_fraction)} of the within-group "
            f"spread (train/reward_std {_num(spread)}): groups still differ but the policy stopped improving",
            f"{self._lr_action('raise', 2.0)}, or raise {more} for more signal per prompt; if val/reward is flat "
            "too, the task may be out of reach for this model",
            {"train/reward": recent, "train/reward (previous window)": before, "train/reward_std": spread},
            {"reward_plateau_fraction": self.t.reward_plateau_fraction},
            window,
        )

    # ------------------------------------------------------------------ preference, reward modeling
    def _accuracy_names(self) -> tuple[str, str]:
        if "train/rewards/accuracies" in self.series:
            return "train/rewards/accuracies", "val/rewards/accuracies"
        return "train/accuracy", "val/accuracy"

    def _preference_saturation(self, step, row):
        train_name, val_name = self._accuracy_names()
        acc, loss, val = self._recent(train_name), self._recent("train/loss"), self._latest(val_name)
        if acc is None or loss is None or val is None:
            return None
        accuracy, train_loss = _mean(acc[0]), _mean(loss[0])
        gap = accuracy - val
        if not (
            accuracy >= self.t.saturation_accuracy
            and train_loss < self.t.saturation_loss
            and gap >= self.t.saturation_val_gap
        ):
            return None
        if train_name == "train/rewards/accuracies":
            beta = self.context.get("beta")
            stronger = (
                f"raise model.init_args.beta from {_num(beta)} to {_num(2 * beta)}"
                if isinstance(beta, (int, float))
                else "raise model.init_args.beta"
            )
            regularise = f"{stronger} (or model.init_args.loss_type: ipo)"
        else:
            regularise = "set model.init_args.center_rewards_coefficient: 0.01"
        return self._finding(
            "LPT201",
            step,
            f"{train_name} is {_pct(accuracy)} and train/loss {_num(train_loss)} ({_over(acc[1])}; thresholds "
            f"{_pct(self.t.saturation_accuracy)} and {_num(self.t.saturation_loss)}) while {val_name} is "
            f"{_pct(val)} (gap {_pct(gap)}, threshold {_pct(self.t.saturation_val_gap)}): the model separates the "
            "training pairs perfectly but does not generalise; further steps only grow the margins",
            f"stop earlier (trainer.max_steps, or keep the best checkpoint on val/loss), "
            f"{self._lr_action('lower', 1 / 3)}, or {regularise}",
            {train_name: accuracy, "train/loss": train_loss, val_name: val},
            {
                "saturation_accuracy": self.t.saturation_accuracy,
                "saturation_loss": self.t.saturation_loss,
                "saturation_val_gap": self.t.saturation_val_gap,
            },
            acc[1],
        )

    def _likelihood_displacement(self, step, row):
        chosen, margins = (
            self._early_recent("train/logps/chosen"),
            self._early_recent("train/rewards/margins"),
        )
        if chosen is None or margins is None:
            return None
        c0, c1 = _mean(chosen[0]), _mean(chosen[1])
        m0, m1 = _mean(margins[0]), _mean(margins[1])
        drop = c0 - c1
        needed = max(self.t.displacement_min_nats, self.t.displacement_fraction * abs(c0))
        if not (drop > needed and m1 > m0):
            return None
        loss_type, weights = self.context.get("loss_type"), self.context.get("loss_weights")
        types = loss_type if isinstance(loss_type, list) else [loss_type or "sigmoid"]
        if "sft" in types:
            i = types.index("sft")
            w = float(weights[i]) if isinstance(weights, list) else 1.0
            action = f"raise the sft weight in model.init_args.loss_weights from {w!r} to {2 * w!r}"
        else:
            new_types = ", ".join([*types, "sft"])
            old_weights = weights if isinstance(weights, list) else [1.0] * len(types)
            new_weights = ", ".join(repr(float(w)) for w in [*old_weights, 1.0])
            action = (
                f"add an SFT term on the chosen responses: model.init_args.loss_type: [{new_types}] with "
                f"model.init_args.loss_weights: [{new_weights}] (RPO, arXiv 2404.19733)"
            )
        return self._finding(
            "LPT202",
            step,
            f"train/logps/chosen fell from {_num(c0)} to {_num(c1)} ({_num(-drop)} nats; threshold "
            f"{_num(needed)}) while train/rewards/margins rose from {_num(m0)} to {_num(m1)} (means of the first and "
            f"the last {chosen[2]['values']} logged steps): the chosen responses become less likely even as the "
            "pairs separate (likelihood displacement)",
            action,
            {
                "train/logps/chosen": c1,
                "train/logps/chosen (early)": c0,
                "train/rewards/margins": m1,
                "train/rewards/margins (early)": m0,
            },
            {
                "displacement_fraction": self.t.displacement_fraction,
                "displacement_min_nats": self.t.displacement_min_nats,
            },
            chosen[2],
        )

    def _accuracy_at_chance(self, step, row):
        train_name, _ = self._accuracy_names()
        series = self.series[train_name]
        got = self._recent(train_name)
        if got is None or series.count <= self.window:
            return None  # the first window is warm-up (DPO starts at 0: ties are not wins)
        accuracy = _mean(got[0])
        if accuracy > 0.5 + self.t.chance_margin:
            return None
        below = accuracy < 0.5 - self.t.chance_margin
        beta = self.context.get("beta")
        if train_name == "train/rewards/accuracies":
            stronger = (
                f", or raise model.init_args.beta from {_num(beta)} to {_num(2 * beta)}"
                if isinstance(beta, (int, float))
                else ""
            )
        else:
            stronger = ""
        meaning = (
            "the model prefers the rejected responses: are chosen and rejected swapped in the data?"
            if below
            else "the model does not learn the preference"
        )
        return self._finding(
            "LPT203",
            step,
            f"{train_name} is {_pct(accuracy)} ({_over(got[1])}, after {series.count} logged steps; chance is 50%, "
            f"margin {_pct(self.t.chance_margin)}): {meaning}",
            (
                "check that the chosen and rejected columns are not swapped"
                if below
                else f"{self._lr_action('raise', 3.0)}{stronger}; check that chosen and rejected differ in the data"
            ),
            {train_name: accuracy},
            {"chance_margin": self.t.chance_margin},
            got[1],
        )

    # ------------------------------------------------------------------ SFT, and val/loss of every method
    def _loss_plateau(self, step, row):
        if self._family() != "sft":
            return None
        series = self.series["train/loss"]
        if series.count < 2 * self.window:
            return None
        values = [v for v in list(series.values)[-2 * self.window :]]
        before, recent = _mean(values[: self.window]), _mean(values[self.window :])
        decrease = (before - recent) / max(abs(before), 1e-12)
        if not decrease < self.t.loss_plateau_fraction:
            return None
        lrs = self.series.get("diagnostics/lr")
        peak = max([*lrs.early, *lrs.values]) if lrs else 0.0  # the run's first and latest rates
        if peak > 0 and lrs.values[-1] < self.t.loss_plateau_lr_fraction * peak:
            return None  # the schedule has decayed the rate: a flat loss is its end, not a stall
        window = {"values": self.window, "first_step": list(series.steps)[-self.window], "last_step": step}
        return self._finding(
            "LPT301",
            step,
            f"train/loss went from {_num(before)} to {_num(recent)} between the previous and the last {self.window} "
            f"logged steps ({_pct(decrease)} lower; threshold {_pct(self.t.loss_plateau_fraction)}): training has "
            "stopped improving",
            f"if val/loss is flat too, stop here (trainer.max_steps); otherwise {self._lr_action('raise', 2.0)} or "
            "decay it with model.init_args.lr_scheduler",
            {"train/loss": recent, "train/loss (previous window)": before},
            {"loss_plateau_fraction": self.t.loss_plateau_fraction},
            window,
        )

    def _train_val_gap(self, step, row):
        n = self.t.val_rises + 1
        points = self.val_points[-n:]
        if len(points) < n:
            return None
        vals, trains = [p[1] for p in points], [p[2] for p in points]
        rising = all(b > a for a, b in itertools.pairwise(vals))
        gaps = [v - t for v, t in zip(vals, trains)]
        if not (rising and trains[-1] < trains[0] and gaps[-1] > gaps[0]):
            return None
        arrow = lambda xs: " -> ".join(_num(x) for x in xs)
        return self._finding(
            "LPT302",
            step,
            f"val/loss rose at the last {self.t.val_rises} evaluations ({arrow(vals)}) while train/loss fell "
            f"({arrow(trains)}): the train/val gap grew from {_num(gaps[0])} to {_num(gaps[-1])}; the model "
            "memorises the training data",
            "keep the best checkpoint (ModelCheckpoint(monitor='val/loss')), train fewer steps (trainer.max_steps), "
            f"{self._lr_action('lower', 0.5)}, or add data",
            {"val/loss": vals[-1], "train/loss": trains[-1], "gap": gaps[-1], "gap (first)": gaps[0]},
            {"val_rises": self.t.val_rises},
            {"values": n, "first_step": points[0][0], "last_step": points[-1][0]},
        )

    def _truncated_rows(self, step, row):
        if self._family() != "sft":
            return None
        exact = "train/frac_truncated" in self.series
        name = "train/frac_truncated" if exact else "diagnostics/frac_rows_at_max_length"
        if not exact and self.context.get("packing"):
            return None  # packed rows fill max_length by design
        got = self._recent(name)
        if got is None:
            return None
        fraction = _mean(got[0])
        if not fraction > self.t.truncated_rows_fraction:
            return None
        length = self.context.get("max_length")
        what = "" if exact else ", rows that reach max_length: truncated ones and exact fits"
        return self._finding(
            "LPT303",
            step,
            f"{_pct(fraction)} of rows are cut at max_length{f' ({length} tokens)' if length else ''} ({name} "
            f"{_over(got[1])}{what}; threshold {_pct(self.t.truncated_rows_fraction)}): truncation keeps the start, "
            "so their ends (often the answer) are never trained",
            f"raise data.init_args.max_length from {length} to {2 * length}"
            if isinstance(length, int)
            else "raise data.init_args.max_length",
            {name: fraction},
            {"truncated_rows_fraction": self.t.truncated_rows_fraction},
            got[1],
        )

    def _padding_heavy(self, step, row):
        if self._family() != "sft" or self.context.get("packing"):
            return None
        got = self._recent("diagnostics/padding_fraction")
        if got is None:
            return None
        fraction = _mean(got[0])
        if not fraction > self.t.padding_fraction:
            return None
        return self._finding(
            "LPT304",
            step,
            f"{_pct(fraction)} of batch positions are padding (diagnostics/padding_fraction {_over(got[1])}, "
            f"threshold {_pct(self.t.padding_fraction)}): most of the compute goes to pad tokens",
            "set data.init_args.packing: bfd (best-fit packing, attention stays within each sequence)",
            {"diagnostics/padding_fraction": fraction},
            {"padding_fraction": self.t.padding_fraction},
            got[1],
        )

    def _empty_loss_rows(self, step, row):
        if self._family() != "sft":
            return None
        got = self._recent("diagnostics/frac_rows_no_loss_tokens")
        if got is None:
            return None
        fraction = _mean(got[0])
        if not fraction > self.t.empty_rows_fraction:
            return None
        length = self.context.get("max_length")
        return self._finding(
            "LPT305",
            step,
            f"{_pct(fraction)} of rows have no trained token, every label is -100 "
            f"(diagnostics/frac_rows_no_loss_tokens {_over(got[1])}, threshold {_pct(self.t.empty_rows_fraction)}): "
            "the prompt fills max_length so the completion is cut away, or the assistant mask is empty",
            (
                f"raise data.init_args.max_length from {length} to {2 * length}"
                if isinstance(length, int)
                else "raise data.init_args.max_length"
            )
            + "; with assistant_only_loss check that the chat template marks assistant turns ({% generation %})",
            {"diagnostics/frac_rows_no_loss_tokens": fraction},
            {"empty_rows_fraction": self.t.empty_rows_fraction},
            got[1],
        )


# ---------------------------------------------------------------------- context, files, the command
def run_context(hparams: Mapping, precision: object = None) -> dict:
    """The options checks and actions read: plain values of the (module + DataModule) hparams, and precision."""
    # tuples as lists: what hparams.yaml gives back offline
    context = {k: list(v) if isinstance(v, tuple) else v for k, v in hparams.items() if _plain(v)}
    context["precision"] = None if precision is None else str(precision)
    return context


def read_metrics_csv(path: str | Path) -> Iterator[tuple[int, dict[str, float]]]:
    """Rows of a CSVLogger ``metrics.csv``: (step, metric name -> value), empty cells left out."""
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            metrics = {}
            for name, value in row.items():
                if value in ("", None):
                    continue
                try:
                    metrics[name] = float(value)
                except ValueError:
                    continue  # a non-numeric column is not a metric
            yield step, metrics


def find_metrics_csv(path: str | Path) -> Path:
    """RUN_DIR (a CSVLogger version directory, or any directory above one) or a metrics.csv -> the file."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    found = sorted(path.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv in {path} (diagnose reads the CSVLogger's metrics.csv)")
    return found[-1]  # the latest version


def load_context(metrics_csv: Path) -> dict:
    """The run's context from the files beside metrics.csv: hparams.yaml (CSVLogger) and config.yaml (LightningCLI)."""
    hparams, precision = {}, None
    if (metrics_csv.parent / "hparams.yaml").is_file():
        hparams = _load_yaml(metrics_csv.parent / "hparams.yaml") or {}
    if (metrics_csv.parent / "config.yaml").is_file():
        config = _load_yaml(metrics_csv.parent / "config.yaml") or {}
        precision = (config.get("trainer") or {}).get("precision")
    return run_context(hparams, precision)


def diagnose_file(
    metrics_csv: str | Path,
    *,
    context: Mapping | None = None,
    window: int = 20,
    remind_every: int = 50,
    thresholds: Mapping[str, float] | None = None,
) -> Diagnoser:
    """Run the heuristics over a metrics.csv, as the live callback would have; -> the fed `Diagnoser`.

    ``context`` defaults to `load_context` (hparams.yaml and config.yaml beside the file).
    """
    metrics_csv = Path(metrics_csv)
    context = load_context(metrics_csv) if context is None else context
    diagnoser = Diagnoser(context, window=window, remind_every=remind_every, thresholds=thresholds)
    for step, metrics in read_metrics_csv(metrics_csv):
        diagnoser.update(step, metrics)
    return diagnoser


def main(argv: list[str] | None = None) -> int:
    """``lit-posttrain diagnose RUN_DIR``: print the findings; exit code 1 if any is an error."""
    parser = argparse.ArgumentParser(
        prog="lit-posttrain diagnose",
        description="Run the training-health heuristics of TrainingDiagnostics over a run's logged metrics "
        "(CSVLogger metrics.csv). Exit code 1 if any finding is an error.",
    )
    parser.add_argument("run", help="a CSVLogger log directory (or a directory above it) or a metrics.csv")
    parser.add_argument("--window", type=int, default=20, help="logged steps per window (default 20)")
    parser.add_argument(
        "--remind-every", type=int, default=50, help="repeat a persisting finding every N steps"
    )
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a threshold (see docs/diagnostics.md), e.g. zero_std_fraction=0.7; repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON records instead of the lines")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.threshold:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--threshold takes NAME=VALUE, got {item!r}")
        overrides[name] = float(value)
    try:
        metrics_csv = find_metrics_csv(args.run)
        diagnoser = diagnose_file(
            metrics_csv, window=args.window, remind_every=args.remind_every, thresholds=overrides
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"{PREFIX} diagnose {metrics_csv}", file=sys.stderr)
    for event in diagnoser.events:
        print(json.dumps(event.to_json()) if args.json else event.line())
    if not args.json:
        print(diagnoser.summary())
    return 1 if diagnoser.has_error else 0


# ---------------------------------------------------------------------- small helpers
def _is_input(name: str) -> bool:
    """Metrics the checks read: not the step/epoch counters, not the diagnostics/<code> counts we log."""
    if name in ("step", "epoch"):
        return False
    return not (name.startswith("diagnostics/LPT") and name[len("diagnostics/") :] in CODES)


def _is_reward_fn_mean(name: str) -> bool:
    return name.startswith("train/rewards/") and name.endswith("/mean") and name.count("/") == 3


def _is_fp16(context: Mapping) -> bool:
    return str(context.get("precision")).startswith("16")


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in value
    )


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _pearson(pairs: list[tuple[float, float]]) -> float:
    if len(pairs) < 3:
        return math.nan
    xs, ys = zip(*pairs)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _pct(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else str(x)


def _num(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _over(window: dict) -> str:
    """'over the last 20 steps' when every step was logged, else 'over the last 20 logged steps (steps 10-200)'."""
    n, first, last = window["values"], window["first_step"], window["last_step"]
    if last - first + 1 == n:
        return f"over the last {n} steps"
    return f"over the last {n} logged steps (steps {first}-{last})"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": JSON has no such numbers
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class _Loader(yaml.SafeLoader):
    """safe_load that reads Python-tagged values (tuples, objects Lightning dumped) as plain data or None."""


def _construct_tagged(loader, suffix, node):
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return None  # an object: not a plain option
    return loader.construct_scalar(node)


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", _construct_tagged)
_Loader.add_multi_constructor("!", _construct_tagged)


def _load_yaml(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


if __name__ == "__main__":
    sys.exit(main())
