"""Multi-turn tool rollouts (`lit_posttrain.rollout.tools`): parsing, execution, the loop's masking.

The loop's bookkeeping is checked token by token against a scripted engine (a real model cannot be
made to emit a chosen trajectory); the stop-token path and the mask are checked on the real
`HFRollout` with a tiny model briefly trained to call a tool.
"""

import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from lit_posttrain.models import load_model
from lit_posttrain.rollout import HFRollout, RolloutOutput
from lit_posttrain.rollout.tools import (
    ToolCall,
    ToolCallError,
    ToolRollout,
    format_trajectory,
    parse_tool_call,
    run_with_timeout,
    tool_schemas,
)
from lit_posttrain.tiny import build_tiny_tokenizer

EOS = 3  # <|im_end|>, an EOS id of the tiny model


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.
    """
    return a + b


def boom(x: int) -> int:
    """Always fails.

    Args:
        x: ignored.
    """
    raise RuntimeError("kaput")


def shout(text: str) -> str:
    """Repeat a text many times.

    Args:
        text: what to repeat.
    """
    return text * 50


class TinyModelStub:
    """What `eos_ids` reads from a model: the tiny model's EOS ids."""

    class generation_config:
        eos_token_id = (1, EOS)


class ScriptedEngine:
    """Answers the k-th ``generate`` call with ``script[k]`` (one text per active row), cut like a real
    engine: at the first EOS or stop token (kept) and at ``max_completion_length``. Reports fake
    sampler log-probs ``-(row + 1) / 10 - position / 100`` and records each request."""

    def __init__(self, tokenizer, script: list[list[str]]):
        self.tokenizer, self.script, self.requests = tokenizer, script, []

    def generate(
        self, model, prompt_ids, *, num_generations, max_completion_length, stop_token_ids, **sampling
    ):
        self.requests.append(
            {"prompt_ids": prompt_ids, "max_completion_length": max_completion_length, "stop": stop_token_ids}
        )
        assert num_generations == 1
        texts = self.script[len(self.requests) - 1]
        assert len(texts) == len(prompt_ids)
        completion_ids, logps = [], []
        for row, text in enumerate(texts):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            for k, token in enumerate(ids):
                if token in [1, EOS, *stop_token_ids]:
                    ids = ids[: k + 1]
                    break
            ids = ids[:max_completion_length]
            completion_ids.append(ids)
            logps.append([-(row + 1) / 10 - k / 100 for k in range(len(ids))])
        return RolloutOutput(completion_ids=completion_ids, completions=[], truncated=[], logps=logps)


@pytest.fixture
def tok():
    return build_tiny_tokenizer()


@pytest.fixture
def hermes_tok():
    """The tiny tokenizer with Qwen2.5's tool-call markers as single special tokens."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=True)
    return tokenizer


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_tool_schemas_from_type_hints_and_docstrings():
    """The schemas the chat template's ``tools=`` receives come from the signature and docstring."""
    schema = tool_schemas([add])[0]
    assert schema["function"]["name"] == "add"
    assert schema["function"]["description"] == "Add two integers."
    assert schema["function"]["parameters"] == {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "description": "the first addend."},
            "b": {"type": "integer", "description": "the second addend."},
        },
        "required": ["a", "b"],
    }

    def undocumented(a: int) -> int:
        return a

    with pytest.raises(ValueError, match="tools: undocumented needs type hints"):
        tool_schemas([undocumented])


def test_parse_tool_calls_in_both_formats():
    """Well-formed calls parse into name and arguments; malformed ones raise ToolCallError with the reason."""
    content, call = parse_tool_call(
        'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "hermes"
    )
    assert content == "Sure. " and call == ToolCall("add", {"a": 1, "b": 2})
    _, call = parse_tool_call('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', "hermes")
    assert call == ToolCall("add", {"a": 1})  # arguments written as a JSON string
    content, call = parse_tool_call("so <add 12 -3.5 x>", "tiny")
    assert content == "so " and call == ToolCall("add", [12, -3.5, "x"])
    for text, fmt, reason in [
        ('<tool_call>{"name": add}</tool_call>', "hermes", "not valid JSON"),
        ('{"name": "add"}</tool_call>', "hermes", "has no <tool_call>"),
        ('<tool_call>{"arguments": {}}</tool_call>', "hermes", "expected"),
        ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "hermes", "must be a JSON object"),
        ("12 30>", "tiny", "has no <"),
        ("< >", "tiny", "empty tool call"),
    ]:
        with pytest.raises(ToolCallError, match=reason):
            parse_tool_call(text, fmt)


def test_bad_options_are_named(tok):
    """Bad options raise ValueError naming the option and what was expected."""
    with pytest.raises(ValueError, match="call_format must be one of"):
        ToolRollout(None, tok, tools=[add], call_format="json")
    with pytest.raises(ValueError, match="exactly one of tools"):
        ToolRollout(None, tok, tools=[add], env_factory=Counter)
    with pytest.raises(ValueError, match="tool_timeout must be positive"):
        ToolRollout(None, tok, tools=[add], tool_timeout=0)
    with pytest.raises(ValueError, match="'</tool_call>' must be one token"):
        ToolRollout(
            None, tok, tools=[add], call_format="hermes"
        )  # the plain tiny vocabulary has no such token


def test_run_with_timeout_waits_once_for_all_calls():
    """Calls run concurrently: two that hang cost one timeout, not two; results keep their order."""
    release = threading.Event()  # frees the abandoned threads at the end
    start = time.monotonic()
    try:
        results = run_with_timeout(
            [lambda: 1, lambda: release.wait(5), lambda: 1 / 0, lambda: release.wait(5)], 0.5
        )
    finally:
        release.set()
    elapsed = time.monotonic() - start
    assert [status for status, _ in results] == ["success", "timeout", "error", "timeout"]
    assert results[0][1] == 1 and isinstance(results[2][1], ZeroDivisionError)
    assert 0.5 <= elapsed < 0.9


def test_loop_bookkeeping_token_by_token(tok):
    """Ids, mask, logps, messages and counts of a scripted two-sample trajectory, token by token."""
    script = [
        ["I add <add 12 30>", "<add 1 2>"],
        ["so 42<|im_end|>", "<add 3 4>"],
        ["<add 7 7>"],  # sample 1's third and last turn ends with a call: not run, truncated
    ]
    engine = ScriptedEngine(tok, script)
    rollout = ToolRollout(engine, tok, tools=[add], call_format="tiny", max_turns=3)
    prompts = [enc(tok, "Q0?"), enc(tok, "Q1?")]
    out = rollout.generate(TinyModelStub(), prompts, max_completion_length=64)

    turns = [enc(tok, "I add <add 12 30>"), enc(tok, "=42\n"), enc(tok, "so 42") + [EOS]]
    assert out.completion_ids[0] == turns[0] + turns[1] + turns[2]
    assert out.completion_mask[0] == [1] * 17 + [0] * 4 + [1] * 6
    assert out.logps[0] == [-0.1 - k / 100 for k in range(17)] + [0.0] * 4 + [
        -0.1 - k / 100 for k in range(6)
    ]
    turns1 = [
        enc(tok, "<add 1 2>"),
        enc(tok, "=3\n"),
        enc(tok, "<add 3 4>"),
        enc(tok, "=7\n"),
        enc(tok, "<add 7 7>"),
    ]
    assert out.completion_ids[1] == [t for turn in turns1 for t in turn]
    assert out.completion_mask[1] == [1] * 9 + [0] * 3 + [1] * 9 + [0] * 3 + [1] * 9
    assert out.logps[1][:9] == [-0.2 - k / 100 for k in range(9)] and out.logps[1][24:] == [
        -0.1 - k / 100 for k in range(9)
    ]  # the third call had one row: sample 1 was row 0
    assert out.truncated == [False, True]
    assert out.completions[0] == "I add <add 12 30>=42\nso 42"

    # the engine saw each sample's prompt + trajectory so far, stopped on ">", with the largest budget left
    close = enc(tok, ">")
    assert [r["stop"] for r in engine.requests] == [close] * 3
    assert engine.requests[1]["prompt_ids"] == [
        prompts[0] + turns[0] + turns[1],
        prompts[1] + turns1[0] + turns1[1],
    ]
    assert [r["max_completion_length"] for r in engine.requests] == [64, 64 - 12, 64 - 24]

    call = {"type": "function", "function": {"name": "add", "arguments": [12, 30]}}
    assert out.messages[0] == [
        {"role": "assistant", "content": "I add ", "tool_calls": [call]},
        {"role": "tool", "name": "add", "content": "42"},
        {"role": "assistant", "content": "so 42"},
    ]
    assert out.messages[1][-1] == {"role": "assistant", "content": "<add 7 7>"}
    assert out.tool_stats == [
        {"turns": 2, "calls": 1, "successes": 1, "errors": 0, "timeouts": 0},
        {"turns": 3, "calls": 2, "successes": 2, "errors": 0, "timeouts": 0},
    ]
    assert format_trajectory(tok, out.completion_ids[0], out.completion_mask[0]) == (
        "trained | I add <add 12 30>\nmasked  | =42\\n\ntrained | so 42<|im_end|>"
    )


def test_budget_cuts_turns_and_tool_results(tok):
    """``max_completion_length`` bounds the whole trajectory: a model turn or a tool result that
    does not fit is cut and the sample is truncated."""
    engine = ScriptedEngine(tok, [["<add 12 30>", "<add 1 2>"], ["abcdefghij"]])
    rollout = ToolRollout(engine, tok, tools=[add], call_format="tiny", max_turns=3)
    out = rollout.generate(TinyModelStub(), [enc(tok, "Q")], num_generations=2, max_completion_length=13)
    assert out.completion_ids[0] == enc(tok, "<add 12 30>=4")  # 11 + 2: the result cut to the budget
    assert out.completion_mask[0] == [1] * 11 + [0] * 2
    assert out.completion_ids[1] == enc(tok, "<add 1 2>=3\na")  # 9 + 3 inserted + 1 of the next turn
    assert out.completion_mask[1] == [1] * 9 + [0] * 3 + [1]
    assert engine.requests[1]["max_completion_length"] == 1
    assert out.truncated == [True, True]


def test_failures_become_tool_messages_and_the_loop_continues(hermes_tok):
    """A raising tool, a timeout, malformed calls, an unknown tool and wrong arguments each give the
    model an ``error:`` tool message, are counted, and the samples go on to their next turn."""
    release = threading.Event()  # frees the thread `slow` leaves behind when it times out

    def slow(seconds: float) -> str:
        """Sleep, then answer.

        Args:
            seconds: how long to sleep.
        """
        release.wait(seconds)
        return "late"

    first = [
        '<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>',
        '<tool_call>{"name": "slow", "arguments": {"seconds": 30}}</tool_call>',
        '<tool_call>{"name": add, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "mul", "arguments": {"a": 1, "b": 2}}</tool_call>',
        '<tool_call>{"name": "add", "arguments": {"a": 1, "c": 2}}</tool_call>',
        'Sure.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
    ]
    engine = ScriptedEngine(hermes_tok, [first, ["done<|im_end|>"] * 6])
    rollout = ToolRollout(engine, hermes_tok, tools=[add, boom, slow], tool_timeout=0.5, call_format="hermes")
    start = time.monotonic()
    try:
        out = rollout.generate(
            TinyModelStub(), [enc(hermes_tok, "Q")], num_generations=6, max_completion_length=256
        )
    finally:
        release.set()
    assert time.monotonic() - start < 2.0  # one 0.5 s timeout for the whole turn
    results = [messages[1]["content"] for messages in out.messages]
    assert results[0] == "error: RuntimeError: kaput"
    assert results[1] == "error: the call timed out after 0.5 s"
    assert results[2].startswith("error: the tool call is not valid JSON")
    assert results[3] == "error: unknown tool 'mul'; tools: ['add', 'boom', 'slow']"
    assert results[4] == "error: wrong arguments for add: missing a required argument: 'b'"
    assert results[5] == "3"
    assert [messages[-1] for messages in out.messages] == [{"role": "assistant", "content": "done"}] * 6
    assert [s["calls"] for s in out.tool_stats] == [1] * 6 and [s["turns"] for s in out.tool_stats] == [2] * 6
    assert [s["errors"] for s in out.tool_stats] == [1, 0, 1, 1, 1, 0]
    assert [s["timeouts"] for s in out.tool_stats] == [0, 1, 0, 0, 0, 0]
    assert [s["successes"] for s in out.tool_stats] == [0, 0, 0, 0, 0, 1]
    assert out.truncated == [False] * 6
    # "hermes": the result goes in as the chat template's tool turn, masked; the model's turns are not
    inserted = [t for t, m in zip(out.completion_ids[5], out.completion_mask[5]) if m == 0]
    assert hermes_tok.decode(inserted) == "<|im_end|>\n<|im_start|>tool\n3<|im_end|>\n<|im_start|>assistant\n"
    assert out.completion_ids[5][: len(enc(hermes_tok, first[5]))] == enc(hermes_tok, first[5])
    assert out.messages[5][0] == {
        "role": "assistant",
        "content": "Sure.",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
    }


def test_long_tool_results_are_cut(tok):
    """A result longer than ``max_tool_response_tokens`` reaches the model cut to that many tokens."""
    engine = ScriptedEngine(tok, [["<shout ab>"], ["ok<|im_end|>"]])
    rollout = ToolRollout(engine, tok, tools=[shout], call_format="tiny", max_tool_response_tokens=7)
    out = rollout.generate(TinyModelStub(), [enc(tok, "Q")], max_completion_length=64)
    assert out.messages[0][1]["content"] == "abababa"
    assert (
        tok.decode([t for t, m in zip(out.completion_ids[0], out.completion_mask[0]) if m == 0])
        == "=abababa\n"
    )


class Counter:
    """Adds up the numbers it is called with; the episode ends at 10."""

    instances: ClassVar[list] = []

    def __init__(self):
        Counter.instances.append(self)
        self.prompts = []

    def reset(self, prompt: str) -> str | None:
        self.prompts.append(prompt)
        self.total = 0
        return "total=0\n"

    def step(self, call: ToolCall) -> tuple[str, bool]:
        self.total += call.arguments[0]
        return str(self.total), self.total >= 10


def test_environment_per_sample(tok):
    """One environment per sample: its reset observation and step observations are inserted masked,
    its state is its own, and ``done`` ends the sample."""
    Counter.instances = []
    script = [["<inc 4>", "<inc 9>", "<inc 1>"], ["<inc 4>", "x<|im_end|>", "<inc 9>"], ["<inc 4>"]]
    engine = ScriptedEngine(tok, script)
    rollout = ToolRollout(engine, tok, env_factory=Counter, call_format="tiny", max_turns=4)
    out = rollout.generate(
        TinyModelStub(), [enc(tok, "A"), enc(tok, "B"), enc(tok, "C")], max_completion_length=64
    )
    assert [c.prompts for c in Counter.instances] == [["A"], ["B"], ["C"]]
    assert [c.total for c in Counter.instances] == [12, 9, 10]
    assert out.completions == [
        "total=0\n<inc 4>=4\n<inc 4>=8\n<inc 4>=12\n",  # done at 12
        "total=0\n<inc 9>=9\nx",  # ended by the model's EOS
        "total=0\n<inc 1>=1\n<inc 9>=10\n",  # done at 10
    ]
    assert out.completion_mask[1] == [0] * 8 + [1] * 7 + [0] * 3 + [1] * 2
    assert out.messages[0][0] == {"role": "observation", "content": "total=0\n"}
    assert out.truncated == [False] * 3 and [s["calls"] for s in out.tool_stats] == [3, 1, 2]
    assert [len(r["prompt_ids"]) for r in engine.requests] == [3, 3, 1]


@pytest.fixture(scope="module")
def tool_calling_model():
    """The tiny model trained (80 steps, ~1 s) to answer "12+30" / "7+5" with a call to add."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = load_model("examples/tiny-model", random_init=True, init_seed=0)
    texts = [
        chat(tokenizer, "12+30") + "<add 12 30>=42\n42<|im_end|>",
        chat(tokenizer, "7+5") + "<add 7 5>=12\n12<|im_end|>",
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small gain nothing from threads, and lose 10x on a busy machine
    try:
        for _ in range(80):
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model, tokenizer


def chat(tokenizer, question):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def test_hf_engine_stops_on_extra_stop_tokens(tool_calling_model):
    """`HFRollout` ends a completion at an extra stop token (kept); without one it runs on as before."""
    model, tokenizer = tool_calling_model
    prompt = [enc(tokenizer, chat(tokenizer, "12+30"))]
    hf = HFRollout(tokenizer)
    plain = hf.generate(model, prompt, max_completion_length=24, do_sample=False)
    assert (
        plain.completion_ids
        == hf.generate(
            model, prompt, max_completion_length=24, do_sample=False, stop_token_ids=None
        ).completion_ids
    )
    assert plain.completions == ["<add 12 30>=42\n42"]  # the model writes the result itself
    stopped = hf.generate(
        model, prompt, max_completion_length=24, do_sample=False, stop_token_ids=enc(tokenizer, ">")
    )
    assert stopped.completions == ["<add 12 30>"] and stopped.truncated == [False]


def test_hf_tool_rollout_masks_exactly_the_generated_tokens(tool_calling_model):
    """On the real HF engine, greedy: every mask-1 token is the model's argmax given everything before it
    (it generated it), every mask-0 token is the tool result the loop inserted, and the call ran."""
    model, tokenizer = tool_calling_model
    rollout = ToolRollout(HFRollout(tokenizer), tokenizer, tools=[add], call_format="tiny", max_turns=3)
    questions = ["12+30", "7+5", "3+4"]  # the last is unseen: whatever the model writes is handled
    prompts = [enc(tokenizer, chat(tokenizer, q)) for q in questions]
    out = rollout.generate(model, prompts, max_completion_length=40, do_sample=False)
    assert out.completions[:2] == ["<add 12 30>=42\n42", "<add 7 5>=12\n12"]
    assert out.tool_stats[0] == {"turns": 2, "calls": 1, "successes": 1, "errors": 0, "timeouts": 0}
    assert out.logps is None  # HF generate reports no sampler log-probs
    for prompt, ids, mask, messages in zip(prompts, out.completion_ids, out.completion_mask, out.messages):
        with torch.no_grad():
            argmax = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        assert [a for a, m in zip(argmax, mask) if m] == [t for t, m in zip(ids, mask) if m]
        inserted = "".join(f"={m['content']}\n" for m in messages if m["role"] == "tool")
        assert tokenizer.decode([t for t, m in zip(ids, mask) if not m]) == inserted
    print(format_trajectory(tokenizer, out.completion_ids[0], out.completion_mask[0]))


def test_hermes_trajectory_is_what_qwen25_template_renders(hermes_tok):
    """With Qwen2.5's chat template (tests/data/chat_templates/qwen2_5.jinja, as Qwen2.5-Instruct ships
    it), prompt + trajectory is exactly the template's rendering of the conversation with the returned
    messages: the inserted tokens are its tool turn."""
    hermes_tok.chat_template = (Path(__file__).parent / "data" / "chat_templates" / "qwen2_5.jinja").read_text()
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call>'
    engine = ScriptedEngine(hermes_tok, [[call], ["It is 42.<|im_end|>"]])
    rollout = ToolRollout(engine, hermes_tok, tools=[add], call_format="hermes")
    question = [{"role": "user", "content": "12+30?"}]
    prompt = hermes_tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    out = rollout.generate(TinyModelStub(), [enc(hermes_tok, prompt)], max_completion_length=400)
    inserted = [t for t, m in zip(out.completion_ids[0], out.completion_mask[0]) if m == 0]
    assert hermes_tok.decode(inserted) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    rendered = hermes_tok.apply_chat_template(question + out.messages[0], tokenize=False)
    assert (
        prompt + hermes_tok.decode(out.completion_ids[0]) + "\n" == rendered
    )  # the template adds a final "\n"
