"""Micro-batch x accumulation invariance: an optimizer step over 4 micro-batches of 1 equals one
over 1 batch of 4, for the update and for every logged training metric. SFT, DPO and reward
modeling accumulate with Lightning's ``accumulate_grad_batches`` (losses normalised by the whole
step's tokens / pairs; metrics summed over the step's micro-batches before Lightning logs the
last one); GRPO splits its generation batch with ``micro_batch_size``.

The examples have unequal lengths, so per-micro-batch means would differ from the step's mean.
Tolerance: the micro-batches are padded differently from the full batch, so float32 rounding
differs (measured ~1e-7 relative); we allow 1e-5.
"""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_posttrain import (
    DPODataModule,
    DPOModule,
    GRPODataModule,
    GRPOModule,
    RewardDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
)
from lit_posttrain.rewards import PatternFractionReward

SFT_ROWS = [{"text": "a" * n} for n in (3, 9, 5, 14)]
PAIR_ROWS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "33333"},
    {"prompt": "14+25=", "chosen": "39", "rejected": "9"},
    {"prompt": "7+7=", "chosen": "14", "rejected": "1444"},
    {"prompt": "30+12=", "chosen": "42", "rejected": "402"},
]
# KTO: 3 of 4 rows desirable, so the reference point z_ref of the second step is positive
KTO_ROWS = [
    {"prompt": "1+2=", "completion": "3", "label": True},
    {"prompt": "14+25=", "completion": "39", "label": True},
    {"prompt": "7+7=", "completion": "1444", "label": False},
    {"prompt": "30+12=", "completion": "42", "label": True},
]


def _fit(module, datamodule, tmp_path, name, **trainer_kwargs):
    """-> (flat parameters after training, logged rows by step)."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name=name),
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = {
            int(row.pop("step")): {k: float(v) for k, v in row.items() if k.startswith("train/") and v}
            for row in csv.DictReader(f)
        }
    return torch.cat([p.detach().flatten() for p in module.model.parameters()]), rows


def _assert_same(a, b):
    (params_a, rows_a), (params_b, rows_b) = a, b
    torch.testing.assert_close(params_b, params_a, atol=1e-6, rtol=1e-5)
    assert rows_a.keys() == rows_b.keys() and rows_a
    for step in rows_a:
        assert rows_a[step].keys() == rows_b[step].keys()
        for name, value in rows_a[step].items():
            assert rows_b[step][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, name)


def _build(method, tiny_model_dir, batch_size):
    sgd = lambda p: torch.optim.SGD(p, lr=0.5)  # a plain step: the gradient itself
    if method == "sft":
        module = SFTModule(tiny_model_dir, random_init=True, optimizer=sgd)
        return module, SFTDataModule(
            tiny_model_dir, train_data=SFT_ROWS, batch_size=batch_size, max_length=32
        )
    if method == "dpo":
        # reference-free: with a reference, step 0 has policy == reference, every implicit reward
        # is 0 up to rounding, and rewards/accuracies would compare the rounding of two paddings
        module = DPOModule(tiny_model_dir, random_init=True, beta=1.0, reference_free=True, optimizer=sgd)
        return module, DPODataModule(
            tiny_model_dir, train_data=PAIR_ROWS, batch_size=batch_size, max_length=32
        )
    if method == "kto":
        from lit_posttrain.stable.kto import KTODataModule, KTOModule

        module = KTOModule(tiny_model_dir, random_init=True, beta=1.0, desirable_weight=0.4, optimizer=sgd)
        return module, KTODataModule(tiny_model_dir, train_data=KTO_ROWS, batch_size=batch_size, max_length=32)
    if method == "bco":
        from lit_posttrain.experimental.bco import BCODataModule, BCOModule

        module = BCOModule(tiny_model_dir, random_init=True, beta=1.0, optimizer=sgd)
        return module, BCODataModule(tiny_model_dir, train_data=KTO_ROWS, batch_size=batch_size, max_length=32)
    module = RewardModule(tiny_model_dir, random_init=True, optimizer=sgd)
    return module, RewardDataModule(
        tiny_model_dir, train_data=PAIR_ROWS, batch_size=batch_size, max_length=32
    )


@pytest.mark.parametrize("method", ["sft", "dpo", "reward", "kto", "bco"])
def test_accumulation_4x1_equals_1x4(method, tiny_model_dir, tmp_path):
    """2 optimizer steps (2 epochs of the 4 examples) of batch 4 x accumulation 1 and batch 1 x
    accumulation 4 give the same parameters and log the same loss and metrics at every step."""
    runs = []
    for batch_size, accumulate in ((4, 1), (1, 4)):
        module, data = _build(method, tiny_model_dir, batch_size)
        runs.append(
            _fit(
                module,
                data,
                tmp_path,
                f"{method}-{batch_size}x{accumulate}",
                max_steps=2,
                accumulate_grad_batches=accumulate,
            )
        )
    initial = torch.cat(
        [p.detach().flatten() for p in _build(method, tiny_model_dir, 4)[0].model.parameters()]
    )
    assert not torch.allclose(runs[0][0], initial)  # the steps did something
    _assert_same(*runs)
    if method in ("kto", "bco"):  # the whole step's z_ref / delta, taken at its first micro-batch
        name = "train/kl" if method == "kto" else "train/delta"
        assert abs(runs[0][1][1][name]) > 0.01, runs[0][1][1]


def test_grpo_micro_batches_do_not_change_update_or_metrics(tiny_model_dir, tmp_path):
    """GRPO (``dapo``: normalised by the tokens of the whole optimizer step): 2 generation batches of
    2 prompts x 4 completions, as 1 micro-batch of 8 or 4 micro-batches of 2. The same seed draws
    the same completions; parameters and every logged metric (token-weighted entropy, clip ratios)
    agree."""
    rows = [{"prompt": f"Digits only: {i}+{i % 7}="} for i in range(4)]
    runs = []
    for micro_batch_size in (None, 2):
        L.seed_everything(0)  # the module's sampling generator is seeded from it
        module = GRPOModule(
            tiny_model_dir,
            random_init=True,
            reward_funcs=[PatternFractionReward(pattern="[0-9]")],
            num_generations=4,
            max_completion_length=8,
            micro_batch_size=micro_batch_size,
            max_grad_norm=None,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        )
        data = GRPODataModule(tiny_model_dir, train_data=rows, batch_size=2)
        runs.append(_fit(module, data, tmp_path, f"grpo-{micro_batch_size}", max_steps=2))
    assert runs[0][1][1]["train/completions/mean_length"] > 0
    _assert_same(*runs)
