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


def tool_success(completions: list[str], trajectory: list[list[dict]], **kwargs) -> list[float]:
    """1.0 where a tool call of the trajectory returned a result (a tool message that is not an
    ``error: ...``), else 0.0: partial credit for calling the tool right, from the ``trajectory``
    (each sample's messages) that GRPO and RLOO pass to reward functions of tool rollouts.

    >>> ok = [{"role": "assistant", "content": "", "tool_calls": []}, {"role": "tool", "name": "add", "content": "579"}]
    >>> bad = [{"role": "tool", "name": "add", "content": "error: ValueError: the problem is 123+456"}]
    >>> tool_success(["", "", ""], trajectory=[ok, bad, [{"role": "assistant", "content": "579"}]])
    [1.0, 0.0, 0.0]
    """
    return [
        1.0 if any(m["role"] == "tool" and not m["content"].startswith("error:") for m in messages) else 0.0
        for messages in trajectory
    ]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.
    """
    return a + b


class ProblemCalculator:
    """The environment of the tool-use quickstart: an ``add`` calculator for one addition problem.

    One instance per rollout sample (``environment_factory: examples.tool_rewards.ProblemCalculator``).
    ``reset`` reads the problem's two numbers from the prompt (``"Add: 123+456="``); ``step`` answers
    a call ``<add a b>`` with the sum when ``a`` and ``b`` are the problem's numbers (in either order),
    and raises otherwise, which the rollout loop turns into an ``error: ...`` tool message and counts
    in ``tools/errors``. So ``tools/success_rate`` is the share of calls made with the right
    arguments, a skill the warm-started model has only in part.

    >>> env = ProblemCalculator()
    >>> env.reset("Add: 123+456=")
    >>> from lit_posttrain.rollout.tools import ToolCall
    >>> env.step(ToolCall("add", [123, 456]))
    ('579', False)
    >>> env.step(ToolCall("add", [123, 465]))
    Traceback (most recent call last):
    ...
    ValueError: the problem is 123+456
    """

    def reset(self, prompt: str) -> None:
        a, b = prompt.strip().removeprefix("Add:").strip().rstrip("=").split("+")
        self.numbers = sorted([int(a), int(b)])  # returns None: nothing is inserted before the first turn

    def step(self, call) -> tuple[str, bool]:
        if call.name != "add" or not isinstance(call.arguments, list) or len(call.arguments) != 2:
            raise ValueError(f"unknown call {call.name}{tuple(call.arguments)}; the tool is add(a, b)")
        if sorted(call.arguments) != self.numbers:
            a, b = self.numbers
            raise ValueError(f"the problem is {a}+{b}")
        return str(sum(self.numbers)), False
