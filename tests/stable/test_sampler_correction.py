"""GRPO and RLOO on policy with an engine that reports its log-probs (vLLM): the correction's pi_old
comes from the update's own forward, not a no-grad forward of its own, and nothing else changes."""

import lightning as L
import pytest
import torch

from lit_posttrain import GRPODataModule, GRPOModule, RLOODataModule, RLOOModule
from lit_posttrain.rewards import PatternFractionReward
from lit_posttrain.rollout import HFRollout
from lit_posttrain.stable.grpo import vllm_importance_sampling_ratio

OPTIONS = {GRPOModule: {}, RLOOModule: {"beta": 0.0}}  # RLOO's KL needs the old log-probs anyway


def _offsets(completion_mask: torch.Tensor) -> torch.Tensor:
    """Sampler-minus-trainer log-prob gaps in [-0.4, 0.4], different per token and completion."""
    rows, cols = torch.meshgrid(
        torch.arange(completion_mask.size(0)), torch.arange(completion_mask.size(1)), indexing="ij"
    )
    return 0.2 * ((rows + 2 * cols) % 5 - 2).float() * completion_mask


class LogpsReportingRollout(HFRollout):
    """HF sampling that reports log-probs as a vLLM engine does: ``logps[i][t]`` is ``-4 + 0.2 *
    ((i + 2 t) % 5 - 2)`` (near the tiny model's: the weights differ between tokens and completions).
    Keeps its last output."""

    def generate(self, model, prompt_ids, **kwargs):
        out = super().generate(model, prompt_ids, **kwargs)
        out.logps = [
            [-4.0 + 0.2 * ((i + 2 * t) % 5 - 2) for t in range(len(ids))]
            for i, ids in enumerate(out.completion_ids)
        ]
        self.last, self.last_prompt_ids = out, prompt_ids
        return out


def _module(cls, model_dir, **kwargs):
    return cls(
        model_dir, random_init=True, reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        num_generations=4, max_completion_length=6, max_grad_norm=None, **OPTIONS[cls], **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("cls", [GRPOModule, RLOOModule])
def test_the_update_forward_gives_the_same_weights_loss_and_gradient(cls, tiny_model_dir):
    """One micro-batch: the weights from its own forward (``sampler_per_token_logps``) equal those
    from a separate no-grad forward (``importance_sampling_ratio``), so do the loss and its gradient."""
    module = _module(cls, tiny_model_dir)
    tokenizer = module.tokenizer
    prompt_ids = [tokenizer("1+2=")["input_ids"], tokenizer("30+4=")["input_ids"]]
    torch.manual_seed(0)
    rollout = HFRollout(tokenizer).generate(
        module.model, prompt_ids, num_generations=4, max_completion_length=6
    )
    input_ids, attention_mask, completion_mask = module._pack(prompt_ids, rollout)
    C = completion_mask.size(1)
    old = module._old_per_token_logps(input_ids, attention_mask, C, 8)  # the separate forward
    sampler = old + _offsets(completion_mask)
    ratio, _ = vllm_importance_sampling_ratio(
        old, sampler, completion_mask, level=module.vllm_importance_sampling_level,
        mode=module.vllm_importance_sampling_mode, cap=module.vllm_importance_sampling_cap,
    )  # fmt: skip
    kept = ratio[completion_mask.bool()] if ratio.shape == completion_mask.shape else ratio
    assert kept.std() > 0.05  # the correction weighs samples differently: a test that can fail
    samples = {
        "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
        "advantages": torch.linspace(-1.0, 1.0, input_ids.size(0)),
    }  # fmt: skip
    extra = (completion_mask.sum().float(),) if cls is GRPOModule else ()
    params = [p for p in module.parameters() if p.requires_grad]
    results = []
    for correction in ({"importance_sampling_ratio": ratio}, {"sampler_per_token_logps": sampler}, {}):
        loss, _, per_token_logps = module._compute_loss({**samples, **correction}, *extra)
        results.append((loss.detach(), torch.autograd.grad(loss, params), per_token_logps))
    (separate, separate_grads, _), (fused, fused_grads, logps), (uncorrected, _, _) = results
    assert torch.allclose(logps, old, atol=1e-6)
    assert fused.item() == pytest.approx(separate.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(separate_grads, fused_grads))
    assert abs(uncorrected.item() - separate.item()) > 1e-3  # the weights change the loss


class _Record(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


@pytest.mark.parametrize("cls", [GRPOModule, RLOOModule])
def test_a_step_runs_one_forward_and_logs_the_weights_it_used(cls, tiny_model_dir, monkeypatch):
    """A training step with the engine's log-probs: one policy forward (micro_batch_size 4: two; no
    no-grad pass), and ``train/sampling/*`` equal to the weights of the first forward's log-probs,
    recomputed from an identical fresh model."""
    L.seed_everything(0)
    module = _module(cls, tiny_model_dir, micro_batch_size=4)
    module.rollout = engine = LogpsReportingRollout(module.tokenizer)
    calls = []
    forward = module.forward
    monkeypatch.setattr(
        module, "forward", lambda *a, **k: calls.append(torch.is_grad_enabled()) or forward(*a, **k)
    )
    rows = [{"prompt": f"{i}+{i}="} for i in range(2)]
    data = (GRPODataModule if cls is GRPOModule else RLOODataModule)(tiny_model_dir, rows, batch_size=2)
    record = _Record()
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, data)
    assert calls == [True, True]  # two micro-batches of 4, with gradients; no separate pass

    fresh = _module(cls, tiny_model_dir)  # the same initial weights
    input_ids, attention_mask, completion_mask = fresh._pack(engine.last_prompt_ids, engine.last)
    old = fresh._old_per_token_logps(input_ids, attention_mask, completion_mask.size(1), 8)
    sampler = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(lp) for lp in engine.last.logps], batch_first=True
    )
    _, expected = vllm_importance_sampling_ratio(
        old, sampler, completion_mask, level=fresh.vllm_importance_sampling_level,
        mode=fresh.vllm_importance_sampling_mode, cap=fresh.vllm_importance_sampling_cap,
    )  # fmt: skip
    assert expected["sampling/importance_ratio/max"] > 1.5 * expected["sampling/importance_ratio/min"]  # weights differ
    for name, value in expected.items():
        assert record.metrics[f"train/{name}"] == pytest.approx(value.item(), abs=1e-5), name
