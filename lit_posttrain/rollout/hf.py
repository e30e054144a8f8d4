"""`HFRollout`, the default rollout engine: one batched Hugging Face ``generate`` on the policy itself.

Sharded policies (FSDP2 ``fully_shard``, FSDP1): every forward all-gathers parameters, a
collective, so all ranks must run the same number of decoding steps although their completions
end at different lengths. `HFRollout` then passes ``synced_gpus=True`` to ``generate``: a rank
whose completions have all ended keeps running (discarded) forwards until every rank is done.
Every rank must also call ``generate`` the same number of times (equal prompts per rank).

Sampling: ``generate``'s own sampler calls ``torch.multinomial``, which on CPU draws an exponential
variate for every vocabulary entry of every row at every step (34 ms for 32 rows x 32,000 tokens
here, a third of a 58M model's decoding). `HFRollout` samples the same distribution (temperature,
then top-k, then top-p, as ``generate`` orders them) by inverse CDF instead, one uniform draw per
row (3 ms): `sampling_processors` warps the scores with transformers' own warpers and
`InverseCDFSampling` leaves only the drawn token finite, so ``generate`` runs its greedy step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lit_posttrain.ops import pad
from lit_posttrain.rollout.base import RolloutOutput, eos_ids


class HFRollout:
    """Sample with ``model.generate``: all prompts x generations in one left-padded batch.

    Args:
        tokenizer: pads the prompts, decodes the completions and supplies the EOS / pad ids.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

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
        do_sample: bool = True,
        stop_token_ids: list[int] | None = None,
    ) -> RolloutOutput:
        """Sample ``num_generations`` completions per prompt; ``stop_token_ids`` are extra ids a
        completion ends at (kept as its last token), added to the EOS ids (e.g. a tool call's closing
        token, see `lit_posttrain.rollout.tools`)."""
        eos_token_ids = eos_ids(model, self.tokenizer) + list(stop_token_ids or [])
        pad_id = self.tokenizer.pad_token_id
        repeated = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids for _ in range(num_generations)]
        device = next(model.parameters()).device
        input_ids = pad(repeated, pad_id, padding_side="left").to(device)  # (N, P)
        attention_mask = pad([torch.ones_like(ids) for ids in repeated], 0, padding_side="left").to(device)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_completion_length,
                # sampling happens in the processors (module docstring): generate's own step is greedy
                do_sample=False,
                logits_processor=sampling_processors(temperature, top_k, top_p) if do_sample else None,
                # neutral whatever the model's generation config says, as in the vLLM engines (which
                # do not read it)
                temperature=None,
                top_p=None,
                top_k=None,
                min_p=None,
                repetition_penalty=1.0,
                eos_token_id=eos_token_ids,
                pad_token_id=pad_id,
                use_cache=True,
                synced_gpus=decodes_in_lockstep(model),
            )  # (N, P + C)
        finally:
            model.train(was_training)
        completion_ids = [_cut_at_eos(row, eos_token_ids) for row in out[:, input_ids.size(1) :].tolist()]
        truncated = [
            len(ids) >= max_completion_length and ids[-1] not in eos_token_ids for ids in completion_ids
        ]
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return RolloutOutput(completion_ids=completion_ids, completions=completions, truncated=truncated)


class InverseCDFSampling(LogitsProcessor):
    """Draws each row's next token from ``softmax(scores)`` and returns scores that are 0 at the drawn
    token and -inf elsewhere, so a greedy step selects it.

    Inverse-CDF sampling: one uniform ``u`` per row (from the global RNG, as ``torch.multinomial``
    uses), the token is the first whose cumulative probability exceeds ``u`` times the total. The
    probabilities and their cumulative sum are float64, so a token's chance is its probability to
    ~1e-12 however large the vocabulary; tokens with probability 0 (masked by top-k / top-p) are not
    drawn, except the last vocabulary entry when float64 rounding makes ``u`` equal the total (a chance
    of about 1e-16 a draw).
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores, dim=-1, dtype=torch.float64).cumsum_(-1)  # (N, V)
        u = torch.rand(scores.size(0), 1, dtype=torch.float64, device=scores.device) * cdf[:, -1:]
        # right=True: the first token whose cdf is > u, so a zero-probability token (cdf equal to its
        # predecessor's) is skipped; the clamp only matters if rounding made u equal the total
        tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.size(-1) - 1)  # (N, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def sampling_processors(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> LogitsProcessorList:
    """The processors that sample as ``generate(do_sample=True, temperature=, top_k=, top_p=)`` does,
    for a ``generate(do_sample=False)`` call: transformers' warpers in ``generate``'s order (top-k 0
    and top-p 1 are off), then `InverseCDFSampling`.
    """
    processors = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(InverseCDFSampling())
    return processors


def _cut_at_eos(row: list[int], eos_token_ids: list[int]) -> list[int]:
    """Keep tokens up to and including the first EOS (the rest is padding)."""
    for i, token in enumerate(row):
        if token in eos_token_ids:
            return row[: i + 1]
    return row


def decodes_in_lockstep(model) -> bool | None:
    """True for a model sharded over several processes (FSDP2 / FSDP1): all ranks then decode in
    lockstep. None lets transformers decide (it detects DeepSpeed ZeRO-3 itself).

    transformers also detects FSDP2 through the ``_is_fsdp_managed_module`` marker ``fully_shard``
    sets, and FSDP1 only when ``model`` itself is the FSDP wrapper; deciding here does not depend
    on either (without lockstep, gloo aborts with "Received data size doesn't match expected size").
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    sharded = any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())
    return True if sharded else None
