"""Calling reward functions: one place that turns their outputs into a (N, F) tensor and their
failures into errors that name the function and the sample.

Calling convention (TRL's, so reward functions move between the libraries unchanged): every
function is called with keywords only,

    f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **dataset_columns)

so ``def f(completions, **kwargs)`` and ``def f(completions, answer, **kwargs)`` both work.
`check_reward_funcs` checks every signature against those keywords before training starts and names
the function and the parameter it cannot be given.

Semantics (TRL's): a function returns one value per completion; ``None`` means "this function does
not apply to this sample" and becomes NaN. A float NaN is treated the same way, but as it usually
signals a bug it is also reported: a warning (once per function and process) that names the
function, how many samples, and the first such sample's index and prompt. The method combines the
columns with ``nansum`` and treats a sample where every function is NaN as unscorable.

Guards (departures from TRL, which trains on them silently): a value that is infinite or larger in
magnitude than ``MAX_REWARD`` (1e15) is an error naming the function and sample (TRL turns it into
NaN advantages); a batch where no function scored any sample warns that it carries no signal.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_WARNED_NAN: set[str] = set()


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something that is not one number (or None) per sample."""


@dataclass(frozen=True)
class TrainerState:
    """What a reward function may read of the training progress (``trainer_state=``), with the
    field names of TRL's ``TrainerState``: ``global_step`` (optimizer steps so far), ``epoch``,
    ``max_steps`` (-1 when the run is bounded by epochs)."""

    global_step: int = 0
    epoch: int = 0
    max_steps: int = -1


# the keywords every reward function is called with, besides the dataset's columns
REWARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state")


MAX_REWARD = 1e15  # larger magnitudes overflow float32 once squared (group std), turning advantages into NaN


def check_reward_funcs(reward_funcs: Sequence[Callable], columns: Sequence[str] | None = None) -> None:
    """Check that every reward function can be called with the keywords `score_completions` passes.

    ``columns`` are the dataset's extra columns (passed as keywords too); None when they are not
    known yet (then only what does not depend on them is checked).

    Raises:
        TypeError: naming the function and the parameter: one that is positional-only, a required
            one no keyword fills, or (for a function without ``**kwargs``) a keyword it would be
            given but does not take.
    """
    for reward_func in reward_funcs:
        name = reward_func_name(reward_func)
        try:
            parameters = inspect.signature(reward_func).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            continue
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
        names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        given = set(REWARD_KEYWORDS) | set(columns or ())
        for p in parameters:
            if p.kind is p.POSITIONAL_ONLY:
                raise TypeError(
                    f"reward function {name!r}: parameter {p.name!r} is positional-only, but reward functions are "
                    f"called with keywords ({', '.join(REWARD_KEYWORDS)}, and every dataset column)"
                )
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                if p.name not in given and columns is not None:
                    raise TypeError(
                        f"reward function {name!r} needs parameter {p.name!r}, which no keyword fills: it is called "
                        f"with {', '.join(REWARD_KEYWORDS)} and the dataset columns "
                        f"({', '.join(columns) or 'none'}); give it a default or add the column to the data"
                    )
        if not takes_any:
            extra = sorted((set(REWARD_KEYWORDS) if columns is None else given) - names)
            if extra:
                raise TypeError(
                    f"reward function {name!r} does not take {', '.join(repr(e) for e in extra)}: it is called "
                    f"with keywords ({', '.join(REWARD_KEYWORDS)}, and every dataset column); add **kwargs to its "
                    "parameters"
                )


def reward_func_name(reward_func: Callable) -> str:
    """The name metrics use: a function's ``__name__``, else the class name of a callable object."""
    if isinstance(reward_func, functools.partial):
        return reward_func_name(reward_func.func)
    if isinstance(reward_func, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return reward_func.__name__
    return type(reward_func).__name__


def score_completions(
    reward_funcs: Sequence[Callable],
    prompts: list,
    completions: list,
    *,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    trainer_state: TrainerState | None = None,
) -> torch.Tensor:
    """Call every reward function on the batch.

    Each is called with keywords only, as TRL does: ``f(prompts=prompts, completions=completions,
    completion_ids=completion_ids, trainer_state=trainer_state, **columns)``, so it should accept
    ``**kwargs`` for the keywords it does not use.

    Args:
        prompts: one prompt per completion (string or messages), as in the dataset.
        completions: strings, or ``[{"role": "assistant", "content": ...}]`` for conversational data.
        completion_ids: the completions' token ids (e.g. for length penalties).
        columns: the other dataset columns, one value per completion.
        trainer_state: the training progress (`TrainerState`); a default one when None.
    Returns:
        (N, F) float32 rewards, NaN where a function returned None (or NaN).
    Raises:
        RewardFunctionError: naming the function and, when one sample alone makes it fail, that
            sample's index and prompt.
    """
    num_samples = len(completions)
    keywords = {"completion_ids": completion_ids, "trainer_state": trainer_state or TrainerState(), **columns}
    rewards = torch.full((num_samples, len(reward_funcs)), float("nan"))
    for j, reward_func in enumerate(reward_funcs):
        name = reward_func_name(reward_func)
        try:
            values = reward_func(prompts=prompts, completions=completions, **keywords)
        except Exception as err:
            where = _first_failing_sample(reward_func, prompts, completions, keywords)
            raise RewardFunctionError(
                f"reward function {name!r} raised {type(err).__name__}: {err} ({where})"
            ) from err
        if isinstance(values, torch.Tensor):
            values = values.detach().float().cpu().flatten().tolist()
        if not isinstance(values, (list, tuple)) or len(values) != num_samples:
            raise RewardFunctionError(
                f"reward function {name!r} must return a list of {num_samples} values (one per completion), "
                f"got {type(values).__name__}{f' of length {len(values)}' if isinstance(values, (list, tuple)) else ''}"
            )
        nan_samples = []
        for i, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, (str, bytes)):
                raise RewardFunctionError(
                    f"reward function {name!r} returned {value!r} for sample {i} (prompt {_show(prompts[i])}); "
                    "expected a number or None"
                )
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                raise RewardFunctionError(
                    f"reward function {name!r} returned {value!r} for sample {i} (prompt {_show(prompts[i])}); "
                    "expected a number or None"
                ) from err
            if math.isnan(value):
                nan_samples.append(i)
            elif not abs(value) <= MAX_REWARD:
                raise RewardFunctionError(
                    f"reward function {name!r} returned {value!r} for sample {i} (prompt {_show(prompts[i])}); "
                    f"rewards must be finite numbers within +-{MAX_REWARD:g} (their group variance must stay "
                    "representable in float32), or None where the function does not apply"
                )
            else:
                rewards[i, j] = value
        if nan_samples and name not in _WARNED_NAN:
            _WARNED_NAN.add(name)
            first = nan_samples[0]
            warnings.warn(
                f"reward function {name!r} returned NaN for {len(nan_samples)} of {num_samples} samples (first: "
                f"sample {first}, prompt {_show(prompts[first])}); NaN is treated like None (the function does not "
                "apply to that sample). Return None explicitly to silence this warning.",
                stacklevel=2,
            )
    if num_samples and rewards.isnan().all():
        warnings.warn(
            f"no reward function scored any of the {num_samples} samples of this batch (all returned None or "
            "NaN): the batch carries no learning signal. Check that the functions apply to this data.",
            stacklevel=2,
        )
    return rewards


def _first_failing_sample(reward_func, prompts, completions, keywords: dict) -> str:
    """Re-run the function one sample at a time to find the first sample that makes it fail."""
    for i in range(len(completions)):
        try:
            reward_func(
                prompts=[prompts[i]],
                completions=[completions[i]],
                **{key: value if key == "trainer_state" else [value[i]] for key, value in keywords.items()},
            )
        except Exception:
            return f"sample {i} of the batch, prompt {_show(prompts[i])}, completion {_show(completions[i])}"
    return f"on the batch of {len(completions)} samples; no single sample fails alone"


def _show(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
