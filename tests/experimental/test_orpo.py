"""ORPO: the odds-ratio loss derived by hand, its numerical stability, the NLL's tokens, data checks, learning."""

import doctest
import importlib
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_posttrain import LitPosttrainExperimentalWarning
from lit_posttrain.callbacks import LearningSignal, ReferenceModel
from lit_posttrain.data import DataFormatError
from lit_posttrain.experimental import orpo
from lit_posttrain.experimental.orpo import ORPODataModule, ORPOModule, orpo_loss

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Loss values
# ---------------------------------------------------------------------------------------------
def test_equal_odds_gives_beta_log2():
    """c == r: the log odds ratio is 0 and the odds-ratio term is -beta log sigmoid(0) = beta ln 2, whatever c is."""
    logps = t(-0.01, -0.7, -3.0, -20.0)
    losses, log_odds = orpo_loss(logps, logps.clone(), beta=0.3)
    assert torch.all(log_odds == 0)
    assert torch.allclose(losses, torch.full_like(losses, 0.3 * math.log(2)), atol=1e-12)


def test_log_odds_hand_value():
    """P_w = 0.5, P_l = 0.2: odds 0.5/0.5 = 1 and 0.2/0.8 = 1/4, log odds ratio = log 4 ~ 1.3863;
    loss = -beta log sigmoid(log 4) = beta log(1 + 1/4) = 0.1 log 1.25 ~ 0.022314."""
    losses, log_odds = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(4), abs=1e-12)
    assert losses.item() == pytest.approx(0.1 * math.log(1.25), abs=1e-12)
    assert losses.item() == pytest.approx(0.022314, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stable_near_zero_and_very_negative(dtype):
    """Average log-probs -1e-6 (P ~ 1) and -50 (P ~ 0), in float32 and bfloat16 inputs: finite values and gradients,
    and the value of the exact formula. c = -1e-6, r = -50: log(1 - e^c) ~ log(1e-6) = -13.8155, log(1 - e^r) ~ -2e-22,
    so log odds ratio ~ (-1e-6 + 50) + 13.8155 = 63.8155; swapped it is -63.8155. The naive log1p(-exp(c)) in
    float32 rounds e^-1e-6 and gives -13.8023 (error 0.013, beyond the 1e-3 checked)."""
    chosen = torch.tensor([-1e-6, -50.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-50.0, -1e-6], dtype=dtype, requires_grad=True)
    losses, log_odds = orpo_loss(chosen, rejected, beta=0.1)
    assert losses.dtype == torch.float32  # computed in float32 even from bfloat16 log-probs
    c64, r64 = chosen.detach().double(), rejected.detach().double()  # the inputs as rounded to dtype
    exact = (c64 - r64) - (torch.log(-torch.expm1(c64)) - torch.log(-torch.expm1(r64)))
    torch.testing.assert_close(log_odds.double(), exact, rtol=1e-5, atol=1e-4)
    if dtype == torch.float32:
        assert log_odds.tolist() == pytest.approx([63.8155, -63.8155], abs=1e-3)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_certain_or_empty_completion_is_finite():
    """An average log-prob of exactly 0 (P = 1: an empty completion averages 0 / 1) gives a finite loss and gradient
    instead of log(0) = -inf and NaN."""
    chosen, rejected = t(0.0, -1.0).float().requires_grad_(), t(-1.0, 0.0).float().requires_grad_()
    losses, log_odds = orpo_loss(chosen, rejected)
    losses.sum().backward()
    assert torch.isfinite(log_odds).all() and torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_gradients_raise_chosen_and_lower_rejected():
    """A gradient step on the odds-ratio term raises the chosen log-probs and lowers the rejected ones, also at equal
    odds (d loss / d c = -beta sigmoid(-0) / (1 - P_c) < 0 there)."""
    chosen, rejected = t(-0.5, -2.0, -1.0).requires_grad_(), t(-1.5, -0.5, -1.0).requires_grad_()
    orpo_loss(chosen, rejected, beta=0.1)[0].sum().backward()
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)


# ---------------------------------------------------------------------------------------------
# Module: the NLL term and the whole loss
# ---------------------------------------------------------------------------------------------
def _naive_completion_logps(model, example, key):
    """Per-token log-probs of one completion from a full, unpadded forward (prompt tokens excluded)."""
    ids = torch.tensor([example["prompt_ids"] + example[key]])
    logps = F.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(example["prompt_ids"]) - 1 :]


def test_loss_is_completion_nll_plus_beta_log2_at_equal_odds(tiny_model_dir):
    """With chosen == rejected the odds are equal, so loss = nll_loss + beta ln 2; nll_loss is the pair-mean of each
    chosen completion's mean NLL per token, completion tokens only (checked against an unpadded full forward)."""
    module = ORPOModule(tiny_model_dir, random_init=True, beta=0.25).eval()
    examples = [
        {"prompt_ids": [5, 6, 7, 8, 9], "chosen_ids": [13, 14, 1], "rejected_ids": [13, 14, 1]},
        {"prompt_ids": [20, 21], "chosen_ids": [22, 23, 24, 25, 1], "rejected_ids": [22, 23, 24, 25, 1]},
    ]
    batch = orpo.DataCollatorForPreference(pad_token_id=0)(examples)
    with torch.no_grad():
        loss, metrics = module._shared_step(batch)
        naive = [-_naive_completion_logps(module.model, e, "chosen_ids").mean() for e in examples]
    expected_nll = (naive[0] + naive[1]) / 2  # each pair's mean over its 3 and 5 tokens, then the pair mean
    torch.testing.assert_close(metrics["nll_loss"], expected_nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["logps/chosen"], -expected_nll, atol=1e-5, rtol=0)
    assert metrics["log_odds_chosen"].abs().item() < 1e-5 and metrics["rewards/margins"].abs().item() < 1e-6
    assert loss.item() == pytest.approx(metrics["nll_loss"].item() + 0.25 * math.log(2), abs=1e-5)


def _one_step(tiny_model_dir, batch_size: int, accumulate: int) -> tuple[ORPOModule, float]:
    """One SGD step (lr 1) on the first 12 shipped validation pairs, as micro-batches of batch_size."""
    L.seed_everything(0)
    rows = [json.loads(line) for line in (DATA / "val.jsonl").read_text().splitlines()[:12]]
    module = ORPOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    dm = ORPODataModule(tiny_model_dir, train_data=rows, batch_size=batch_size, max_length=32)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    return module, float(trainer.callback_metrics["train/loss"])


def test_gradient_accumulation_does_not_change_the_step(tiny_model_dir):
    """12 pairs as one micro-batch of 12, or as unequal accumulated micro-batches of 8 and 4 (the same rows: the
    shuffle is seeded per epoch), give the same update and logged loss: both terms are pair means over the optimizer
    step (Lightning alone would average the two micro-batch means, weighing the 4 pairs twice as much)."""
    whole, whole_loss = _one_step(tiny_model_dir, batch_size=12, accumulate=1)
    split, split_loss = _one_step(tiny_model_dir, batch_size=8, accumulate=2)
    assert split_loss == pytest.approx(whole_loss, abs=1e-5)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# Collator and data
# ---------------------------------------------------------------------------------------------
def test_collator_docstring_example():
    """The collator's docstring example prints what it shows (tests/test_doctests.py skips experimental modules)."""
    result = doctest.testmod(orpo, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_malformed_row_raises_before_training(tiny_model_dir, tmp_path):
    """A malformed row in a file raises DataFormatError naming the file, row and column, before any training step."""
    path = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2=", "chosen": "", "rejected": "4"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    module = ORPOModule(tiny_model_dir, random_init=True)
    dm = ORPODataModule(tiny_model_dir, train_data=str(path))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(DataFormatError, match=rf"{path}: row 1, column 'chosen'"):
        trainer.fit(module, dm)
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def test_learning_signal_reward_accuracy(tiny_model_dir):
    """ORPO on the tiny random-init model and the shipped data, 20 steps, no reference model: held-out reward accuracy
    rises from ~0.3 to >= 0.9 and the margin from ~0 (average log-probs are equal at init); measured 0.31 -> 0.98,
    margins -0.010 -> +0.036 (beta = 0.1 times average log-probs), nll_loss 4.83 -> 2.04 (about 8 s idle)."""
    L.seed_everything(0)
    module = ORPOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = ORPODataModule(
        tiny_model_dir,
        train_data=str(DATA / "train.jsonl"),
        val_data=str(DATA / "val.jsonl"),
        batch_size=32,
        max_length=32,
    )
    signal = LearningSignal(["val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/nll_loss"])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        val_check_interval=20,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=-1,
        limit_val_batches=4,  # 128 held-out pairs
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[signal],
    )
    trainer.fit(module, dm)
    assert not any(isinstance(cb, ReferenceModel) for cb in trainer.callbacks)
    before, after = signal.before, signal.after
    assert abs(before["val/rewards/margins"]) < 0.05 and before["val/rewards/accuracies"] < 0.75
    assert after["val/rewards/accuracies"] >= 0.9
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.02
    assert after["val/nll_loss"] < before["val/nll_loss"] - 1.0
    metrics = trainer.callback_metrics
    for name in ("log_odds_ratio", "log_odds_chosen", "logits/chosen", "logits/rejected", "entropy"):
        assert math.isfinite(metrics[f"val/{name}"]), name
    assert metrics["train/grad_norm"] > 0 and metrics["train/learning_rate"] == pytest.approx(1e-3)
    assert metrics["val/log_odds_chosen"] > 0  # the chosen answers now have the higher odds
    # every pair is "ab+cd=" + 2 digits + EOS (9 tokens) and "ab+cd=" + 3 digits + EOS (10 tokens)
    assert metrics["train/num_tokens"] == 20 * 32 * (9 + 10)


def test_import_warns_experimental(monkeypatch):
    """Importing the module warns once with LitPosttrainExperimentalWarning unless silenced."""
    monkeypatch.delenv("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", raising=False)
    with pytest.warns(LitPosttrainExperimentalWarning, match=r"experimental\.orpo is experimental"):
        importlib.reload(orpo)
