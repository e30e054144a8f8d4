"""Reward and tool of the tool-use GRPO quickstart (3-digit addition with an ``add`` tool).

A trajectory of the warm-started tool caller (examples/tiny-tool-caller) reads, decoded::

    <add 123 456>=579
    579

the model's call, the tool result the loop inserted (``=579`` and a newline) and the model's final
turn. Only the final turn is scored: copying the tool's result there is what earns the reward.
"""


def final_answer(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 where the model's final turn (the text after the last newline of the trajectory) equals
    ``answer``, else 0.0 (TRL's reward signature; ``completions`` are whole decoded trajectories).

    Surrounding whitespace of the final turn is ignored; a trajectory without a newline (no tool
    result was inserted) is scored on its whole text.

    >>> final_answer(
    ...     ["<add 123 456>=579\\n579", "<add 123 456>=579\\n578", "<add 123 456>=579\\n", "579"],
    ...     answer=["579", "579", "579", "579"],
    ... )
    [1.0, 0.0, 0.0, 1.0]
    """
    return [
        1.0 if completion.rsplit("\n", 1)[-1].strip() == str(target) else 0.0
        for completion, target in zip(completions, answer, strict=True)
    ]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.
    """
    return a + b
