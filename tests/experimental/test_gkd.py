"""GKD: the generalized JSD derived by hand, data checks, learning signal, the frozen teacher, exact resume."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain.callbacks.reference_model import find_teacher_model
from lit_posttrain.data import DataFormatError
from lit_posttrain.experimental.gkd import GKDDataModule, GKDModule, generalized_jsd_loss

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "sft"
LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------
# generalized_jsd_loss: hand-derived values
# ---------------------------------------------------------------------------------------------
def _two_token_example():
    """Two positions, three tokens, given as probabilities (logits = log-probs):
    position 1: S = (1/2, 1/4, 1/4), T = (1/4, 1/2, 1/4); position 2: S = (1/2, 1/4, 1/4), T = (1/3, 1/3, 1/3)."""
    S = torch.tensor([[[1 / 2, 1 / 4, 1 / 4], [1 / 2, 1 / 4, 1 / 4]]], dtype=torch.float64)
    T = torch.tensor([[[1 / 4, 1 / 2, 1 / 4], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64)
    return S.log(), T.log()


def test_forward_kl_at_beta_0():
    """beta = 0 is KL(T || S) = sum T ln(T / S):
    position 1: 1/4 ln(1/2) + 1/2 ln 2 + 1/4 ln 1 = ln 2 / 4;
    position 2: 1/3 (ln(2/3) + 2 ln(4/3)) = ln(32/27) / 3;
    batchmean = (ln 2 / 4 + ln(32/27) / 3) / 2 = (0.173287 + 0.056633) / 2 = 0.114960."""
    s, t = _two_token_example()
    expected = (LN2 / 4 + math.log(32 / 27) / 3) / 2
    assert generalized_jsd_loss(s, t, beta=0.0).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.114960, abs=1e-6)


def test_reverse_kl_at_beta_1():
    """beta = 1 is KL(S || T) = sum S ln(S / T):
    position 1: 1/2 ln 2 + 1/4 ln(1/2) = ln 2 / 4;
    position 2: 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = ln(9/8) / 2;
    batchmean = (ln 2 / 4 + ln(9/8) / 2) / 2 = (0.173287 + 0.058892) / 2 = 0.116090
    (differs from beta = 0 at position 2: the direction matters)."""
    s, t = _two_token_example()
    expected = (LN2 / 4 + math.log(9 / 8) / 2) / 2
    assert generalized_jsd_loss(s, t, beta=1.0).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.116090, abs=1e-6)


def test_symmetric_jsd_at_beta_half():
    """beta = 0.5: M = (S + T) / 2 and the loss is KL(T||M) / 2 + KL(S||M) / 2.
    position 1: M = (3/8, 3/8, 1/4); KL(T||M) = 1/4 ln(2/3) + 1/2 ln(4/3) = KL(S||M), so
      JSD_1 = 1/2 ln(4/3) + 1/4 ln(2/3) = 0.042475;
    position 2: M = (5/12, 7/24, 7/24); KL(T||M) = 1/3 (ln(4/5) + 2 ln(8/7)) = 0.014640,
      KL(S||M) = 1/2 ln(6/5) + 1/2 ln(6/7) = 0.014086, JSD_2 = (0.014640 + 0.014086) / 2 = 0.014363;
    batchmean = (JSD_1 + JSD_2) / 2 = 0.028419."""
    s, t = _two_token_example()
    jsd_1 = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    kl_t2 = (math.log(4 / 5) + 2 * math.log(8 / 7)) / 3
    kl_s2 = 0.5 * math.log(6 / 5) + 0.5 * math.log(6 / 7)
    jsd_2 = 0.5 * kl_t2 + 0.5 * kl_s2
    assert generalized_jsd_loss(s, t, beta=0.5).item() == pytest.approx((jsd_1 + jsd_2) / 2, abs=1e-12)
    assert (jsd_1 + jsd_2) / 2 == pytest.approx(0.028419, abs=1e-6)
    per_position = generalized_jsd_loss(s, t, beta=0.5, reduction="none")
    assert per_position[0].tolist() == pytest.approx([jsd_1, jsd_2], abs=1e-12)
    assert generalized_jsd_loss(s, t, beta=0.5, reduction="sum").item() == pytest.approx(
        jsd_1 + jsd_2, abs=1e-12
    )


def test_temperature_divides_both_logits():
    """temperature tau: the loss of (s, t) at tau equals the loss of (s / tau, t / tau) at 1, and differs from it at 1."""
    s, t = _two_token_example()
    at_tau = generalized_jsd_loss(s, t, beta=0.3, temperature=2.0)
    assert at_tau.item() == pytest.approx(generalized_jsd_loss(s / 2, t / 2, beta=0.3).item(), abs=1e-12)
    assert at_tau.item() != pytest.approx(generalized_jsd_loss(s, t, beta=0.3).item(), abs=1e-4)


def test_jsd_at_most_ln2():
    """beta = 0.5: every position's JSD is <= ln 2, and nearly ln 2 for almost disjoint distributions."""
    g = torch.Generator().manual_seed(0)
    s, t = 20 * torch.randn(64, 16, 50, generator=g), 20 * torch.randn(64, 16, 50, generator=g)
    per_position = generalized_jsd_loss(s, t, beta=0.5, reduction="none")
    assert per_position.max().item() <= LN2 + 1e-6
    disjoint_s, disjoint_t = torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 100.0]])
    assert generalized_jsd_loss(disjoint_s, disjoint_t, beta=0.5).item() == pytest.approx(LN2, abs=1e-6)


def test_masked_positions_do_not_count():
    """Positions with labels -100 change nothing, whatever their logits; batchmean divides by the kept positions only."""
    s, t = _two_token_example()
    g = torch.Generator().manual_seed(1)
    junk_s, junk_t = (
        10 * torch.randn(1, 3, 3, generator=g, dtype=torch.float64),
        10 * torch.randn(1, 3, 3, generator=g, dtype=torch.float64),
    )
    labels = torch.tensor([[0, 2, -100, -100, -100]])
    for beta in (0.0, 0.5, 1.0):
        masked = generalized_jsd_loss(torch.cat([s, junk_s], 1), torch.cat([t, junk_t], 1), labels, beta=beta)
        assert masked.item() == pytest.approx(generalized_jsd_loss(s, t, beta=beta).item(), abs=1e-12)
    # only position 1 kept: its JSD alone (beta 0: ln 2 / 4)
    only_first = generalized_jsd_loss(s, t, torch.tensor([[1, -100]]), beta=0.0)
    assert only_first.item() == pytest.approx(LN2 / 4, abs=1e-12)
    assert generalized_jsd_loss(s, t, torch.tensor([[-100, -100]])).item() == 0.0  # nothing kept: 0, not NaN


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_moves_student_towards_teacher(beta):
    """The gradient on the student's logits is negative where the teacher has more mass (position 1: token 1) and
    positive where it has less (token 0); a small step against it lowers the loss. The teacher gets no gradient."""
    s, t = _two_token_example()
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    loss = generalized_jsd_loss(s, t.detach(), beta=beta)
    loss.backward()
    assert s.grad[0, 0, 1] < 0 < s.grad[0, 0, 0]
    with torch.no_grad():
        assert generalized_jsd_loss(s - 0.5 * s.grad, t, beta=beta) < loss
    assert t.grad is None


def test_docstring_examples():
    """The examples in gkd.py's docstrings (collator, loss) print what they show."""
    import doctest

    from lit_posttrain.experimental import gkd

    result = doctest.testmod(gkd, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 4


def test_bad_arguments_name_the_option():
    s, t = _two_token_example()
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        generalized_jsd_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="differ in shape"):
        generalized_jsd_loss(s, t[..., :2])


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_data_formats(student_dir):
    """prompt/completion rows: the completion gets EOS; messages rows: the last (assistant) message is the completion,
    the earlier ones the prompt with the generation prompt; both render the same answer tokens."""
    data = GKDDataModule(
        student_dir,
        train_data=[{"prompt": "2+3=", "completion": "5"}],
        val_data=[{"messages": [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"}]}],
    )
    data.setup("fit")
    tok = data.tokenizer
    plain, chat = data.train_examples[0], data.val_examples[0]
    assert tok.decode(plain["prompt_ids"]) == "2+3=" and plain["completion_ids"] == tok("5")["input_ids"] + [
        tok.eos_token_id
    ]
    assert tok.decode(chat["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tok.decode(chat["completion_ids"]).startswith("5<|im_end|>")


def test_bad_rows_name_row_and_column(student_dir):
    """A conversation that does not end with the assistant, or rows without the columns, fail before training."""
    bad = [{"messages": [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"}]},
           {"messages": [{"role": "user", "content": "2+3"}]}]  # fmt: skip
    with pytest.raises(DataFormatError, match=r"row 1, column 'messages'"):
        GKDDataModule(student_dir, train_data=bad).setup("fit")
    with pytest.raises(DataFormatError, match=r"'prompt' and 'completion'"):
        GKDDataModule(student_dir, train_data=[{"text": "2+3=5"}]).setup("fit")


def test_bad_options_name_the_option(student_dir):
    with pytest.raises(ValueError, match="lmbda must be in"):
        GKDModule(student_dir, random_init=True, lmbda=1.5)
    with pytest.raises(ValueError, match="beta must be in"):
        GKDModule(student_dir, random_init=True, beta=-0.1)


# ---------------------------------------------------------------------------------------------
# Training: learning signal, the frozen teacher
# ---------------------------------------------------------------------------------------------
LEARN_STEPS = 60


def _module(student_dir, teacher_dir, **kwargs):
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=3e-3))
    return GKDModule(
        student_dir, random_init=True, teacher_model_name_or_path=teacher_dir, max_new_tokens=4, diagnostics=False,
        **kwargs,
    )  # fmt: skip


def _data(student_dir, **kwargs):
    kwargs.setdefault("batch_size", 32)
    return GKDDataModule(
        student_dir,
        train_data=str(DATA / "train.jsonl"),
        val_data=str(DATA / "val.jsonl"),
        max_length=32,
        **kwargs,
    )


def _trainer(tmp_path, max_steps, callbacks=(), **kwargs):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
        **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(student_dir, teacher_dir, tmp_path_factory):
    """One GKD fit of the 1-layer student on the 2-layer teacher (lmbda 0.5, beta 0.5), held-out metrics before and
    after, and its last checkpoint."""
    tmp_path = tmp_path_factory.mktemp("gkd")
    L.seed_everything(0, verbose=False)
    module, data = _module(student_dir, teacher_dir), _data(student_dir)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, LEARN_STEPS, [checkpoint], limit_val_batches=0)
    before = _trainer(tmp_path, 1).validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = _trainer(tmp_path, 1).validate(module, data, verbose=False)[0]
    return {
        "module": module,
        "trainer": trainer,
        "before": before,
        "after": after,
        "ckpt": tmp_path / "ckpt" / "last.ckpt",
    }


def test_learning_signal(trained):
    """60 steps (batch 32): on held-out pairs the student's JSD to the teacher falls and its token accuracy rises
    toward the teacher's. Measured (seeds 0-3, the student's init and data order): val/jsd 0.65 -> 0.29-0.36 (ratio
    0.45-0.56), val/mean_token_accuracy 0.037 -> 0.39-0.43 (+0.36 to +0.39; the teacher's 0.90). Asserted: ratio < 0.7,
    gain > 0.25."""
    before, after = trained["before"], trained["after"]
    assert after["val/jsd"] < 0.7 * before["val/jsd"]
    assert after["val/mean_token_accuracy"] > before["val/mean_token_accuracy"] + 0.25
    assert (
        after["val/teacher_mean_token_accuracy"] == before["val/teacher_mean_token_accuracy"] > 0.5
    )  # frozen
    assert after["val/mean_token_accuracy"] <= after["val/teacher_mean_token_accuracy"] + 0.05


def test_teacher_frozen_outside_optimizer_and_checkpoint(trained, teacher_dir):
    """After training the teacher is bit-identical to the shipped file, in eval mode, not in the optimizer; the
    checkpoint holds the student's tensors only (its 1 layer, none of the teacher's 2) and no TeacherModel state."""
    from safetensors.torch import load_file

    module, trainer = trained["module"], trained["trainer"]
    teacher = find_teacher_model(trainer, "GKD")
    shipped = load_file(str(Path(teacher_dir) / "model.safetensors"))
    state = teacher.model.state_dict()
    for name, tensor in shipped.items():
        assert torch.equal(state[name], tensor), name
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.model.parameters()}
    assert optimized == {id(p) for p in module.parameters()}
    ckpt = torch.load(trained["ckpt"], weights_only=False)
    assert set(ckpt["state_dict"]) == set(module.state_dict())
    assert not any(".layers.1." in name for name in ckpt["state_dict"])  # the teacher's second layer
    assert not any("TeacherModel" in key for key in ckpt.get("callbacks", {}))
    assert len(ckpt["optimizer_states"][0]["state"]) == len(list(module.parameters()))


def test_on_policy_fraction_follows_lmbda(trained):
    """lmbda 0.5: the share of steps that used the student's own samples is near one half (binomial, 60 flips)."""
    module = trained["module"]
    fraction = module.num_on_policy_steps.item() / module.num_training_steps.item()
    assert module.num_training_steps.item() == LEARN_STEPS and 0.3 < fraction < 0.7


def test_missing_teacher_is_a_clear_error(student_dir, tmp_path):
    """No teacher_model_name_or_path and no TeacherModel callback: the fit stops naming both ways to give one."""
    module = GKDModule(student_dir, random_init=True, diagnostics=False)
    with pytest.raises(
        ValueError, match="teacher_model_name_or_path, or add a lit_posttrain.callbacks.TeacherModel"
    ):
        _trainer(tmp_path, 1).fit(module, _data(student_dir))


# ---------------------------------------------------------------------------------------------
# Exact resume after SIGKILL (lmbda in (0, 1): the coin flips and the sampling are checkpointed)
# ---------------------------------------------------------------------------------------------
def _cli_config(run_dir: Path, student_dir, teacher_dir, kill_at=None) -> Path:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(run_dir / "ckpt"), "save_last": True, "every_n_train_steps": 1},
        }
    ]
    if kill_at is not None:
        callbacks.append(
            {"class_path": "tests.helpers.kill_at_step.KillAtStep", "init_args": {"step": kill_at}}
        )
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 6, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
            "limit_val_batches": 0, "enable_progress_bar": False, "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run_dir / "logs"), "name": "", "flush_logs_every_n_steps": 1}},
        },
        "model": {"class_path": "lit_posttrain.experimental.gkd.GKDModule", "init_args": {
            "model_name_or_path": student_dir, "random_init": True, "teacher_model_name_or_path": teacher_dir,
            "lmbda": 0.5, "max_new_tokens": 4, "diagnostics": False,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}}}},
        "data": {"class_path": "lit_posttrain.experimental.gkd.GKDDataModule", "init_args": {
            "train_data": str(DATA / "train.jsonl"), "batch_size": 8, "max_length": 32}},
    }  # fmt: skip
    path = run_dir.parent / f"{run_dir.name}{'-killed' if kill_at is not None else ''}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIT_POSTTRAIN_SILENCE_EXPERIMENTAL": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lit_posttrain", "fit", "--config", str(config), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def _rows(run_dir: Path) -> dict[int, dict[str, str]]:
    """Logged training rows by step over all logger versions; values as written (equal = bit-identical)."""
    import csv

    rows = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            values = {k: v for k, v in row.items() if k.startswith("train/") and v != ""}
            if values:
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def test_killed_and_resumed_equals_uninterrupted(student_dir, teacher_dir, tmp_path):
    """lmbda 0.5 through the CLI: a run killed with SIGKILL after step 3 of 6 and resumed with --ckpt_path last logs
    bit-identical metrics at every step (the coin's on-policy steps included) and ends with bit-identical weights."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = _fit(_cli_config(full, student_dir, teacher_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    result = _fit(_cli_config(resumed, student_dir, teacher_dir, kill_at=3))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert max(_rows(resumed)) == 2  # killed mid-run
    result = _fit(_cli_config(resumed, student_dir, teacher_dir), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]

    full_rows, resumed_rows = _rows(full), _rows(resumed)
    assert sorted(full_rows) == sorted(resumed_rows) == list(range(6))
    assert resumed_rows == full_rows
    # both sources after the kill: the resumed run's coin continued, it did not restart from the seed
    fractions = [float(full_rows[step]["train/on_policy_fraction"]) for step in range(6)]
    on_policy = [round(f * (k + 1) - (fractions[k - 1] * k if k else 0)) for k, f in enumerate(fractions)]
    assert set(on_policy[3:]) == {0, 1}, on_policy
    full_state = torch.load(full / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    resumed_state = torch.load(resumed / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert full_state.keys() == resumed_state.keys()
    for name, tensor in full_state.items():
        assert torch.equal(resumed_state[name], tensor), name
