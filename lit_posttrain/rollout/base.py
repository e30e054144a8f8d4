"""What every rollout engine shares: the `RolloutOutput` it returns, the EOS ids it stops at
(`eos_ids`), and `sampling_rng`, which makes a method's sampling resumable.

Reproducible sampling: ``generate`` samples with the global RNG. `sampling_rng` runs a block with
the global RNG taken from a ``torch.Generator`` the caller owns (and checkpoints), so sampling can
be resumed exactly and does not shift, or get shifted by, other users of the global RNG.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class RolloutOutput:
    """Completions in prompt-major order: prompt ``i``'s generations are rows ``i*G .. i*G+G-1``.

    Attributes:
        completion_ids: token ids of each completion, unpadded, ending with the EOS token when one
            was sampled.
        completions: the decoded completions (special tokens skipped).
        truncated: True where the completion reached ``max_completion_length`` without an EOS.
        logps: the sampler's log-probability of each sampled token (under its temperature-scaled
            distribution), or None when the engine does not report them.
        num_syncs: how many times the policy's weights had been pushed to the engine when it
            sampled these completions, counting the push the same ``generate`` call may have
            started with (1 for completions sampled right after the first push). 0 for an engine
            that is the policy itself (`HFRollout`), which never needs a push. It counts pushes,
            not optimizer steps: the weights are pushed lazily, once per ``generate`` call that
            follows one or more optimizer steps (see `VLLMColocateRollout`).
        completion_mask: multi-turn rollouts only (`lit_posttrain.rollout.tools.ToolRollout`): per
            token of ``completion_ids``, 1 where the model sampled the token, 0 where the rollout
            loop inserted it (tool output, template tokens). None: every token was sampled.
        messages: multi-turn rollouts only: each sample's trajectory after the prompt as chat
            messages (assistant turns with their ``tool_calls``, tool results).
        tool_stats: multi-turn rollouts only: each sample's counts (``turns``, ``calls``,
            ``successes``, ``errors``, ``timeouts``).
    """

    completion_ids: list[list[int]]
    completions: list[str]
    truncated: list[bool]
    logps: list[list[float]] | None = None
    num_syncs: int = 0
    completion_mask: list[list[int]] | None = None
    messages: list[list[dict]] | None = None
    tool_stats: list[dict[str, int]] | None = None


def eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config (may be several, e.g. end-of-text and end-of-turn)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


@contextmanager
def sampling_rng(generator: torch.Generator) -> Iterator[None]:
    """Draw the random numbers of the block (e.g. ``generate``'s sampling) from ``generator``.

    Inside the block the global RNG of ``generator``'s device starts from ``generator``'s state;
    afterwards ``generator`` holds the advanced state and the global RNG is back where it was. A
    module that owns ``generator`` and saves ``generator.get_state()`` in its checkpoints resumes
    its sampling exactly. Use a generator on the device that samples (the policy's device).

        with sampling_rng(self.generator):
            rollout = self.rollout.generate(self.model, prompt_ids, num_generations=8)
    """
    device = generator.device
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(generator.get_state())
            try:
                yield
            finally:
                generator.set_state(torch.get_rng_state())
    else:
        backend = torch.get_device_module(device.type)
        with torch.random.fork_rng(devices=[device], device_type=device.type):
            backend.set_rng_state(generator.get_state(), device)
            try:
                yield
            finally:
                generator.set_state(backend.get_rng_state(device))


def process_tmpdir(prefix: str) -> Path:
    """A new temporary directory ``<prefix><pid>-XXXX`` for this process, after removing the ones a
    dead process of the same prefix left behind (a run killed with SIGKILL never cleans up)."""
    root = Path(tempfile.gettempdir())
    for stale in root.glob(f"{prefix}*"):
        pid = stale.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a server this process is about to start)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
