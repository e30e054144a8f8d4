"""The shipped warm-started tool caller (examples/tiny-tool-caller, made by examples/make_tool_caller.py)
and the tool-use quickstart's reward (examples/tool_rewards.py)."""

import doctest
import importlib.util
import json
from pathlib import Path

import torch

from lit_posttrain import load_model, load_tokenizer
from lit_posttrain.rollout import HFRollout, ToolRollout

ROOT = Path(__file__).resolve().parents[1]
CALLER = ROOT / "examples" / "tiny-tool-caller"


def _tool_rewards():
    spec = importlib.util.spec_from_file_location("tool_rewards", ROOT / "examples" / "tool_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.
    """
    return a + b


def test_final_answer_scores_the_last_line():
    """final_answer is 1.0 exactly where the text after the last newline equals the answer (and its doctest passes)."""
    module = _tool_rewards()
    assert doctest.testmod(module).failed == 0
    completions = [
        "<add 123 456>=579\n579",  # right
        "<add 123 456>=579\n 579 ",  # right, surrounding whitespace
        "<add 123 456>=579\n5790",  # one digit too many
        "<add 123 456>=579\n",  # no final turn
        "<add 123 456>=579",  # the tool result alone is not the final answer ... unless it is the whole text
        "579",  # no tool: the whole text is the final turn
        "<add 100 100>=200\n579\n580",  # only the last line counts
    ]
    answers = ["579"] * len(completions)
    assert module.final_answer(completions, answers) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_shipped_tool_caller_calls_add_with_the_prompt_numbers():
    """Greedy on 8 val prompts, the shipped model emits at least one well-formed <add a b> call with the
    prompt's own numbers, and the tool result inserted after it is a + b."""
    tokenizer = load_tokenizer(str(CALLER))
    model = load_model(str(CALLER))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    lines = (ROOT / "examples" / "data" / "tools" / "val.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:8]]
    prompt_ids = [tokenizer.encode(row["prompt"], add_special_tokens=False) for row in rows]
    rollout = ToolRollout(HFRollout(tokenizer), tokenizer, tools=[add], max_turns=2, call_format="tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small gain nothing from threads
    try:
        out = rollout.generate(model, prompt_ids, max_completion_length=32, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    right = 0
    for row, messages in zip(rows, out.messages):
        a, b = (int(x) for x in row["prompt"].removeprefix("Add: ").removesuffix("=").split("+"))
        call = next((m for m in messages if m.get("tool_calls")), None)
        result = next((m for m in messages if m["role"] == "tool"), None)
        if call is None or result is None:
            continue
        function = call["tool_calls"][0]["function"]
        well_formed = function == {"name": "add", "arguments": [a, b]}
        right += well_formed and result["content"] == row["answer"] == str(a + b)
    assert right >= 1, out.completions
