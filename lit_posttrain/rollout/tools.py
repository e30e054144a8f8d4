"""Multi-turn rollouts with tools: the model calls a tool, reads its result, continues.

`ToolRollout` wraps any rollout engine (`HFRollout`, `VLLMColocateRollout`, `VLLMServerRollout`)
and answers the same ``generate`` call with a `RolloutOutput` whose ``completion_ids`` hold the
whole trajectory after the prompt: the model's turns and, between them, the tool results the loop
inserted. ``completion_mask`` says which tokens the model sampled (1) and which the loop inserted
(0): only the former carry loss.

Tools are plain Python callables with type hints and a Google-style docstring, the form the
``tools=`` argument of a chat template takes (`tool_schemas` gives their JSON schemas with
``transformers.utils.get_json_schema``)::

    def add(a: int, b: int) -> int:
        \"\"\"Add two integers.

        Args:
            a: the first addend.
            b: the second addend.
        \"\"\"
        return a + b

    rollout = ToolRollout(HFRollout(tokenizer), tokenizer, tools=[add], call_format="tiny")
    out = rollout.generate(model, prompt_ids, num_generations=4, max_completion_length=64)

An environment serves stateful tasks (a game, a sandbox, a session). ``env_factory()`` builds one
instance per rollout sample; instead of calling tools, the loop hands every parsed call to it::

    class Counter:
        def reset(self, prompt: str) -> str | None:
            self.total = 0
            return None  # or a first observation, inserted after the prompt (not trained)

        def step(self, call: ToolCall) -> tuple[str, bool]:
            self.total += int(call.arguments[0] if isinstance(call.arguments, list) else call.arguments["n"])
            return str(self.total), self.total >= 10  # (observation, done)

    rollout = ToolRollout(engine, tokenizer, env_factory=Counter, call_format="tiny")

Call formats (``call_format``); generation stops at the closing marker, one token, passed to the
engine as an extra stop token:

- ``"hermes"`` (Qwen2.5, Hermes, and most instruction models with tools):
  ``<tool_call>{"name": "add", "arguments": {"a": 12, "b": 30}}</tool_call>``; ``</tool_call>``
  must be a single token of the vocabulary. The result is inserted as a tool turn in the chat
  template's own format (what the template renders after the assistant turn for a ``"tool"``
  message, up to and including the next assistant generation prompt).
- ``"tiny"`` (the character-level tiny model): ``<add 12 30>``, a name and whitespace-separated
  positional arguments (each read as a JSON literal when it is one, else as a string); the result is
  inserted as plain text, ``=42`` and a newline.

Malformed calls (bad JSON, no opening marker, an unknown tool, arguments that do not fit the tool's
signature), exceptions a tool raises and calls that run past ``tool_timeout`` seconds all become a
tool message starting with ``error:`` that the model reads; none stops the run. Each sample counts
its ``calls`` (``= successes + errors + timeouts``) in `RolloutOutput.tool_stats`.

Safety: tools and environments are user code and run in the trainer's process, with the trainer's
rights (files, network, GPUs). Each call runs in its own daemon thread and the loop stops waiting
after ``tool_timeout``; Python cannot kill a thread, so a call that timed out keeps running in the
background until it returns. A tool that executes untrusted code (e.g. what the model wrote) must
run it in a subprocess with CPU-time and memory limits and no network itself.

Sharded policies: `HFRollout` under FSDP needs every rank to call ``generate`` the same number of
times (every forward all-gathers the weights), and the number of turns depends on what each rank's
samples do: with a sharded policy the ranks agree on each turn (an all-reduce) and a rank whose
samples are done joins the others' decoding with a one-token dummy generation. Plain DDP and the
vLLM engines need no agreement.

Departures from TRL's tool loop (``GRPOTrainer`` with ``tools=``):

1. The loop is engine-agnostic and token-level: the trajectory is kept as token ids, the model's
   own tokens are never re-tokenized, so ``completion_mask`` and the sampler's ``logps`` line up
   with what was sampled.
2. All samples' tool calls of a turn run concurrently, each under ``tool_timeout``.
3. ``max_completion_length`` is the budget of the whole trajectory after the prompt (model and
   inserted tokens); a sample that reaches it, or whose last allowed turn ends in a call, is
   ``truncated``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

from lit_posttrain.rollout.base import RolloutOutput, eos_ids
from lit_posttrain.rollout.hf import decodes_in_lockstep

CallFormat = Literal["hermes", "tiny"]
CALL_FORMATS = ("hermes", "tiny")
OPEN = {"hermes": "<tool_call>", "tiny": "<"}
CLOSE = {"hermes": "</tool_call>", "tiny": ">"}


@dataclass
class ToolCall:
    """A parsed tool call: keyword ``arguments`` (dict, ``"hermes"``) or positional (list, ``"tiny"``)."""

    name: str
    arguments: dict[str, Any] | list[Any]


class Environment(Protocol):
    """A stateful task, one instance per rollout sample (built by ``env_factory()``)."""

    def reset(self, prompt: str) -> str | None:
        """Start an episode for ``prompt`` (decoded); a returned string is inserted after the prompt."""

    def step(self, call: ToolCall) -> tuple[str, bool]:
        """Answer a call: (observation the model reads next, whether the episode is over)."""


class ToolCallError(ValueError):
    """A call the loop cannot run; its message becomes the tool message."""


def tool_schemas(tools: list[Callable]) -> list[dict]:
    """The JSON schemas of ``tools`` (what a chat template's ``tools=`` takes)."""
    schemas = []
    for tool in tools:
        try:
            schemas.append(get_json_schema(tool))
        except (DocstringParsingException, TypeHintParsingException) as err:
            raise ValueError(
                f"tools: {tool.__name__} needs type hints on every argument and a Google-style docstring "
                f"with an Args section ({err})"
            ) from err
    return schemas


def parse_tool_call(text: str, call_format: CallFormat) -> tuple[str, ToolCall]:
    """Split a model turn that ends with the closing marker into (text before the call, the call).

    Raises:
        ToolCallError: the call is malformed (no opening marker, bad JSON, no name).
    """
    open_, close = OPEN[call_format], CLOSE[call_format]
    if not text.endswith(close):
        raise ToolCallError(f"error: a tool call must end with {close}")
    end = len(text) - len(close)
    start = text.rfind(open_, 0, end)
    if start < 0:
        raise ToolCallError(f"error: a tool call ends with {close} but has no {open_}")
    content, payload = text[:start], text[start + len(open_) : end].strip()
    if call_format == "hermes":
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError as err:
            raise ToolCallError(f"error: the tool call is not valid JSON ({err.msg}): {payload}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ToolCallError('error: expected {"name": "<tool>", "arguments": {...}}, got ' + payload)
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            raise ToolCallError(f"error: the arguments must be a JSON object, got {json.dumps(arguments)}")
        return content, ToolCall(obj["name"], arguments)
    parts = payload.split()
    if not parts:
        raise ToolCallError(f"error: empty tool call {open_}{close}")
    return content, ToolCall(parts[0], [_literal(part) for part in parts[1:]])


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run_with_timeout(fns: list[Callable[[], Any]], timeout: float) -> list[tuple[str, Any]]:
    """Run ``fns`` concurrently, one daemon thread each, and wait at most ``timeout`` seconds in all.

    Returns one (status, value) per function: ("success", return value), ("error", the exception)
    or ("timeout", None). A timed-out thread is abandoned, not killed (Python cannot kill threads).
    """
    results: list[tuple[str, Any]] = [("timeout", None)] * len(fns)

    def run(k: int, fn: Callable[[], Any]) -> None:
        try:
            results[k] = ("success", fn())
        except Exception as err:  # noqa: BLE001 - the tool's failure is the model's to read, not the run's
            results[k] = ("error", err)

    threads = [threading.Thread(target=run, args=(k, fn), daemon=True) for k, fn in enumerate(fns)]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [
        result if not thread.is_alive() else ("timeout", None) for result, thread in zip(results, threads)
    ]


def format_trajectory(tokenizer, completion_ids: list[int], completion_mask: list[int]) -> str:
    """Print a trajectory as runs of tokens marked ``trained`` (mask 1) or ``masked`` (mask 0),
    one run per line, newlines shown as ``\\n``."""
    lines, start = [], 0
    for k in range(1, len(completion_ids) + 1):
        if k == len(completion_ids) or completion_mask[k] != completion_mask[start]:
            text = tokenizer.decode(completion_ids[start:k], skip_special_tokens=False).replace("\n", "\\n")
            label = "trained" if completion_mask[start] else "masked "
            lines.append(f"{label} | {text}")
            start = k
    return "\n".join(lines)


class ToolRollout:
    """Multi-turn rollouts: generate, run the tool calls, insert the results, continue.

    Args:
        engine: any rollout engine whose ``generate`` takes ``stop_token_ids`` (`HFRollout`, the vLLM
            engines).
        tokenizer: the policy's tokenizer (decodes turns, encodes tool results, renders tool turns
            with its chat template for ``"hermes"``).
        tools: the callables the model may call (or their import paths, ``"my_tools.add"``).
        env_factory: builds one `Environment` per sample (a class or a function, or its import path,
            ``"my_envs.Game"``); exclusive with ``tools``.
        max_turns: the most model turns (generation calls) per sample.
        max_tool_response_tokens: a tool result longer than this many tokens is cut to it.
        tool_timeout: seconds a turn's calls may run before they become ``error: ... timed out``.
        call_format: ``"hermes"`` or ``"tiny"`` (see the module docstring).
    """

    def __init__(
        self,
        engine,
        tokenizer,
        tools: list[Callable | str] | None = None,
        env_factory: Callable[[], Environment] | str | None = None,
        max_turns: int = 4,
        max_tool_response_tokens: int = 128,
        tool_timeout: float = 10.0,
        call_format: CallFormat = "hermes",
    ):
        if call_format not in CALL_FORMATS:
            raise ValueError(f"call_format must be one of {CALL_FORMATS}, got {call_format!r}")
        if (tools is None) == (env_factory is None):
            raise ValueError("give exactly one of tools (a list of callables) and env_factory")
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        if max_tool_response_tokens < 1:
            raise ValueError(f"max_tool_response_tokens must be at least 1, got {max_tool_response_tokens}")
        if tool_timeout <= 0:
            raise ValueError(f"tool_timeout must be positive (seconds), got {tool_timeout}")
        close_ids = tokenizer.encode(CLOSE[call_format], add_special_tokens=False)
        if len(close_ids) != 1:
            raise ValueError(
                f"call_format={call_format!r}: the closing marker {CLOSE[call_format]!r} must be one "
                f"token of the tokenizer's vocabulary (generation stops on it), it encodes to {close_ids}"
            )
        self.engine = engine
        self.tokenizer = tokenizer
        self.tools = {}
        for tool in tools or []:
            fn = _resolve(tool, "tools") if isinstance(tool, str) else tool
            self.tools[fn.__name__] = fn
        self.tool_schemas = tool_schemas(list(self.tools.values()))  # for the chat template's tools=
        self.env_factory = (
            _resolve(env_factory, "env_factory") if isinstance(env_factory, str) else env_factory
        )
        self.max_turns = max_turns
        self.max_tool_response_tokens = max_tool_response_tokens
        self.tool_timeout = tool_timeout
        self.call_format = call_format
        self.call_end_id = close_ids[0]

    def generate(
        self,
        model,
        prompt_ids: list[list[int]],
        *,
        num_generations: int = 1,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
    ) -> RolloutOutput:
        """Roll out ``num_generations`` trajectories per prompt, prompt-major; each holds at most
        ``max_completion_length`` tokens after the prompt (model turns and inserted tool results)."""
        eos_token_ids = eos_ids(model, self.tokenizer)
        if self.call_end_id in eos_token_ids:
            raise ValueError(
                f"call_format={self.call_format!r}: the closing marker is an EOS id of the model"
            )
        prompts = [ids for ids in prompt_ids for _ in range(num_generations)]
        n = len(prompts)
        ids: list[list[int]] = [[] for _ in range(n)]
        mask: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        messages: list[list[dict]] = [[] for _ in range(n)]
        stats = [{"turns": 0, "calls": 0, "successes": 0, "errors": 0, "timeouts": 0} for _ in range(n)]
        truncated = [False] * n
        has_logps, num_syncs = True, 0
        envs = [self.env_factory() for _ in range(n)] if self.env_factory is not None else None
        active = list(range(n))
        if envs is not None:
            for i in range(n):
                observation = envs[i].reset(self.tokenizer.decode(prompts[i], skip_special_tokens=False))
                if observation is not None:
                    messages[i].append({"role": "observation", "content": observation})
                    self._insert(
                        i, self.tokenizer.encode(observation, add_special_tokens=False), ids, mask, logps
                    )
            active = [i for i in active if len(ids[i]) < max_completion_length]
            truncated = [len(ids[i]) >= max_completion_length for i in range(n)]
        lockstep = bool(decodes_in_lockstep(model))  # a sharded policy: the ranks agree on every turn
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "do_sample": do_sample}
        for turn in range(self.max_turns):
            if lockstep and not _any_rank(bool(active), model):
                break  # every rank is done
            if not active:
                if lockstep:  # other ranks still decode: join their forwards (each all-gathers the weights)
                    self.engine.generate(model, [prompts[0]], max_completion_length=1, **sampling)
                    continue
                break
            budgets = [max_completion_length - len(ids[i]) for i in active]
            out = self.engine.generate(
                model,
                [prompts[i] + ids[i] for i in active],
                num_generations=1,
                max_completion_length=max(budgets),
                stop_token_ids=[self.call_end_id],
                **sampling,
            )
            has_logps, num_syncs = has_logps and out.logps is not None, out.num_syncs
            pending = []  # (sample, text before the call, the call or the parse error)
            for k, i in enumerate(active):
                turn_ids = out.completion_ids[k][: budgets[k]]  # a longer sample's budget cut to this one's
                turn_logps = out.logps[k][: budgets[k]] if out.logps is not None else [0.0] * len(turn_ids)
                ids[i] += turn_ids
                mask[i] += [1] * len(turn_ids)
                logps[i] += turn_logps
                stats[i]["turns"] += 1
                last = turn_ids[-1] if turn_ids else None
                if last is not None and last in eos_token_ids:
                    messages[i].append({"role": "assistant", "content": self._decode(turn_ids[:-1])})
                elif (
                    last == self.call_end_id
                    and len(ids[i]) < max_completion_length
                    and turn + 1 < self.max_turns
                ):
                    text = self._decode(turn_ids)
                    try:
                        content, call = parse_tool_call(text, self.call_format)
                    except ToolCallError as err:
                        content, call = text, err
                    pending.append((i, content, call))
                else:  # out of budget, or out of turns with a call pending (not run)
                    messages[i].append({"role": "assistant", "content": self._decode(turn_ids)})
                    truncated[i] = True
            results = run_with_timeout(
                [self._job(envs, i, call) for i, _, call in pending], self.tool_timeout
            )
            active = []
            for (i, content, call), (status, value) in zip(pending, results):
                stats[i]["calls"] += 1
                done = False
                if isinstance(call, ToolCall):
                    calls = [
                        {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                    ]
                    messages[i].append({"role": "assistant", "content": content, "tool_calls": calls})
                    name = call.name
                else:
                    messages[i].append({"role": "assistant", "content": content})
                    name = None
                if status == "success" and envs is not None:
                    value, done = value
                if status == "success":
                    stats[i]["successes"] += 1
                    result = value if isinstance(value, str) else json.dumps(value, default=str)
                elif status == "error":
                    stats[i]["errors"] += 1
                    result = (
                        str(value)
                        if isinstance(value, ToolCallError)
                        else f"error: {type(value).__name__}: {value}"
                    )
                else:
                    stats[i]["timeouts"] += 1
                    result = f"error: the call timed out after {self.tool_timeout} s"
                result_ids = self.tokenizer.encode(result, add_special_tokens=False)
                if len(result_ids) > self.max_tool_response_tokens:
                    result = self.tokenizer.decode(result_ids[: self.max_tool_response_tokens])
                messages[i].append({"role": "tool", "name": name, "content": result})
                inserted = self._tool_turn_ids(name, result)
                room = max_completion_length - len(ids[i])
                self._insert(i, inserted[:room], ids, mask, logps)
                if len(inserted) >= room:
                    truncated[i] = True  # no room left for the model's next turn
                elif not done:
                    active.append(i)
        return RolloutOutput(
            completion_ids=ids,
            completions=self.tokenizer.batch_decode(ids, skip_special_tokens=True),
            truncated=truncated,
            logps=logps if has_logps else None,
            num_syncs=num_syncs,
            completion_mask=mask,
            messages=messages,
            tool_stats=stats,
        )

    def _job(self, envs, i: int, call: ToolCall | ToolCallError) -> Callable[[], Any]:
        """The function a worker thread runs for sample ``i``'s call (raises what becomes the message)."""
        if isinstance(call, ToolCallError):
            return _raiser(call)
        if envs is not None:
            return lambda: _observation(envs[i].step(call))
        fn = self.tools.get(call.name)
        if fn is None:
            return _raiser(ToolCallError(f"error: unknown tool {call.name!r}; tools: {sorted(self.tools)}"))
        args, kwargs = (call.arguments, {}) if isinstance(call.arguments, list) else ([], call.arguments)
        try:
            inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as err:
            return _raiser(ToolCallError(f"error: wrong arguments for {call.name}: {err}"))
        return lambda: fn(*args, **kwargs)

    def _tool_turn_ids(self, name: str | None, result: str) -> list[int]:
        """The tokens the loop inserts after a call: the chat template's tool turn (``"hermes"``),
        or ``=result`` and a newline (``"tiny"``)."""
        if self.call_format == "tiny":
            text = f"={result}\n"
        else:
            sentinel = "\x00TOOL-CALL-END\x00"
            conversation = [{"role": "user", "content": "-"}, {"role": "assistant", "content": sentinel}]
            tool_message = {"role": "tool", "name": name or "unknown", "content": result}
            rendered = self.tokenizer.apply_chat_template(
                conversation + [tool_message], tokenize=False, add_generation_prompt=True
            )
            text = rendered[rendered.index(sentinel) + len(sentinel) :]
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _decode(self, turn_ids: list[int]) -> str:
        return self.tokenizer.decode(turn_ids, skip_special_tokens=False)

    @staticmethod
    def _insert(i: int, inserted: list[int], ids, mask, logps) -> None:
        ids[i] += inserted
        mask[i] += [0] * len(inserted)
        logps[i] += [0.0] * len(inserted)


def _raiser(err: Exception) -> Callable[[], Any]:
    def fail():
        raise err

    return fail


def _observation(answer) -> tuple[str, bool]:
    """Check what ``Environment.step`` returned (a malformed answer becomes an error message)."""
    if not (isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], str)):
        raise TypeError(f"Environment.step must return (observation: str, done: bool), got {answer!r}")
    return answer[0], bool(answer[1])


def _any_rank(flag: bool, model) -> bool:
    """Whether ``flag`` holds on any rank (a collective: every rank calls it)."""
    device = next(model.parameters()).device
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _resolve(path: str, option: str) -> Callable:
    """``"package.module.function"`` -> the function (or class)."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{option}: expected an import path like 'my_tools.add', got {path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"{option}: cannot import {path!r} ({type(err).__name__}: {err}); the module must be importable "
            "from the working directory or the Python path"
        ) from err
