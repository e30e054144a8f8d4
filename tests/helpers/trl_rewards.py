"""Reward functions copied verbatim from TRL's GRPO documentation ("Using a custom reward function"),
for tests that pass them to the real CLI (``tests.helpers.trl_rewards.reward_len``, importable because
the CLI puts the working directory, the repository root, on ``sys.path``)."""

import re


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]
