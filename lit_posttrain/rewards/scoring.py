"""Calling reward functions: one place that turns their outputs into a (N, F) tensor and their
failures into errors that name the function and the sample.

Semantics (TRL's): a function returns one value per completion; ``None`` means "this function does
not apply to this sample" and becomes NaN. A float NaN is treated the same way, but as it usually
signals a bug it is also reported: a warning (once per function and process) that names the
function, how many samples, and the first such sample's index and prompt. The method combines the
columns with ``nansum`` and treats a sample where every function is NaN as unscorable.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Callable, Sequence

import torch

_WARNED_NAN: set[str] = set()


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something that is not one number (or None) per sample."""


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
) -> torch.Tensor:
    """Call every reward function on the batch.

    Each is called as ``f(prompts, completions, completion_ids=completion_ids, **columns)``, so it
    should accept ``**kwargs`` for the keywords it does not use.

    Args:
        prompts: one prompt per completion (string or messages), as in the dataset.
        completions: strings, or ``[{"role": "assistant", "content": ...}]`` for conversational data.
        completion_ids: the completions' token ids (e.g. for length penalties).
        columns: the other dataset columns, one value per completion.
    Returns:
        (N, F) float32 rewards, NaN where a function returned None (or NaN).
    Raises:
        RewardFunctionError: naming the function and, when one sample alone makes it fail, that
            sample's index and prompt.
    """
    num_samples = len(completions)
    rewards = torch.full((num_samples, len(reward_funcs)), float("nan"))
    for j, reward_func in enumerate(reward_funcs):
        name = reward_func_name(reward_func)
        try:
            values = reward_func(prompts, completions, completion_ids=completion_ids, **columns)
        except Exception as err:
            where = _first_failing_sample(reward_func, prompts, completions, completion_ids, columns)
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
    return rewards


def _first_failing_sample(reward_func, prompts, completions, completion_ids, columns) -> str:
    """Re-run the function one sample at a time to find the first sample that makes it fail."""
    for i in range(len(completions)):
        try:
            reward_func(
                [prompts[i]],
                [completions[i]],
                completion_ids=[completion_ids[i]],
                **{key: [values[i]] for key, values in columns.items()},
            )
        except Exception:
            return f"sample {i} of the batch, prompt {_show(prompts[i])}, completion {_show(completions[i])}"
    return f"on the batch of {len(completions)} samples; no single sample fails alone"


def _show(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
