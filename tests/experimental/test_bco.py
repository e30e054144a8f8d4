"""BCO (experimental): loss values derived by hand, the reward shift delta, data checks, learning."""

import doctest
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain.callbacks import LearningSignal
from lit_posttrain.data import DataFormatError
from lit_posttrain.experimental import bco
from lit_posttrain.experimental.bco import BCODataModule, BCOModule, bco_loss

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# Policy logps -1 and -3, reference -2 and -2: log-ratios +1 and -1; the first row desirable, the second not.
ROWS = (t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]))


def test_collator_docstring_example():
    """The collator's docstring example prints what it shows (experimental modules are outside test_doctests.py)."""
    result = doctest.testmod(bco, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_bco_value():
    """beta = 0.5: rewards (0.5, -0.5); delta = 0.25: desirable -log s(0.5 - 0.25) = log(1 + e^-0.25) ~ 0.57594,
    undesirable -log s(-(-0.5 - 0.25)) = log(1 + e^-0.75) ~ 0.38687."""
    losses, rewards = bco_loss(*ROWS, 0.25, beta=0.5)
    assert torch.allclose(losses, t(softplus(-0.25), softplus(-0.75)), atol=1e-12)
    assert losses.tolist() == pytest.approx([0.57594, 0.38687], abs=1e-5)
    assert rewards.tolist() == [0.5, -0.5]


def test_policy_equals_reference_is_log2():
    """Policy == reference and delta = 0: every row's loss is -log sigmoid(0) = log 2, whatever its label."""
    logps = t(-3.0, -7.5, -0.25)
    losses, rewards = bco_loss(logps, logps, torch.tensor([True, False, True]), 0.0, beta=0.3)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2))) and torch.all(rewards == 0)


def test_gradients_raise_desirable_and_lower_undesirable():
    """At policy == reference, a gradient step raises the desirable rows' log-probs and lowers the undesirable ones'."""
    logps = t(-2.0, -3.0, -2.5, -4.0).requires_grad_()
    labels = torch.tensor([True, False, True, False])
    losses, _ = bco_loss(logps, logps.detach().clone(), labels, 0.1, beta=0.5)
    losses.mean().backward()
    assert torch.all(logps.grad[labels] < 0) and torch.all(logps.grad[~labels] > 0), logps.grad


def test_delta_is_the_running_mean_updated_before_use(tiny_model_dir):
    """Two training batches whose rewards are set by hand (the reference log-probs given as the precomputed column):
    batch 1 rewards (0.2, -0.4) -> delta = -0.1 before its loss; batch 2 rewards (0.5, 0.3, 0.1) -> delta =
    (0.2 - 0.4 + 0.5 + 0.3 + 0.1) / 5 = 0.14, and batch 2's loss uses 0.14:
    -log s(0.5 - 0.14), -log s(-(0.3 - 0.14)), -log s(-(0.1 - 0.14)) (desirable, undesirable, undesirable):
    mean(log(1 + e^-0.36), log(1 + e^0.16), log(1 + e^-0.04)) ~ (0.52926 + 0.77634 + 0.67335) / 3 ~ 0.65965."""
    module = BCOModule(tiny_model_dir, random_init=True, beta=0.5)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)  # a single-process strategy to reduce with
    dm = BCODataModule(tiny_model_dir, train_data=[{"prompt": "1+1=", "completion": "2", "label": True}])

    def batch(rewards, labels):
        examples = [
            {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 1][: 1 + i % 3], "label": label}
            for i, label in enumerate(labels)
        ]
        rows = dm.collator(examples)
        with torch.no_grad():
            logps, _, _ = module.completion_logps(rows["input_ids"], rows["attention_mask"], rows["completion_mask"])
        rows["ref_logps"] = logps - torch.tensor(rewards) / 0.5  # so that beta * (logps - ref_logps) = rewards
        return rows

    first = batch([0.2, -0.4], [True, False])
    _, metrics = module._shared_step(first, update_running_stats=True)
    assert module.delta.item() == pytest.approx(-0.1, abs=1e-6)
    assert metrics["delta"].item() == pytest.approx(-0.1, abs=1e-6)
    assert module.num_rewards.item() == 2
    second = batch([0.5, 0.3, 0.1], [True, False, False])
    loss, metrics = module._shared_step(second, update_running_stats=True)
    assert module.delta.item() == pytest.approx(0.14, abs=1e-6) and module.num_rewards.item() == 5
    expected = (softplus(-0.36) + softplus(0.16) + softplus(-0.04)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    _, metrics = module._shared_step(first, update_running_stats=False)  # validation reads delta, does not move it
    assert module.delta.item() == pytest.approx(0.14, abs=1e-6) and module.num_rewards.item() == 5
    assert "delta" in module.state_dict() and "num_rewards" in module.state_dict()  # checkpointed


def test_malformed_row_names_file_row_and_column(tiny_tokenizer, tmp_path):
    """A non-bool label raises DataFormatError naming the file, the row and the column, in setup."""
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"prompt": "1+1=", "completion": "2", "label": true}\n{"prompt": "1+2=", "completion": "3", "label": "no"}\n'
    )
    with pytest.raises(DataFormatError, match=rf"{path}: row 1, column 'label': expected true or false"):
        BCODataModule(tiny_tokenizer, train_data=str(path)).setup()


def test_learning_signal_held_out_margins(tiny_model_dir):
    """BCO on the tiny random-init model and the shipped pairs (unpaired): held-out rewards start at 0 (loss log 2,
    margin 0) and after 10 steps of 16 rows the held-out desirable rows' mean reward is clearly above the
    undesirable rows' (measured: val/rewards/margins 0 -> 0.24, val/loss 0.693 -> 0.642, val/delta 0 -> -0.40)."""
    L.seed_everything(0)
    module = BCOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = BCODataModule(
        tiny_model_dir,
        train_data=str(DATA / "train.jsonl"),
        val_data=str(DATA / "val.jsonl"),
        batch_size=16,
        max_length=32,
    )
    signal = LearningSignal(["val/loss", "val/rewards/margins", "val/delta"])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=-1,
        limit_val_batches=8,  # 128 held-out rows
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[signal],
    )
    trainer.fit(module, dm)
    assert signal.before["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(signal.before["val/rewards/margins"]) < 1e-5 and signal.before["val/delta"] == 0.0
    assert signal.after["val/rewards/margins"] > 0.15
    assert signal.after["val/loss"] < signal.before["val/loss"] - 0.02
    # delta: the mean of all 10 x 16 training rewards (the rows' log-probs fell during training)
    assert signal.after["val/delta"] < -0.1 and module.num_rewards.item() == 10 * 16


def test_import_warns_experimental(monkeypatch):
    """Importing the module warns once with LitPosttrainExperimentalWarning (the test environment silences it;
    here it is unset and the module re-imported)."""
    import importlib

    from lit_posttrain import LitPosttrainExperimentalWarning

    monkeypatch.delenv("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", raising=False)
    with pytest.warns(LitPosttrainExperimentalWarning, match="lit_posttrain.experimental.bco is experimental"):
        importlib.reload(bco)
