"""KTO: loss values derived by hand, the reference point, data (unpairing, mismatched rows, checks), learning."""

import csv
import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_posttrain.callbacks import LearningSignal, ReferenceModel
from lit_posttrain.data import DataFormatError
from lit_posttrain.stable.kto import KTODataModule, KTOModule, _warn_if_unbalanced, kto_kl, kto_loss

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# Two rows used by most cases: policy logps -1 and -3, reference -2 and -2, so the log-ratios are
# r = +1 and r = -1; the first row is desirable, the second undesirable.
ROWS = (t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]))


# ---------------------------------------------------------------------------------------------
# Loss values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_policy_equals_reference_is_half_the_weight(loss_type):
    """Policy == reference and z_ref = 0: every row's loss is 1 - sigmoid(0) = 0.5 (or sigmoid(0) = 0.5) times its
    label's weight: desirable x 2.0 = 1.0, undesirable x 3.0 = 1.5; the rewards are 0."""
    logps = t(-3.0, -7.5, -0.25, -1.0)
    labels = torch.tensor([True, False, True, False])
    losses, rewards = kto_loss(
        logps, logps, labels, 0.0, beta=0.3, desirable_weight=2.0, undesirable_weight=3.0, loss_type=loss_type
    )
    assert torch.allclose(losses, t(1.0, 1.5, 1.0, 1.5)) and torch.all(rewards == 0)


def test_kto_value_with_reference_point():
    """beta = 0.5, z_ref = 0.4: desirable r = 1: 1 - s(0.5 (1 - 0.4)) = s(-0.3) ~ 0.42556; undesirable r = -1:
    1 - s(0.5 (0.4 + 1)) = s(-0.7) ~ 0.33181; rewards beta * r = (0.5, -0.5)."""
    losses, rewards = kto_loss(*ROWS, 0.4, beta=0.5)
    assert torch.allclose(losses, t(sigmoid(-0.3), sigmoid(-0.7)), atol=1e-12)
    assert losses.tolist() == pytest.approx([0.42556, 0.33181], abs=1e-5)
    assert rewards.tolist() == [0.5, -0.5]


def test_kto_value_labels_swapped():
    """The same rows with the labels swapped: desirable r = -1: s(-0.5 (-1 - 0.4)) = s(0.7) ~ 0.66819 (the rows keep
    their input order); undesirable r = 1: 1 - s(0.5 (0.4 - 1)) = s(0.3) ~ 0.57444."""
    logps, ref_logps, labels = ROWS
    losses, _ = kto_loss(logps, ref_logps, ~labels, 0.4, beta=0.5)
    assert torch.allclose(losses, t(sigmoid(0.3), sigmoid(0.7)), atol=1e-12)


def test_apo_zero_unpaired_value_ignores_reference_point():
    """beta = 0.5, both log-ratios r = 1: desirable 1 - s(0.5) = s(-0.5) ~ 0.37754, undesirable s(0.5) ~ 0.62246;
    z_ref plays no part (5.0 or 0.0 give the same)."""
    labels = torch.tensor([True, False])
    for kl in (0.0, 5.0):
        losses, _ = kto_loss(t(-1.0, -1.0), t(-2.0, -2.0), labels, kl, beta=0.5, loss_type="apo_zero_unpaired")
        assert torch.allclose(losses, t(sigmoid(-0.5), sigmoid(0.5)), atol=1e-12)


def test_weights_multiply_each_label():
    """desirable_weight 2 and undesirable_weight 0.5 scale the hand-derived values above: 2 s(-0.3), 0.5 s(-0.7)."""
    losses, _ = kto_loss(*ROWS, 0.4, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    assert torch.allclose(losses, t(2 * sigmoid(-0.3), 0.5 * sigmoid(-0.7)), atol=1e-12)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_gradients_raise_desirable_and_lower_undesirable(loss_type):
    """At policy == reference (z_ref 0.2), a gradient step raises the desirable rows' log-probs and lowers the
    undesirable ones'."""
    logps = t(-2.0, -3.0, -2.5, -4.0).requires_grad_()
    labels = torch.tensor([True, False, True, False])
    losses, _ = kto_loss(logps, logps.detach().clone(), labels, 0.2, beta=0.5, loss_type=loss_type)
    losses.mean().backward()
    assert torch.all(logps.grad[labels] < 0) and torch.all(logps.grad[~labels] > 0), logps.grad


def test_unknown_loss_type_names_allowed_values(tiny_model_dir):
    """An unknown loss type raises ValueError listing the allowed ones (from the function and the module)."""
    with pytest.raises(ValueError, match="kto.*apo_zero_unpaired"):
        kto_loss(*ROWS, 0.0, loss_type="sigmoid")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        KTOModule(tiny_model_dir, random_init=True, loss_type="bco")


def test_apo_zero_unpaired_module_has_no_reference_point(tiny_model_dir):
    """With loss_type apo_zero_unpaired the module's z_ref is 0 and runs no forward (it reads no rows at all)."""
    module = KTOModule(tiny_model_dir, random_init=True, loss_type="apo_zero_unpaired")
    assert module.estimate_kl([{}]).item() == 0.0


def test_kl_is_a_clamped_detached_mean():
    """z_ref = max(0, mean(policy - reference)): (1, 3) - (0, 0) gives 2; (-1, -2) - (0, 0) gives 0 (clamped);
    no gradient flows through it; the mean of the rows equals the difference of their means (what the module
    passes after reducing over ranks)."""
    policy = t(1.0, 3.0).requires_grad_()
    kl = kto_kl(policy, t(0.0, 0.0))
    assert kl.item() == 2.0 and not kl.requires_grad
    assert kto_kl(t(-1.0, -2.0), t(0.0, 0.0)).item() == 0.0
    assert kto_kl(t(-1.5, 0.5), t(-3.0, -2.0)).item() == kto_kl(t(-0.5), t(-2.5)).item() == 2.0


def test_unbalanced_data_warns_with_the_recommended_range():
    """Eq. 8: 3 desirable and 1 undesirable rows with weights 1 give 3 / 1 = 3, outside [1, 4/3]: the warning
    names desirable_weight in [1/3, 4/9] or undesirable_weight in [9/4, 3]. 4 vs 3 (ratio 4/3) and 1 vs 1 pass."""
    expected = r"= 3\.000.*desirable_weight in \[0\.333, 0\.444\].*undesirable_weight in \[2\.25, 3\]"
    with pytest.warns(UserWarning, match=expected):
        _warn_if_unbalanced(3, 1, 1.0, 1.0)
    with pytest.warns(UserWarning, match="0 undesirable"):
        _warn_if_unbalanced(5, 0, 1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_unbalanced(4, 3, 1.0, 1.0)
        _warn_if_unbalanced(1, 1, 1.0, 1.0)
        _warn_if_unbalanced(3, 1, 0.4, 1.0)  # 1.2


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_pairs_are_unpaired_and_mismatched_rows_are_other_rows(tiny_tokenizer):
    """Each pair gives a desirable (chosen) and an undesirable (rejected) row; every row's mismatched completion is
    another row's completion, each completion used once (one rotation over a seeded shuffle)."""
    rows = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1) * 3} for i in range(1, 7)]
    dm = KTODataModule(tiny_tokenizer, train_data=rows, seed=3)
    dm.setup()
    examples = dm.examples["train"]
    decode = tiny_tokenizer.decode
    assert [e["label"] for e in examples] == [True, False] * 6
    assert decode(examples[0]["prompt_ids"]) == "1+1=" and decode(examples[0]["completion_ids"]) == "2<|endoftext|>"
    assert decode(examples[1]["completion_ids"]) == "333<|endoftext|>"
    partners = [next(j for j, o in enumerate(examples) if o["completion_ids"] is e["kl_completion_ids"]) for e in examples]
    assert sorted(partners) == list(range(12)) and all(j != i for i, j in enumerate(partners))
    # one cycle through all rows: following partners from row 0 visits every row
    seen, i = set(), 0
    while i not in seen:
        seen.add(i)
        i = partners[i]
    assert len(seen) == 12


def test_conversational_pairs_with_implicit_prompt(tiny_tokenizer):
    """Conversational chosen/rejected without a prompt column: the shared user turn is the prompt, the assistant
    turns are the completions; explicit unpaired conversational rows tokenize the same way."""
    user = {"role": "user", "content": "1+2"}
    chat = [
        {
            "chosen": [user, {"role": "assistant", "content": "3"}],
            "rejected": [user, {"role": "assistant", "content": "4"}],
        }
    ]
    dm = KTODataModule(tiny_tokenizer, train_data=chat)
    dm.setup()
    desirable, undesirable = dm.examples["train"]
    decode = tiny_tokenizer.decode
    assert decode(desirable["prompt_ids"]) == "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n"
    assert decode(desirable["completion_ids"]) == "3<|im_end|>\n" and desirable["label"] is True
    assert decode(undesirable["completion_ids"]) == "4<|im_end|>\n" and undesirable["label"] is False
    unpaired = [{"prompt": [user], "completion": [{"role": "assistant", "content": "3"}], "label": True}]
    dm = KTODataModule(tiny_tokenizer, train_data=unpaired)
    dm.setup()
    (example,) = dm.examples["train"]
    assert example["prompt_ids"] == desirable["prompt_ids"] and example["completion_ids"] == desirable["completion_ids"]


GOOD = {"prompt": "1+1=", "completion": "2", "label": True}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"prompt": "1+2=", "completion": "3"}, r"row 2, column 'label': expected true or false, got None"),
        ({"prompt": "1+2=", "completion": "3", "label": "yes"}, r"row 2, column 'label': expected true or false, got 'yes'"),
        ({"prompt": "1+2=", "completion": "3", "label": 1}, r"row 2, column 'label': expected true or false, got 1"),
        ({"prompt": "1+2=", "completion": "", "label": False}, r"row 2, column 'completion': expected a non-empty"),
    ],
)
def test_malformed_row_names_file_row_and_column(tiny_tokenizer, tmp_path, bad, match):
    """A missing or non-bool label, or an empty completion, raises DataFormatError naming the file, row and column."""
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [GOOD, GOOD, bad, GOOD]) + "\n")
    with pytest.raises(DataFormatError, match=rf"{path}: {match}"):
        KTODataModule(tiny_tokenizer, train_data=str(path)).setup()


def test_missing_label_column_stops_fit_before_training(tiny_model_dir, tmp_path):
    """Rows without any label column stop trainer.fit in setup, naming the file and the column, before a step."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(DataFormatError, match=rf"{path}: missing column\(s\) \['label'\]"):
        trainer.fit(KTOModule(tiny_model_dir, random_init=True), KTODataModule(tiny_model_dir, train_data=str(path)))
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def test_learning_signal_held_out_margins(tiny_model_dir):
    """KTO on the tiny random-init model and the shipped pairs (unpaired): held-out rewards start at 0 (policy ==
    reference: loss 0.5, margin 0) and after 10 steps of 16 rows the held-out desirable rows' mean reward is clearly
    above the undesirable rows' (measured: val/rewards/margins 0 -> 0.33, val/loss 0.5 -> 0.467)."""
    L.seed_everything(0)
    module = KTOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = KTODataModule(
        tiny_model_dir,
        train_data=str(DATA / "train.jsonl"),
        val_data=str(DATA / "val.jsonl"),
        batch_size=16,
        max_length=32,
    )
    signal = LearningSignal(["val/loss", "val/rewards/margins", "val/kl"])
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
    assert [type(cb) for cb in trainer.callbacks].count(ReferenceModel) == 1  # added by configure_callbacks
    assert signal.before["val/loss"] == pytest.approx(0.5, abs=1e-6)
    # 0 up to rounding before training (policy and reference forwards may round differently in the last bits)
    assert abs(signal.before["val/rewards/margins"]) < 1e-5 and abs(signal.before["val/kl"]) < 1e-5
    assert signal.after["val/rewards/margins"] > 0.15
    assert signal.after["val/loss"] < signal.before["val/loss"] - 0.01
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "entropy", "kl"):
        assert math.isfinite(trainer.callback_metrics[f"val/{name}"]), name
    # every pair is "ab+cd=" + 2 digits + EOS (9 tokens) and "ab+cd=" + 3 digits + EOS (10 tokens): 16 rows of
    # 9 or 10 tokens per step
    assert 10 * 16 * 9 < trainer.callback_metrics["train/num_tokens"] < 10 * 16 * 10


def _fit_rows(tiny_model_dir, tmp_path, name, rows, callbacks=()):
    """2 optimizer steps of 4 rows x accumulation 2 on ``rows``; -> (logged training rows by step, trainer)."""
    L.seed_everything(0)
    module = KTOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    dm = KTODataModule(tiny_model_dir, train_data=rows, val_size=4, batch_size=4, max_length=32)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        accumulate_grad_batches=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name=name),
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row["train/loss"]]
    by_step = {
        int(row.pop("step")): {k: float(v) for k, v in row.items() if k.startswith("train/") and v} for row in logged
    }
    return by_step, trainer


def test_precomputed_reference_gives_the_same_run(tiny_model_dir, tmp_path):
    """ReferenceModel(precompute_ref_logps=True) stores the reference log-probs of every row and of its mismatched
    row before training; the run (z_ref included, with accumulation) logs the same metrics as the live reference
    (1e-5), and z_ref is positive at the second step, so the mismatched rows took part. 3 of 4 rows desirable:
    the module warns at setup that 3 / 1 is outside eq. 8's range."""
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i), "label": i % 4 != 0} for i in range(10, 30)]
    with pytest.warns(UserWarning, match=r"outside the paper's recommended \[1, 4/3\]"):
        live, _ = _fit_rows(tiny_model_dir, tmp_path, "live", rows)
    pre, trainer = _fit_rows(
        tiny_model_dir, tmp_path, "pre", rows, callbacks=[ReferenceModel(precompute_ref_logps=True)]
    )
    examples = trainer.datamodule.examples
    assert "ref_kl_logps" in examples["train"][0] and "ref_kl_logps" in examples["val"][0]
    assert sorted(live) == sorted(pre) == [0, 1]
    for step in live:
        assert live[step].keys() == pre[step].keys()
        for name, value in live[step].items():
            assert pre[step][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, name)
    assert abs(live[0]["train/kl"]) < 1e-5 and live[1]["train/kl"] > 0.5
    assert math.isfinite(trainer.callback_metrics["val/rewards/margins"])


def test_token_statistics_only_on_logged_steps(tiny_model_dir, tmp_path, with_stats_calls):
    """Departure 5: the entropy is computed on the optimizer steps Lightning logs (every 2nd here) and the run's
    last step, not on the others; the rows written hold the same values as a run that computes it every step,
    and the other metrics are logged every row either way."""
    from helpers.metrics import assert_rows_match, sparse_and_dense_runs

    from lit_posttrain.stable import kto

    computed = with_stats_calls(kto)  # with_stats of each training forward of the policy
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i), "label": i % 2 == 0} for i in range(10, 30)]

    def make():
        module = KTOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        return module, KTODataModule(tiny_model_dir, train_data=rows, batch_size=4, max_length=32)

    (sparse, sparse_rows), (dense, dense_rows) = sparse_and_dense_runs(computed, make, tmp_path, 2, max_steps=5)
    assert sparse == [False, True, False, True, True]  # steps 1..5: 2 and 4 are logged, 5 is the last
    assert dense == [True] * 5
    assert sorted(sparse_rows) == [1, 3]
    names = ("loss", "kl", "rewards/margins", "logps/chosen", "entropy")
    assert_rows_match(sparse_rows, dense_rows, [f"train/{name}" for name in names])
