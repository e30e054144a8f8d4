"""Built-in reward functions: callables ``(prompts, completions, **dataset_columns) -> list[float | None]``.

``completions`` are strings, or ``[{"role": "assistant", "content": ...}]`` lists for
conversational data (every built-in handles both). The online methods also pass
``completion_ids=`` (token ids), so a reward function should accept ``**kwargs``. ``None`` means
"does not apply to this sample". In YAML, a function is an import path
(``lit_posttrain.rewards.accuracy_reward``) and a configurable reward a ``class_path`` with
``init_args``.
"""

from lit_posttrain.rewards.accuracy import accuracy_reward, extract_answer, parse_number
from lit_posttrain.rewards.scoring import RewardFunctionError, reward_func_name, score_completions
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
    "accuracy_reward",
    "completion_text",
    "extract_answer",
    "parse_number",
    "reward_func_name",
    "score_completions",
    "think_format_reward",
]
