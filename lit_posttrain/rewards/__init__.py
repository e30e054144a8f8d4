"""Built-in reward functions: callables ``(prompts, completions, **dataset_columns) -> list[float | None]``.

They are called with keywords only, as TRL calls them: ``f(prompts=..., completions=...,
completion_ids=..., trainer_state=..., **dataset_columns)``, so a function copied from TRL's
documentation (``def f(completions, **kwargs)``) works unchanged. ``completions`` are strings, or
``[{"role": "assistant", "content": ...}]`` lists for conversational data (every built-in handles
both); a reward function should accept ``**kwargs`` for the keywords it does not use. ``None`` means
"does not apply to this sample". In YAML, a function is an import path
(``lit_posttrain.rewards.accuracy_reward``) and a configurable reward a ``class_path`` with
``init_args``.
"""

from lit_posttrain.rewards.accuracy import accuracy_reward, extract_answer, parse_number
from lit_posttrain.rewards.scoring import (
    RewardFunctionError,
    TrainerState,
    check_reward_funcs,
    reward_func_name,
    score_completions,
)
from lit_posttrain.rewards.text import (
    PatternFractionReward,
    SoftOverlongPunishment,
    completion_text,
    think_format_reward,
)

__all__ = [
    "PatternFractionReward",
    "RewardFunctionError",
    "SoftOverlongPunishment",
    "TrainerState",
    "check_reward_funcs",
    "accuracy_reward",
    "completion_text",
    "extract_answer",
    "parse_number",
    "reward_func_name",
    "score_completions",
    "think_format_reward",
]
