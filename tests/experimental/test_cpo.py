"""CPO / SimPO / AlphaPO: loss values derived by hand, summed vs averaged log-probs, data checks, learning."""

import doctest
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_posttrain.callbacks import LearningSignal, ReferenceModel
from lit_posttrain.data import DataFormatError
from lit_posttrain.experimental import cpo
from lit_posttrain.experimental.cpo import LOSS_TYPES, CPODataModule, CPOModule, cpo_loss

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# One pair used by most cases: log-probs chosen -1, rejected -3, so the margin h = 2.
PAIR = (t(-1.0), t(-3.0))


# ---------------------------------------------------------------------------------------------
# Loss values
# ---------------------------------------------------------------------------------------------
def test_zero_margin_values():
    """h = 0 (equal log-probs), beta = 0.5, gamma = 0.5: sigmoid -log sigmoid(0) = ln 2; hinge relu(1 - 0) = 1;
    ipo (0 - 1/(2 beta))^2 = 1/(4 beta^2) = 1; simpo -log sigmoid(beta (0 - gamma/beta)) = -log sigmoid(-gamma)
    = softplus(gamma) = log(1 + e^0.5) ~ 0.9741; alphapo (alpha = 0.5) has the same zero margin, so also softplus(gamma)."""
    logps = t(-0.4, -2.5)
    expected = {
        "sigmoid": math.log(2),
        "hinge": 1.0,
        "ipo": 1 / (4 * 0.5**2),
        "simpo": softplus(0.5),
        "alphapo": softplus(0.5),
    }
    for loss_type, value in expected.items():
        losses, _, _ = cpo_loss(
            logps, logps.clone(), beta=0.5, loss_type=loss_type, simpo_gamma=0.5, alpha=0.5
        )
        assert torch.allclose(losses, torch.full_like(losses, value), atol=1e-12), loss_type
    assert softplus(0.5) == pytest.approx(0.9741, abs=1e-4)


def test_sigmoid_value():
    """beta = 0.5, h = 2: -log sigmoid(1) = log(1 + e^-1) ~ 0.3133; rewards beta * logps = -0.5 and -1.5."""
    losses, chosen_rewards, rejected_rewards = cpo_loss(*PAIR, beta=0.5, loss_type="sigmoid")
    assert losses.item() == pytest.approx(softplus(-1.0), abs=1e-12)
    assert chosen_rewards.item() == pytest.approx(-0.5) and rejected_rewards.item() == pytest.approx(-1.5)


def test_sigmoid_label_smoothing_value():
    """eps = 0.1, beta*h = 1: 0.9 log(1+e^-1) + 0.1 log(1+e) = log(1+e^-1) + 0.1 (as log(1+e) = 1 + log(1+e^-1))."""
    losses, _, _ = cpo_loss(*PAIR, beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    assert losses.item() == pytest.approx(softplus(-1.0) + 0.1, abs=1e-12)


def test_hinge_value():
    """beta = 0.25: relu(1 - beta*h) = relu(1 - 0.5) = 0.5; beta = 0.5 reaches the margin: relu(0) = 0."""
    assert cpo_loss(*PAIR, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)
    assert cpo_loss(*PAIR, beta=0.5, loss_type="hinge")[0].item() == 0.0


def test_ipo_value():
    """beta = 0.5, target 1/(2 beta) = 1, h = 2: (2 - 1)^2 = 1; beta = 0.25, target 2: (2 - 2)^2 = 0."""
    assert cpo_loss(*PAIR, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert cpo_loss(*PAIR, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(0.0)


def test_simpo_value():
    """beta = 0.5, gamma = 0.5, h = 2: -log sigmoid(beta h - gamma) = -log sigmoid(0.5) = log(1 + e^-0.5) ~ 0.4741;
    with eps = 0.1: 0.9 log(1+e^-0.5) + 0.1 log(1+e^0.5) = log(1+e^-0.5) + 0.05."""
    losses, chosen_rewards, _ = cpo_loss(*PAIR, beta=0.5, loss_type="simpo", simpo_gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-0.5), abs=1e-12)
    assert chosen_rewards.item() == pytest.approx(-0.5)  # the margin gamma does not enter the rewards
    smoothed, _, _ = cpo_loss(*PAIR, beta=0.5, loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(softplus(-0.5) + 0.05, abs=1e-12)


def test_alphapo_value():
    """alpha = 0.5, average log-probs -1 and -2: AlphaPO scores (1 - e^(-alpha logp)) / alpha = 2 (1 - e^0.5) ~ -1.29744
    and 2 (1 - e) ~ -3.43656, margin h ~ 2.13912; beta = 0.5, gamma = 0.5: beta h - gamma ~ 0.56956, loss =
    log(1 + e^-0.56956) ~ 0.44838; rewards beta * scores = 1 - e^0.5 ~ -0.64872 and 1 - e ~ -1.71828."""
    losses, chosen_rewards, rejected_rewards = cpo_loss(
        t(-1.0), t(-2.0), beta=0.5, loss_type="alphapo", simpo_gamma=0.5, alpha=0.5
    )
    h = 2 * (1 - math.exp(0.5)) - 2 * (1 - math.e)
    assert losses.item() == pytest.approx(softplus(-(0.5 * h - 0.5)), abs=1e-12)
    assert losses.item() == pytest.approx(0.44838, abs=1e-5)
    assert chosen_rewards.item() == pytest.approx(1 - math.exp(0.5), abs=1e-12)
    assert rejected_rewards.item() == pytest.approx(1 - math.e, abs=1e-12)


def test_alpha_to_zero_is_simpo():
    """AlphaPO's reward (1 - p^-alpha)/alpha -> log p as alpha -> 0: alpha = 1e-7 matches simpo to 1e-6."""
    simpo_losses, simpo_chosen, _ = cpo_loss(*PAIR, beta=0.5, loss_type="simpo")
    alphapo_losses, alphapo_chosen, _ = cpo_loss(*PAIR, beta=0.5, loss_type="alphapo", alpha=1e-7)
    torch.testing.assert_close(alphapo_losses, simpo_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(alphapo_chosen, simpo_chosen, atol=1e-6, rtol=0)


def test_every_loss_type_has_a_value_test():
    """Each loss type in LOSS_TYPES is covered by a hand-derived test above."""
    names = {name.replace("test_", "") for name in globals() if name.startswith("test_")}
    for loss_type in LOSS_TYPES:
        assert any(name.startswith(loss_type + "_value") for name in names), loss_type


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_raise_chosen_and_lower_rejected(loss_type):
    """At zero and small margins a gradient step raises the chosen log-probs and lowers the rejected ones."""
    chosen, rejected = t(-2.0, -3.0).requires_grad_(), t(-2.0, -3.1).requires_grad_()
    alpha = 0.5 if loss_type == "alphapo" else 0.0
    losses, _, _ = cpo_loss(chosen, rejected, beta=0.5, loss_type=loss_type, alpha=alpha)
    losses.mean().backward()
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0), (chosen.grad, rejected.grad)


def test_bad_options_raise_naming_the_key(tiny_model_dir):
    """Unknown loss_type lists the allowed ones; alphapo without alpha says to set alpha (and a typical value);
    label_smoothing with hinge / ipo is refused; the module checks at construction."""
    with pytest.raises(ValueError, match="loss_type must be one of.*sigmoid.*hinge.*ipo.*simpo.*alphapo"):
        cpo_loss(*PAIR, loss_type="dpo")
    with pytest.raises(ValueError, match="alphapo' needs alpha != 0.*alpha: 0.25"):
        cpo_loss(*PAIR, loss_type="alphapo")
    with pytest.raises(ValueError, match="label_smoothing applies to"):
        cpo_loss(*PAIR, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="alphapo' needs alpha"):
        CPOModule(tiny_model_dir, random_init=True, loss_type="alphapo", cpo_alpha=0.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        CPOModule(tiny_model_dir, random_init=True, loss_type="kto")


# ---------------------------------------------------------------------------------------------
# Module: summed or averaged log-probs, the NLL term
# ---------------------------------------------------------------------------------------------
def _naive_completion_logps(model, example, key):
    """Per-token log-probs of one completion from a full, unpadded forward (prompt tokens excluded)."""
    ids = torch.tensor([example["prompt_ids"] + example[key]])
    logps = F.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(example["prompt_ids"]) - 1 :]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_module_sums_or_averages_logps_as_the_loss_type_needs(tiny_model_dir, loss_type):
    """Completions of 2 and 5 tokens: logps/chosen|rejected are sums for sigmoid/hinge and per-token means for
    ipo/simpo/alphapo (against an unpadded full forward); nll_loss is always the pair-mean of the chosen
    completions' mean NLL per token; with cpo_alpha = 0.5, loss = mean(preference losses) + 0.5 * nll_loss."""
    alpha = 0.3 if loss_type == "alphapo" else 0.0
    module = CPOModule(tiny_model_dir, random_init=True, loss_type=loss_type, cpo_alpha=0.5, alpha=alpha)
    module.eval()
    examples = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [13, 1], "rejected_ids": [14, 15, 16, 17, 1]},
        {"prompt_ids": [20, 21, 22, 23], "chosen_ids": [24, 25, 26, 27, 1], "rejected_ids": [28, 1]},
    ]
    batch = cpo.DataCollatorForPreference(pad_token_id=0)(examples)
    with torch.no_grad():
        loss, metrics = module._shared_step(batch)
        naive = {
            key: [_naive_completion_logps(module.model, e, key) for e in examples]
            for key in ("chosen_ids", "rejected_ids")
        }
    reduce = torch.mean if loss_type in ("ipo", "simpo", "alphapo") else torch.sum
    chosen = torch.stack([reduce(x) for x in naive["chosen_ids"]])
    rejected = torch.stack([reduce(x) for x in naive["rejected_ids"]])
    torch.testing.assert_close(metrics["logps/chosen"], chosen.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["logps/rejected"], rejected.mean(), atol=1e-5, rtol=0)
    nll = -torch.stack([x.mean() for x in naive["chosen_ids"]]).mean()
    torch.testing.assert_close(metrics["nll_loss"], nll, atol=1e-5, rtol=0)
    losses, _, _ = cpo_loss(chosen, rejected, loss_type=loss_type, alpha=alpha)
    assert loss.item() == pytest.approx((losses.mean() + 0.5 * nll).item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Collator and data
# ---------------------------------------------------------------------------------------------
def test_collator_docstring_example():
    """The collator's docstring example prints what it shows (tests/test_doctests.py skips experimental modules)."""
    result = doctest.testmod(cpo, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_malformed_row_raises_naming_file_row_column(tiny_model_dir, tmp_path):
    """A row mixing a conversational prompt with a plain completion raises DataFormatError naming file, row, column."""
    path = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "1+1"}], "chosen": [{"role": "assistant", "content": "2"}],
         "rejected": [{"role": "assistant", "content": "3"}]},
        {"prompt": [{"role": "user", "content": "1+2"}], "chosen": [{"role": "assistant", "content": "3"}],
         "rejected": "4"},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataFormatError, match=rf"{path}: row 1, column 'rejected'"):
        CPODataModule(tiny_model_dir, train_data=str(path)).setup()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _fit(module, dm, steps: int) -> tuple[LearningSignal, L.Trainer]:
    signal = LearningSignal(["val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/nll_loss"])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=steps,
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
    return signal, trainer


def _equal_length_rows(name: str) -> list[dict]:
    """The shipped rows with "." appended to the correct two-digit answer, so chosen and rejected have 3 characters."""
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    return [dict(row, chosen=row["chosen"] + ".") for row in rows]


def test_learning_signal_cpo_sigmoid(tiny_model_dir):
    """CPO (sigmoid, cpo_alpha = 1), 20 steps. Summed log-probs favour the shorter completion, and the shipped correct
    answers are one token shorter than the wrong ones (at init the margin is already +0.45 ~ beta ln 128, accuracy 1),
    so the chosen answers get a "." to make both 3 characters + EOS: the held-out margin then rises from ~0 and the
    accuracy from ~0.3 to >= 0.9. Measured: accuracies 0.29 -> 1.0, margins -0.04 -> +0.63, nll_loss 4.83 -> 1.78."""
    L.seed_everything(0)
    module = CPOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = CPODataModule(
        tiny_model_dir,
        train_data=_equal_length_rows("train"),
        val_data=_equal_length_rows("val"),
        batch_size=32,
        max_length=32,
    )
    signal, trainer = _fit(module, dm, steps=20)
    before, after = signal.before, signal.after
    assert abs(before["val/rewards/margins"]) < 0.2 and before["val/rewards/accuracies"] < 0.75
    assert after["val/rewards/accuracies"] >= 0.9 and after["val/rewards/margins"] > 0.3
    assert after["val/nll_loss"] < before["val/nll_loss"] - 1.0  # the behaviour-cloning term works too
    for name in ("rewards/chosen", "rewards/rejected", "logps/rejected", "logits/chosen", "entropy"):
        assert math.isfinite(trainer.callback_metrics[f"val/{name}"]), name


def test_learning_signal_simpo(tiny_model_dir):
    """SimPO (loss_type simpo, cpo_alpha = 0, beta = 2, gamma = 1) on the shipped data, 20 steps: average log-probs
    are equal at init, so the held-out margin starts near 0 and accuracy near 0.3, then accuracy >= 0.9 and margin > 1.
    Measured: accuracies 0.31 -> 1.0, margins -0.19 -> +2.68, loss 1.47 -> 0.28."""
    L.seed_everything(0)
    module = CPOModule(
        tiny_model_dir,
        random_init=True,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=2.0,
        simpo_gamma=1.0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    dm = CPODataModule(
        tiny_model_dir,
        train_data=str(DATA / "train.jsonl"),
        val_data=str(DATA / "val.jsonl"),
        batch_size=32,
        max_length=32,
    )
    signal, _ = _fit(module, dm, steps=20)
    before, after = signal.before, signal.after
    assert abs(before["val/rewards/margins"]) < 0.5 and before["val/rewards/accuracies"] < 0.75
    assert after["val/rewards/accuracies"] >= 0.9 and after["val/rewards/margins"] > 1.0
    assert after["val/loss"] < before["val/loss"] - 0.5
