"""Format and length rewards: think tags, pattern coverage (partial credit), DAPO's overlong penalty.

Callable classes (`PatternFractionReward`, `SoftOverlongPunishment`) carry their settings, so a
YAML config builds them with ``class_path`` / ``init_args`` inside ``reward_funcs``.
"""

from __future__ import annotations

import re


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the contents of its messages joined."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


_THINK_RE = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL)


def think_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion opens with one ``<think>...</think>`` block (R1 format), else 0.0.

    The completion must start with ``<think>``, close it with ``</think>`` and open no second
    ``<think>``; anything may follow the block (TRL's ``think_format_reward``).
    """
    return [1.0 if _THINK_RE.match(completion_text(c)) else 0.0 for c in completions]


class PatternFractionReward:
    """Partial credit: the fraction of a completion's characters covered by matches of a regex.

    ``reward = (characters inside non-overlapping matches of pattern) / len(completion)``, 0.0 for
    an empty completion. With ``pattern="[0-9]"`` this is the fraction of digits, a verifiable
    reward that a randomly initialised model can climb step by step (the quickstarts use it).

    Args:
        pattern: a Python regular expression (matched with ``re.finditer``); ignored for samples
            where ``column`` is set.
        column: take each sample's pattern from this dataset column instead (per-prompt targets).
    """

    def __init__(self, pattern: str | None = None, column: str | None = None):
        if (pattern is None) == (column is None):
            raise ValueError("PatternFractionReward: give exactly one of 'pattern' or 'column'")
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.column = column

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if self.column is not None and self.column not in kwargs:
            raise ValueError(f"PatternFractionReward: the dataset has no column {self.column!r}")
        patterns = (
            [re.compile(p) for p in kwargs[self.column]] if self.column else [self.pattern] * len(completions)
        )
        rewards = []
        for completion, pattern in zip(completions, patterns, strict=True):
            text = completion_text(completion)
            covered = sum(m.end() - m.start() for m in pattern.finditer(text))
            rewards.append(covered / len(text) if text else 0.0)
        return rewards


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), on completion length in tokens.

    With ``L = len(completion_ids)``, ``L_max = max_completion_length`` and ``L_cache = soft_punish_cache``::

        0                                   if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
        -1                                  if L > L_max

    Set ``max_completion_length`` to the method's ``max_completion_length`` (DAPO: 20480 with a
    4096-token cache). Needs the ``completion_ids`` keyword, which the online methods pass.

    Args:
        max_completion_length: ``L_max`` in tokens.
        soft_punish_cache: ``L_cache``, the length of the linear penalty ramp before ``L_max``.
    """

    def __init__(self, max_completion_length: int, soft_punish_cache: int):
        if not 0 < soft_punish_cache <= max_completion_length:
            raise ValueError(
                f"SoftOverlongPunishment: need 0 < soft_punish_cache <= max_completion_length, got "
                f"soft_punish_cache={soft_punish_cache}, max_completion_length={max_completion_length}"
            )
        self.max_completion_length = max_completion_length
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        start = self.max_completion_length - self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= start:
                rewards.append(0.0)
            elif length <= self.max_completion_length:
                rewards.append((start - length) / self.soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards
