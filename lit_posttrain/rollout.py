"""The default rollout engine: batched Hugging Face ``generate`` on the policy itself.

Online methods call ``self.rollout.generate(self.model, prompt_ids, ...)`` visibly in
``training_step``. The `VLLMRollout` callback swaps in an engine with the same ``generate``
signature; nothing else in the method changes.

Sharded policies (FSDP2 ``fully_shard``, FSDP1): every forward all-gathers parameters, a
collective, so all ranks must run the same number of decoding steps although their completions
end at different lengths. `HFRollout` then passes ``synced_gpus=True`` to ``generate``: a rank
whose completions have all ended keeps running (discarded) forwards until every rank is done.
Every rank must also call ``generate`` the same number of times (equal prompts per rank).

Reproducible sampling: ``generate`` samples with the global RNG. `sampling_rng` runs a block with
the global RNG taken from a ``torch.Generator`` the caller owns (and checkpoints), so sampling can
be resumed exactly and does not shift, or get shifted by, other users of the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lit_posttrain.ops import pad


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
        policy_version: the number of weight syncs the engine had received when it sampled these
            (0 for an engine that is the policy itself).
    """

    completion_ids: list[list[int]]
    completions: list[str]
    truncated: list[bool]
    logps: list[list[float]] | None = None
    policy_version: int = 0


class HFRollout:
    """Sample with ``model.generate`` in one left-padded batch (or ``batch_size`` chunks).

    Args:
        tokenizer: pads the prompts, decodes the completions and supplies the EOS / pad ids.
        batch_size: prompts x generations per ``generate`` call; None for all at once.
    """

    def __init__(self, tokenizer, batch_size: int | None = None):
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
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
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        do_sample: bool = True,
    ) -> RolloutOutput:
        eos_ids = _eos_ids(model, self.tokenizer)
        pad_id = self.tokenizer.pad_token_id
        repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
        step = self.batch_size or len(repeated)
        was_training = model.training
        model.eval()
        completion_ids: list[list[int]] = []
        try:
            for start in range(0, len(repeated), step):
                chunk = [torch.tensor(ids, dtype=torch.long) for ids in repeated[start : start + step]]
                device = next(model.parameters()).device
                input_ids = pad(chunk, pad_id, padding_side="left").to(device)  # (N, P)
                attention_mask = pad([torch.ones_like(c) for c in chunk], 0, padding_side="left").to(device)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_completion_length,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=top_p if do_sample else None,
                    top_k=top_k if do_sample else None,
                    min_p=min_p,
                    repetition_penalty=repetition_penalty,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                    use_cache=True,
                    synced_gpus=_synced_gpus(model),
                )  # (N, P + C)
                for row in out[:, input_ids.size(1) :].tolist():
                    completion_ids.append(_cut_at_eos(row, eos_ids))
        finally:
            model.train(was_training)
        truncated = [len(ids) >= max_completion_length and ids[-1] not in eos_ids for ids in completion_ids]
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return RolloutOutput(completion_ids=completion_ids, completions=completions, truncated=truncated)


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config (may be several, e.g. end-of-text and end-of-turn)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _cut_at_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    """Keep tokens up to and including the first EOS (the rest is padding)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


def _synced_gpus(model) -> bool | None:
    """True for a model sharded over several processes (FSDP2 / FSDP1): all ranks then decode in
    lockstep. None lets transformers decide (it detects DeepSpeed ZeRO-3 itself).

    transformers also detects FSDP2 through the ``_is_fsdp_managed_module`` marker ``fully_shard``
    sets, and FSDP1 only when ``model`` itself is the FSDP wrapper; deciding here does not depend
    on either (without lockstep, gloo aborts with "Received data size doesn't match expected size").
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    sharded = any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())
    return True if sharded else None


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
