"""Built-in reward functions and the scoring wrapper (lit_posttrain.rewards)."""

import warnings

import pytest
import torch

from helpers.trl_rewards import reward_func, reward_len  # verbatim from TRL's GRPO documentation
from lit_posttrain.rewards import (
    PatternFractionReward,
    RewardFunctionError,
    SoftOverlongPunishment,
    TrainerState,
    accuracy_reward,
    check_reward_funcs,
    reward_func_name,
    score_completions,
    think_format_reward,
)


@pytest.mark.parametrize(
    "completion, reference",
    [
        ("The answer is 72.", "72"),  # trailing period and text before
        (
            "Natalia sold 48 + 24 = 72 clips. #### 72",
            "Natalia sold 48/2 = 24 clips...\n#### 72",
        ),  # GSM8K marker
        ("so the total is \\boxed{1,234}", "1234"),  # thousands separator inside \boxed
        ("1234", "1,234"),
        ("The answer is 1{,}000 meters", "1000"),  # LaTeX thousands separator, units after
        ("We get 0.5", "\\frac{1}{2}"),  # decimal vs LaTeX fraction
        ("Answer: 3/4 of the cake", "0.75"),  # plain fraction vs decimal
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
        ("It costs $72.00 in total", "72"),  # currency and trailing zeros
        ("First 5, then 7", "7"),  # no marker: the last number
        ("The answer is 42 apples. Then I ate 3.", "42"),  # "answer is" beats the last number
        ("-5", "−5"),  # unicode minus
        ("\\boxed{x^2+1}", "x^2 + 1"),  # non-numeric: normalised text
    ],
)
def test_accuracy_reward_matches_formatted_answers(completion, reference):
    """Equal answers in different formats score 1.0."""
    assert accuracy_reward(["q"], [completion], answer=[reference]) == [1.0]


@pytest.mark.parametrize(
    "completion, reference",
    [("The answer is 71", "72"), ("no number here", "72"), ("\\boxed{0.33}", "\\frac{1}{3}"), ("12", "1,2")],
)
def test_accuracy_reward_rejects_wrong_answers(completion, reference):
    """Different values (or no answer at all) score 0.0."""
    assert accuracy_reward(["q"], [completion], answer=[reference]) == [0.0]


def test_accuracy_reward_columns_and_messages():
    """Reads `solution` when there is no `answer`, message completions, and None for an empty reference."""
    completions = [[{"role": "assistant", "content": "The answer is 9"}], "9", "9"]
    assert accuracy_reward(["q"] * 3, completions, solution=["9", "", None]) == [1.0, None, None]
    with pytest.raises(ValueError, match="'answer' or 'solution'"):
        accuracy_reward(["q"], ["9"])


def test_think_format_reward():
    """One leading <think>...</think> block scores 1.0; anything else 0.0; messages work too."""
    completions = [
        "<think>\nadd them\n</think>\nThe answer is 4",
        "<think>ok</think>",
        "The answer is 4",  # no think block
        "Sure. <think>late</think>",  # does not start with it
        "<think>a</think><think>b</think>",  # a second <think>
        "<think>never closed",
        [{"role": "assistant", "content": "<think>x</think> 4"}],
    ]
    assert think_format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_soft_overlong_punishment_by_hand():
    """L_max=10, L_cache=4: 0 up to 6 tokens, then -(L-6)/4 down to -1 at 10, -1 beyond."""
    reward = SoftOverlongPunishment(max_completion_length=10, soft_punish_cache=4)
    lengths = [3, 6, 7, 8, 10, 11]
    ids = [[5] * n for n in lengths]
    assert reward(None, ["x"] * len(ids), completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        SoftOverlongPunishment(max_completion_length=4, soft_punish_cache=8)


def test_pattern_fraction_reward_by_hand():
    """Fraction of characters inside matches: '12ab' has 2 of 4 digits; empty completions score 0."""
    digits = PatternFractionReward(pattern="[0-9]")
    assert digits(None, ["12ab", "1234", "abcd", "", [{"role": "assistant", "content": "7a"}]]) == [
        0.5,
        1.0,
        0.0,
        0.0,
        0.5,
    ]
    per_row = PatternFractionReward(column="target")
    assert per_row(None, ["aab", "aab"], target=["a", "b+"]) == [2 / 3, 1 / 3]
    with pytest.raises(ValueError, match="exactly one"):
        PatternFractionReward()


def _reward_that_fails_on_sample_two(prompts, completions, **kwargs):
    return [1.0 / (len(c) - 3) for c in completions]  # ZeroDivisionError for a 3-character completion


def test_raising_reward_names_function_and_sample():
    """A reward function that raises is reported with its name, the failing sample's index and prompt."""
    prompts, completions = ["p0", "p1", "the bad prompt"], ["abcd", "abcde", "abc"]
    with pytest.raises(RewardFunctionError) as info:
        score_completions(
            [_reward_that_fails_on_sample_two], prompts, completions, completion_ids=[[1]] * 3, columns={}
        )
    message = str(info.value)
    assert "_reward_that_fails_on_sample_two" in message and "ZeroDivisionError" in message
    assert "sample 2" in message and "the bad prompt" in message


def test_score_completions_none_nan_and_bad_outputs():
    """None and NaN become NaN (NaN with a warning naming the function); wrong lengths and types raise."""

    def half_none(prompts, completions, **kwargs):
        return [1.0, None, 0.5]

    def returns_nan(prompts, completions, **kwargs):
        return [float("nan"), 2, True]

    with pytest.warns(UserWarning, match="'returns_nan' returned NaN for 1 of 3 samples"):
        rewards = score_completions(
            [half_none, returns_nan], ["a", "b", "c"], ["x", "y", "z"], completion_ids=[[1]] * 3, columns={}
        )
    expected = torch.tensor([[1.0, float("nan")], [float("nan"), 2.0], [0.5, 1.0]])
    assert torch.equal(rewards.isnan(), expected.isnan())
    assert torch.allclose(rewards.nan_to_num(), expected.nan_to_num())

    with pytest.raises(RewardFunctionError, match="'short' must return a list of 2 values"):
        short = _named("short", lambda prompts, completions, **k: [1.0])
        score_completions([short], ["a", "b"], ["x", "y"], completion_ids=[[1]] * 2, columns={})
    with pytest.raises(RewardFunctionError, match="returned 'good' for sample 1"):
        score_completions(
            [_named("text", lambda prompts, completions, **k: [1.0, "good"])],
            ["a", "b"],
            ["x", "y"],
            completion_ids=[[1]] * 2,
            columns={},
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the NaN warning is given once per function
        score_completions(
            [returns_nan], ["a", "b", "c"], ["x", "y", "z"], completion_ids=[[1]] * 3, columns={}
        )


def test_trl_style_reward_functions_are_called_with_keywords():
    """Functions written as TRL documents them (completions first, columns by name) score unchanged."""
    completions = ["\\boxed{7}" + "x" * 10, "\\boxed{8}"]
    seen = {}

    def reads_state(prompts, completions, trainer_state, **kwargs):
        seen["step"] = trainer_state.global_step
        return [0.0] * len(completions)

    rewards = score_completions(
        [reward_len, reward_func, reads_state],
        ["p0", "p1"],
        completions,
        completion_ids=[[1], [2]],
        columns={"ground_truth": ["7", "9"]},
        trainer_state=TrainerState(global_step=5),
    )
    assert rewards.tolist() == [[-abs(20 - 19), 1.0, 0.0], [-abs(20 - 9), 0.0, 0.0]]  # lengths 19 and 9
    assert seen["step"] == 5


def test_reward_signatures_are_checked_before_training():
    """A reward function that cannot take the keywords it will get fails early, naming it and the parameter."""
    check_reward_funcs([reward_len, reward_func, accuracy_reward], columns=["ground_truth", "answer"])

    def needs_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    def no_kwargs(completions):
        return [0.0] * len(completions)

    def positional_only(prompts, completions, /, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match="'needs_solution' needs parameter 'solution'.*ground_truth"):
        check_reward_funcs([needs_solution], columns=["ground_truth"])
    check_reward_funcs([needs_solution], columns=None)  # columns not known yet: nothing to blame
    with pytest.raises(TypeError, match="'no_kwargs' does not take 'completion_ids', 'prompts', 'trainer_state'.*\\*\\*kwargs"):
        check_reward_funcs([no_kwargs], columns=None)
    with pytest.raises(TypeError, match="'positional_only': parameter 'prompts' is positional-only"):
        check_reward_funcs([positional_only])


def test_reward_func_names():
    """Functions are named by __name__, callable objects by their class."""
    assert reward_func_name(accuracy_reward) == "accuracy_reward"
    assert reward_func_name(SoftOverlongPunishment(10, 2)) == "SoftOverlongPunishment"


def test_rewards_build_from_yaml_import_paths():
    """reward_funcs in YAML: an import path for a function, class_path + init_args for a configurable reward."""
    from jsonargparse import ArgumentParser

    from lit_posttrain import GRPOModule

    parser = ArgumentParser()
    parser.add_method_arguments(GRPOModule, "__init__", "model", skip={"model_name_or_path"})
    config = parser.parse_string(
        """
model:
  reward_funcs:
    - lit_posttrain.rewards.accuracy_reward
    - class_path: lit_posttrain.rewards.SoftOverlongPunishment
      init_args: {max_completion_length: 64, soft_punish_cache: 16}
"""
    )
    reward_funcs = parser.instantiate(config).model.reward_funcs
    assert reward_funcs[0] is accuracy_reward
    assert isinstance(reward_funcs[1], SoftOverlongPunishment) and reward_funcs[1].soft_punish_cache == 16


def _named(name, fn):
    fn.__name__ = name
    return fn
