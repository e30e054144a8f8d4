"""The rollout layer: the engines that sample an online method's completions.

Online methods call ``self.rollout.generate(self.model, prompt_ids, ...)`` visibly in
``training_step``. Every engine answers that call with the same signature and returns a
`RolloutOutput`::

    generate(model, prompt_ids, *, num_generations=1, max_completion_length=256, temperature=1.0,
             top_p=1.0, top_k=0, do_sample=True, stop_token_ids=None) -> RolloutOutput

- ``base.py``: `RolloutOutput`, `eos_ids` (the EOS ids every engine stops at), `sampling_rng`.
- ``hf.py``: `HFRollout`, batched HF ``generate`` on the policy itself: the default.
- ``vllm.py``: `VLLMColocateRollout` (an in-process vLLM engine) and `VLLMServerRollout` (a
  ``lit-posttrain vllm-serve`` process), kept equal to the policy by lazy weight sync. The
  `lit_posttrain.callbacks.VLLMRollout` callback builds one at ``setup`` and swaps it into
  ``pl_module.rollout``; it owns the engine's lifecycle, the engine owns the generation.
- ``tools.py``: `ToolRollout`, multi-turn rollouts with tools or environments around any of the
  engines above (tool calls parsed, run with a timeout, their results inserted and masked:
  ``RolloutOutput.completion_mask``); see docs/tools.md.
- ``vllm_engine.py``: building a vLLM engine, pushing weights into it, sampling with it (shared
  by `VLLMColocateRollout` and ``lit-posttrain vllm-serve``).

Importing the rollout layer does not import vLLM (an optional extra); building a vLLM engine does.
"""

from lit_posttrain.rollout.base import RolloutOutput, eos_ids, sampling_rng
from lit_posttrain.rollout.hf import HFRollout
from lit_posttrain.rollout.tools import ToolRollout
from lit_posttrain.rollout.vllm import VLLMColocateRollout, VLLMServerRollout

__all__ = [
    "HFRollout",
    "RolloutOutput",
    "ToolRollout",
    "VLLMColocateRollout",
    "VLLMServerRollout",
    "eos_ids",
    "sampling_rng",
]
