"""Asynchronous GRPO: generation runs ahead of training on a vLLM engine in its own process, with a
bounded buffer, backpressure and policy-version accounting (the design of PipelineRL, prime-rl and
verl's one-step-off-policy mode; GRPO's math as in `lit_posttrain.GRPOModule`).

Synchronous GRPO generates, scores, then steps, while the other side idles. Here a **producer**
keeps generating: a ``lit-posttrain vllm-serve`` process (started by the module, or one you run
elsewhere: ``server_url``) samples the groups, and a thread of the training process feeds it the
upcoming prompt batches, pushes it the newest weights and scores what comes back with the reward
functions, into a **buffer** the training steps read from::

    trainer (Lightning)          batch k:  take scored batch k  ->  GRPO loss, optimizer step(s)  ->  snapshot v=k+1
    producer thread          batch k+1:  push newest snapshot  ->  /generate (vLLM process)  ->  score  ->  buffer

Versions. The policy version is the number of optimizer steps taken (``global_step``). After each
generation batch's optimizer steps the trainer copies the policy's weights (a snapshot, labelled
with its version); before each generation the producer pushes the newest snapshot it has not pushed
yet, so every sample carries the exact version of the weights that generated it, and the weights
travel while the trainer trains.

Buffer and backpressure. The producer may start generating batch ``j`` only when the trainer has
finished batch ``j - buffer_size``: at most ``buffer_size`` scored batches wait in the buffer, and
a fast producer waits (``async/producer_wait_s``). With a fast producer a batch is generated
``buffer_size - 1`` generation batches before the trainer reaches it, so its staleness (trainer
version minus sample version) is ``(buffer_size - 1) x num_iterations x steps_per_generation``.
A batch staler than ``max_staleness`` versions is dropped, counted (``async/dropped_stale``, in
samples) and generated again with the current weights before the step uses it. Samples within the
bound are corrected by GRPO's truncated importance ratio pi_theta / pi_sampler against the
sampler's log-probs (``vllm_importance_sampling_*``, on by default): the ratio now covers the policy
lag as well as the engine's numerics. ``max_staleness=0`` with ``buffer_size=1`` is synchronous
GRPO with a server engine: the same weights, seeds and samples (`tests/experimental/test_async_grpo.py`
checks the metrics are identical).

Data. The producer reads the DataModule's prompt stream in the order the training loader yields it
(the same seeded shuffle per epoch, across epoch boundaries, from the resumed position after a
restart), and every step checks that the scored batch it takes holds the prompts Lightning handed
it, so data order, epochs and ``max_steps`` mean what they mean in GRPO.

Lifecycle. The engine process starts at ``setup`` (its output goes to ``<log_dir>/async_producer.log``)
and stops when ``fit`` ends, fails or is interrupted; it is also tied to the training process
(Linux ``PR_SET_PDEATHSIG``), so a SIGKILLed trainer leaves no engine behind. A producer that dies
(the engine exits, a reward function raises) is reported by the next step with its cause within
``producer_timeout`` seconds instead of a hang.

Resume. A checkpoint holds what GRPO's does (weights, optimizer, data position, sampling RNG); a
resumed run starts a fresh producer at the checkpoint's data position with the checkpoint's weights.
What is not reproduced exactly: the sampling seeds of the ``buffer_size`` batches that were already
released to the old producer when the checkpoint was taken (they were drawn before it), so their
completions differ from the uninterrupted run's; everything after follows from the restored RNG.

Departures from synchronous `lit_posttrain.GRPOModule` (numbered, as in the other method files):

1. Samples may be up to ``max_staleness`` versions old (off-policy), corrected by the truncated
   importance ratio; GRPO's are on-policy.
2. Reward functions run in the producer thread, concurrently with training (``trainer_state``
   tells them the version that generated the samples, not the trainer's step).
3. One training process (``devices: 1``; the engine may sit on another GPU or node via
   ``server_url``); DDP / FSDP2 are not supported yet and are refused at setup.
4. Sampling is seeded per request (each prompt ``i`` of a batch from ``seed + i``, the seed drawn
   from the module's sampling RNG when the batch is released to the producer).

Metrics, besides all of GRPO's: ``async/staleness/mean|max`` (the step's samples, in versions),
``async/dropped_stale`` (samples dropped so far), ``async/buffer_size`` (scored batches waiting when
the step took its own), ``async/trainer_wait_s`` (seconds the step waited for its batch),
``async/producer_wait_s`` (seconds the producer waited on backpressure since the previous step),
``async/policy_version`` (the trainer's version at the step), and the producer's own time since the
previous step: ``async/generation_s`` (in ``/generate``) and ``async/weight_sync_s`` (pushing weights).

    lit-posttrain fit --config configs/quickstart/async_grpo.yaml
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lit_posttrain.data import LookaheadLoader
from lit_posttrain.experimental import warn_experimental
from lit_posttrain.ops import pad
from lit_posttrain.rewards import TrainerState, score_completions
from lit_posttrain.rollout import RolloutOutput, eos_ids
from lit_posttrain.rollout.base import free_port
from lit_posttrain.rollout.vllm import VLLMServerRollout
from lit_posttrain.rollout.vllm_engine import policy_weights
from lit_posttrain.stable.grpo import GRPOModule, group_advantages

warn_experimental(__name__)

_SEED_HIGH = 2**31 - 2**20  # request seeds: prompt i of a batch samples with seed + i


@dataclass
class ScoredBatch:
    """One generation batch as the producer hands it to the trainer."""

    index: int  # position in the prompt stream since the producer started
    version: int  # the policy version (optimizer steps) whose weights generated it
    seed: int
    batch: dict  # the collated prompt batch (prompt_ids, prompt, columns)
    rollout: RolloutOutput
    rewards_per_func: torch.Tensor  # (N, F)


class ProducerError(RuntimeError):
    """The asynchronous producer (its engine process or its thread) failed: the run stops with its cause."""


class AsyncGRPOModule(GRPOModule):
    """GRPO with generation decoupled from training (see the module docstring).

    Args (all of `lit_posttrain.GRPOModule`'s, plus):
        max_staleness: drop (and generate again) batches more than this many policy versions old.
        buffer_size: scored generation batches the producer may have ready ahead of the trainer (>= 1);
            with a fast producer samples are ``buffer_size - 1`` generation batches old. ``max_staleness=0,
            buffer_size=1`` is synchronous GRPO.
        server_url: an already running ``lit-posttrain vllm-serve`` (e.g. ``http://10.0.0.5:8000``, on
            another GPU or node; its token in ``LIT_POSTTRAIN_SERVE_TOKEN``); None starts one on this
            machine with the settings below.
        vllm_kv_cache_memory_bytes: the started engine's KV cache (on CPU, a share of RAM otherwise).
        vllm_max_model_len: the started engine's context (default: the model's).
        vllm_gpu_memory_utilization: the started engine's share of GPU memory (GPU only).
        vllm_enforce_eager: no graph capture in the started engine (starts in seconds).
        producer_timeout: seconds a step waits for its batch (and for the engine to start) before
            stopping with an error.
    """

    METHOD = "AsyncGRPO"

    def __init__(
        self,
        *args,
        max_staleness: int = 1,
        buffer_size: int = 2,
        server_url: str | None = None,
        vllm_kv_cache_memory_bytes: int | None = 268435456,
        vllm_max_model_len: int | None = None,
        vllm_gpu_memory_utilization: float = 0.3,
        vllm_enforce_eager: bool = True,
        producer_timeout: float = 600.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1 (generation batches), got {buffer_size}")
        if self.hparams.get("quantization"):
            raise ValueError("AsyncGRPO: quantization (QLoRA) is not supported yet; use GRPOModule")
        if self.tool_options is not None:
            raise ValueError("AsyncGRPO: tools / environment_factory are not supported yet; use GRPOModule")
        self.max_staleness, self.buffer_size = max_staleness, buffer_size
        self.server_url = server_url
        self.vllm_kv_cache_memory_bytes, self.vllm_max_model_len = vllm_kv_cache_memory_bytes, vllm_max_model_len
        self.vllm_gpu_memory_utilization, self.vllm_enforce_eager = vllm_gpu_memory_utilization, vllm_enforce_eager
        self.producer_timeout = producer_timeout
        self._producer: _Producer | None = None

    # -----------------------------------------------------------------------------------------
    # Lifecycle: the engine process starts at setup, the producer thread at train start
    # -----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        if self.trainer.world_size > 1:
            raise ValueError(
                f"AsyncGRPO runs on one training process for now (got {self.trainer.world_size}); use "
                "GRPOModule with lit_posttrain.callbacks.VLLMRollout for DDP / FSDP2"
            )
        if self.trainer.limit_train_batches not in (1.0, None):
            raise ValueError("AsyncGRPO: trainer.limit_train_batches is not supported (the producer reads whole epochs)")
        if self.buffer_size > self.max_staleness + 1:
            rank_zero_warn(
                f"AsyncGRPO: buffer_size {self.buffer_size} > max_staleness {self.max_staleness} + 1: a fast producer "
                f"makes samples {self.buffer_size - 1} generation batches old, which are dropped and generated again"
            )
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        self._producer = _Producer(self, log_dir)
        self._producer.start_engine()
        self.rollout = _ValidationRollout(self._producer)  # validation: greedy, with the current weights

    def on_train_start(self) -> None:
        loader = self.trainer.train_dataloader
        if not isinstance(loader, LookaheadLoader):
            raise TypeError(f"AsyncGRPO needs GRPODataModule's training loader (a LookaheadLoader), got {type(loader)}")
        self._producer.start_thread(loader, epoch=self.current_epoch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # the batch's optimizer steps are done: publish the weights and release the next batch
        self._producer.publish(self.global_step)

    def teardown(self, stage: str) -> None:
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    def configure_callbacks(self):
        return [*super().configure_callbacks(), _StopProducerOnException()]

    # -----------------------------------------------------------------------------------------
    # The step: GRPO's, with the generation and scoring taken from the producer's buffer
    # -----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        mini_batch_size, micro_batch_size = self._split_sizes(len(batch["prompt_ids"]))
        # 1. take this batch's scored samples from the buffer (generated by the producer, version v)
        scored, async_metrics = self._producer.take(batch, version=self.global_step)
        rollout, rewards_per_func = scored.rollout, scored.rewards_per_func.to(self.device)  # (N, F)
        # 2. pack the samples into tensors: (N, P+C), (N, P+C), (N, C)
        input_ids, attention_mask, completion_mask = self._pack(batch["prompt_ids"], rollout)
        # 3. (scored by the producer) the completions as reward functions saw them, for the table
        prompts, completions, _ = self._reward_inputs(batch, rollout)
        # 4. combine: the weighted sum over the functions, NaN where none applies
        rewards = self._combine(rewards_per_func)  # (N,)
        # 5. old and reference log-probs (no grad); old = the current policy before its update: with one
        # optimizer step per batch, the update's own forward in step 8 (detached)
        on_policy = self.num_iterations == 1 and self.steps_per_generation == 1
        C, old_per_token_logps, ref_per_token_logps = completion_mask.size(1), None, None
        if not on_policy:
            old_per_token_logps = self._old_per_token_logps(input_ids, attention_mask, C, micro_batch_size)
        if self.beta != 0.0:
            ref_per_token_logps = self._ref_per_token_logps(input_ids, attention_mask, C, micro_batch_size)
        # 6. importance-sampling correction against the sampler (older weights, the engine's numerics); with
        # one step per batch each micro-batch weighs its samples with its own forward (GRPO's _compute_loss)
        importance_sampling_ratio, sampler_per_token_logps = None, None  # (N, C) or (N, 1) weights; (N, C)
        if self.vllm_importance_sampling_correction and rollout.logps is not None:
            sampler_per_token_logps = pad([torch.tensor(lp) for lp in rollout.logps], 0.0).to(self.device)
            if not on_policy:
                importance_sampling_ratio, _ = self._importance_sampling_ratio(
                    old_per_token_logps, sampler_per_token_logps, completion_mask
                )
        # 7. advantages: group-relative
        advantages = group_advantages(rewards, self.num_generations, scale_rewards=self.scale_rewards)  # (N,)
        # 8. num_iterations passes of steps_per_generation optimizer steps over the samples
        samples = {
            "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "advantages": advantages, "old_per_token_logps": old_per_token_logps,
            "ref_per_token_logps": ref_per_token_logps,
            "importance_sampling_ratio": importance_sampling_ratio,
            "sampler_per_token_logps": sampler_per_token_logps if on_policy else None,
        }  # fmt: skip
        losses, weighted_metrics, first_per_token_logps = self._policy_updates(samples, mini_batch_size, micro_batch_size)
        sampling_metrics = {}  # the correction's weights over every sample, as the loss used them
        if sampler_per_token_logps is not None:
            pi_old = first_per_token_logps if on_policy else old_per_token_logps
            sampling_metrics = self._importance_sampling_ratio(pi_old, sampler_per_token_logps, completion_mask)[1]
        # 9. metrics: GRPO's, and the producer's
        lengths = torch.tensor([len(ids) for ids in rollout.completion_ids])  # (N,)
        all_rewards_per_func, all_lengths, all_truncated, all_num_tokens = self._all_gather_samples(
            rewards_per_func, lengths, torch.tensor(rollout.truncated), attention_mask.sum(1)
        )  # (M, F), (M,), (M,), (M,)
        self.num_tokens += int(all_num_tokens.sum())
        metrics = self._generation_metrics(all_rewards_per_func, all_lengths, all_truncated)
        metrics |= sampling_metrics | self._mean_over_micro_batches(weighted_metrics)
        metrics["loss"] = self.trainer.strategy.reduce(torch.stack(losses).mean(), reduce_op="mean")
        for name, value in metrics.items():
            self.log(f"train/{name}", value, prog_bar=name in ("reward", "loss"))
        for name, value in async_metrics.items():
            self.log(f"async/{name}", float(value))
        self.log("train/num_tokens", float(self.num_tokens))
        # 10. every log_every_n_steps generation batches, a table of sampled completions (log_completions)
        num_batches = self.global_step // self._steps_per_batch()
        if self.log_completions and num_batches % self.trainer.log_every_n_steps == 0:
            self._log_completion_table(prompts, completions, rewards_per_func, advantages)

    def score(self, batch: dict, rollout: RolloutOutput, version: int) -> torch.Tensor:
        """(N, F) rewards of a generation batch (called in the producer thread)."""
        prompts, completions, columns = self._reward_inputs(batch, rollout)
        state = TrainerState(global_step=version, epoch=0, max_steps=self.trainer.max_steps)
        return score_completions(
            self.reward_funcs, prompts, completions, completion_ids=rollout.completion_ids, columns=columns,
            trainer_state=state,
        )  # fmt: skip


class _StopProducerOnException(Callback):
    """Stops the engine process and the producer thread when fit fails or is interrupted."""

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(pl_module, AsyncGRPOModule) and pl_module._producer is not None:
            pl_module._producer.stop()


class _ValidationRollout:
    """``generate`` for validation: the current weights pushed if the engine holds others, then one request."""

    def __init__(self, producer: _Producer):
        self.producer = producer

    def generate(self, model, prompt_ids, *, num_generations=1, max_completion_length=256, do_sample=False, **kw):
        return self.producer.generate_now(model, prompt_ids, num_generations, max_completion_length, do_sample, kw)


class _Producer:
    """The engine process, the producer thread and the buffer between them and the trainer."""

    def __init__(self, module: AsyncGRPOModule, log_dir: Path):
        self.module = weakref.proxy(module)
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None
        self.client: VLLMServerRollout | None = None
        self.thread: threading.Thread | None = None
        self.buffer: queue.Queue = queue.Queue()
        self.lock = threading.Lock()  # one engine conversation (push + generate) at a time
        self.changed = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        self.engine_version: int | None = None  # the version the engine holds (None: its own start weights)
        self.snapshot: tuple[int, list] | None = None  # (version, weights) not yet pushed
        self.finished = 0  # generation batches the trainer has finished (this producer's count)
        self.taken = 0  # batches the trainer has taken from the buffer
        self.seeds: list[int] = []  # seeds[j]: batch j released to the producer with this seed
        self.dropped = 0
        self.producer_wait = 0.0
        self.generation_time = self.sync_time = 0.0  # seconds in /generate and in weight pushes (reported per step)
        self.eos: list[int] = []
        self._token, self._token_dir = None, None

    # engine process --------------------------------------------------------------------------
    def start_engine(self) -> None:
        m = self.module
        if m.server_url:
            self.client = VLLMServerRollout(m.server_url, m.tokenizer, timeout=m.producer_timeout)
        else:
            port = free_port()
            self._token = secrets.token_hex(16)
            self._token_dir = Path(tempfile.mkdtemp(prefix="lit-posttrain-async-"))
            token_file = self._token_dir / "token"
            token_file.write_text(self._token)
            token_file.chmod(0o600)
            command = [
                sys.executable, "-m", "lit_posttrain", "vllm-serve", "--model", m.hparams.model_name_or_path,
                "--host", "127.0.0.1", "--port", str(port), "--token-file", str(token_file),
                "--dtype", "float32" if m.hparams.get("dtype", "float32") == "float32" else str(m.hparams.dtype),
            ]  # fmt: skip
            if m.hparams.get("random_init"):
                command.append("--random-init")
            if m.vllm_kv_cache_memory_bytes is not None:
                command += ["--kv-cache-memory-bytes", str(m.vllm_kv_cache_memory_bytes)]
            else:
                command += ["--gpu-memory-utilization", str(m.vllm_gpu_memory_utilization)]
            if m.vllm_max_model_len is not None:
                command += ["--max-model-len", str(m.vllm_max_model_len)]
            if m.vllm_enforce_eager:
                command.append("--enforce-eager")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / "async_producer.log", "ab")
            env = {k: v for k, v in os.environ.items() if k != "LIT_POSTTRAIN_SERVE_TOKEN"}
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
            )
            log.close()
            _LIVE.add(self.process)
            self.client = _TokenClient(f"http://127.0.0.1:{port}", m.tokenizer, self._token, timeout=m.producer_timeout)
        self.eos = eos_ids(m.model, m.tokenizer)

    def _wait_for_engine(self) -> None:
        deadline = time.monotonic() + self.module.producer_timeout
        while True:
            self._check_process()
            try:
                self.client._request("GET", "/health", timeout=5)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ProducerError(
                        f"the vLLM engine did not answer within producer_timeout={self.module.producer_timeout:.0f} s "
                        f"(its log: {self.log_dir / 'async_producer.log'})"
                    ) from None
                time.sleep(0.5)

    def _check_process(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ProducerError(
                f"the producer's vLLM engine process (pid {self.process.pid}) exited with code {self.process.returncode}; "
                f"its log: {self.log_dir / 'async_producer.log'}"
            )

    # weights -----------------------------------------------------------------------------------
    def _push(self, version: int, weights) -> None:
        """(lock held) the engine holds ``weights``, version ``version``, afterwards."""
        if self.engine_version == version:
            return
        start = time.perf_counter()
        self.client.send_weights(weights)
        self.engine_version = version
        with self.changed:
            self.sync_time += time.perf_counter() - start

    def publish(self, version: int) -> None:
        """Trainer thread, after a batch's optimizer steps: snapshot the weights, release the next batch."""
        weights = [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in policy_weights(self.module.model)]
        with self.changed:
            self.snapshot = (version, weights)
            self.finished += 1
            self._release()
            self.changed.notify_all()

    def _release(self) -> None:
        """(condition held) draw the seeds of the batches the producer may now generate."""
        while len(self.seeds) < self.finished + self.module.buffer_size:
            self.seeds.append(int(torch.randint(0, _SEED_HIGH, (), generator=self.module.generator)))

    # the producer thread -------------------------------------------------------------------------
    def start_thread(self, loader: LookaheadLoader, epoch: int) -> None:
        self._wait_for_engine()
        if self.engine_version != self.module.global_step:  # the starting weights (a random init, a resume)
            with self.lock:
                self._push(self.module.global_step, list(policy_weights(self.module.model)))
        with self.changed:
            self._release()
        self.thread = threading.Thread(target=self._run, args=(loader, epoch), name="async-grpo-producer", daemon=True)
        self.thread.start()

    def _stream(self, loader: LookaheadLoader, epoch: int):
        """Prompt batches in the training loader's order, from its (resumed) position, epoch after epoch."""
        skip = loader._skip if loader._skip_epoch == epoch else 0
        while True:
            batches = torch.utils.data.DataLoader(
                loader.examples, batch_size=loader.batch_size, sampler=loader._sampler(epoch),
                collate_fn=loader.collate_fn, drop_last=loader.drop_last,
            )  # fmt: skip
            for i, batch in enumerate(batches):
                if i >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0

    def _run(self, loader: LookaheadLoader, epoch: int) -> None:
        m = self.module
        try:
            for index, batch in enumerate(self._stream(loader, epoch)):
                start = time.perf_counter()
                with self.changed:  # backpressure: batch `index` once the trainer finished `index - buffer_size`
                    while not self.stopping and len(self.seeds) <= index:
                        self.changed.wait()
                    if self.stopping:
                        return
                    seed = self.seeds[index]
                    snapshot, self.snapshot = self.snapshot, None
                    self.producer_wait += time.perf_counter() - start
                with self.lock:
                    if snapshot is not None:
                        self._push(*snapshot)
                    version = self.engine_version
                    rollout = self._generate(batch["prompt_ids"], seed)
                rewards = m.score(batch, rollout, version)
                self.buffer.put(ScoredBatch(index, version, seed, batch, rollout, rewards))
        except BaseException as err:  # the trainer reports it at its next take()
            if not self.stopping:
                self.error = err
                self.buffer.put(None)

    def _generate(self, prompt_ids, seed: int) -> RolloutOutput:
        m, start = self.module, time.perf_counter()
        rollout = self.client.generate_ids(
            prompt_ids, eos_token_ids=self.eos, num_generations=m.num_generations,
            max_completion_length=m.max_completion_length, temperature=m.temperature, top_p=m.top_p,
            top_k=m.top_k, seed=seed,
        )  # fmt: skip
        with self.changed:
            self.generation_time += time.perf_counter() - start
        return rollout

    # the trainer's side ------------------------------------------------------------------------
    def take(self, batch: dict, version: int) -> tuple[ScoredBatch, dict]:
        """The scored batch for Lightning's ``batch`` (waiting for it), dropped and regenerated when too stale."""
        start, deadline = time.perf_counter(), time.monotonic() + self.module.producer_timeout
        waiting = self.buffer.qsize()
        while True:
            try:
                scored = self.buffer.get(timeout=1.0)
                break
            except queue.Empty:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ProducerError(
                        f"no generation batch from the producer within producer_timeout={self.module.producer_timeout:.0f} s"
                    ) from None
        if scored is None:  # the producer stopped on an error
            self._check_alive()
            raise ProducerError("the async producer stopped")
        trainer_wait = time.perf_counter() - start
        if scored.index != self.taken or scored.batch["prompt_ids"] != batch["prompt_ids"]:
            raise ProducerError(
                f"the producer's batch {scored.index} does not hold the prompts of the trainer's batch {self.taken}: "
                "the training loader's order changed under the producer"
            )
        self.taken += 1
        staleness = version - scored.version
        if staleness > self.module.max_staleness:  # drop, and generate again with the current weights
            self.dropped += len(scored.rollout.completion_ids)
            with self.lock:
                self._push(version, list(policy_weights(self.module.model)))
                rollout = self._generate(scored.batch["prompt_ids"], scored.seed)
            scored = ScoredBatch(
                scored.index, version, scored.seed, scored.batch, rollout, self.module.score(scored.batch, rollout, version)
            )
            staleness = 0
        with self.changed:
            producer_wait, self.producer_wait = self.producer_wait, 0.0
            generation, sync, self.generation_time, self.sync_time = self.generation_time, self.sync_time, 0.0, 0.0
        metrics = {
            "staleness/mean": staleness, "staleness/max": staleness, "dropped_stale": self.dropped,
            "buffer_size": waiting, "trainer_wait_s": trainer_wait, "producer_wait_s": producer_wait,
            "policy_version": version, "generation_s": generation, "weight_sync_s": sync,
        }  # fmt: skip
        return scored, metrics

    def _check_alive(self) -> None:
        self._check_process()
        if self.error is not None:
            if self.process is not None:  # a killed engine often shows first as a dropped connection: name
                try:  # the engine's exit as the cause when it is dying (the thread's error is chained)
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                else:
                    try:
                        self._check_process()
                    except ProducerError as exit_error:
                        raise exit_error from self.error
            raise ProducerError(f"the async producer failed: {type(self.error).__name__}: {self.error}") from self.error
        if self.thread is not None and not self.thread.is_alive() and not self.stopping:
            raise ProducerError("the async producer thread stopped without an error")

    def generate_now(self, model, prompt_ids, num_generations, max_completion_length, do_sample, kw) -> RolloutOutput:
        """Validation: push the current weights if needed, then generate (greedy unless ``do_sample``)."""
        self._wait_for_engine()
        with self.lock:
            self._push(self.module.global_step, list(policy_weights(model)))
            return self.client.generate_ids(
                prompt_ids, eos_token_ids=self.eos, num_generations=num_generations,
                max_completion_length=max_completion_length, temperature=kw.get("temperature", 1.0) if do_sample else 0.0,
                top_p=kw.get("top_p", 1.0), top_k=kw.get("top_k", 0), seed=None,
            )  # fmt: skip

    def stop(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # the server stops on SIGTERM
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            _LIVE.discard(self.process)
        if self.thread is not None:
            self.thread.join(timeout=10)
        if self._token_dir is not None:
            shutil.rmtree(self._token_dir, ignore_errors=True)


class _TokenClient(VLLMServerRollout):
    """A client that sends its own server's token (not the environment's)."""

    def __init__(self, base_url, tokenizer, token, **kwargs):
        super().__init__(base_url, tokenizer, **kwargs)
        self._own_token = token

    def _request(self, method, path, body=None, headers=None, timeout=None):
        headers = {**(headers or {}), "Authorization": f"Bearer {self._own_token}"}
        return super()._request(method, path, body, headers, timeout)


def _die_with_parent() -> None:
    """In the engine process, before exec: get SIGKILL when the training process dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_LIVE: set = set()  # engine processes to stop at interpreter exit, whatever happened


@atexit.register
def _stop_all() -> None:
    for process in list(_LIVE):
        if process.poll() is None:
            process.kill()
