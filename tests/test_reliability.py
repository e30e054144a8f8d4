"""Bad inputs and faults (the hardening issue): each test names what it feeds and what must happen.

docs/reliability.md lists these cases; `test_reliability_table_matches_the_tests` keeps the two in step.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SFT_ROWS = [json.loads(line) for line in (ROOT / "examples/data/sft/train.jsonl").read_text().splitlines()[:16]]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_command_line_data_paths_stay_paths(tmp_path, monkeypatch, suffix):
    """`--data.init_args.train_data d/sft.csv` is a path, not the file's text (CSV used to fail with
    "File name too long: 'prompt,completion ...'", a JSON array was copied into config.yaml)."""
    from lit_posttrain.cli import cli_main

    path = tmp_path / f"sft{suffix}"
    if suffix == ".csv":
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},'{r['completion']}'\n" for r in SFT_ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(SFT_ROWS))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    monkeypatch.chdir(ROOT)
    cli = cli_main(["--config", "configs/quickstart/sft.yaml", "--data.init_args.train_data", str(path)], run=False)
    assert cli.datamodule.train_data == str(path)
    assert cli.config["data"]["init_args"]["train_data"] == str(path)
    cli.datamodule.setup("fit")
    assert len(cli.datamodule.train_examples) > 0  # the rows were read from the file


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", b"\n", r"empty\.jsonl: the file is empty"),
        ("broken.jsonl", b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2=", "completion": \n', r"broken\.jsonl: line 2 is not valid JSON"),
        ("broken.json", b'[{"prompt": "1+1=", "completion": "2"},\n{"prompt": "1+2=" "completion": "3"}]', r"broken\.json: not valid JSON at line 2"),
        ("latin.jsonl", b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2=", "completion": "\xe9"}\n', r"latin\.jsonl: line 2 is not UTF-8 text \(byte 0xe9"),
        # a wrong-typed value in row 1 (0-based): Arrow stores the column as JSON and converts row 0 too
        ("mixed.jsonl", b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2=", "completion": 3}\n{"prompt": "1+3=", "completion": "4"}\n', r"mixed\.jsonl: row 1, column 'completion': expected a string, got 3"),
    ],
)
def test_bad_data_files_are_named_with_file_and_line(tmp_path, name, content, expected):
    """Empty files, broken JSON, non-UTF-8 text and wrong-typed rows: an error naming file and line/row
    (they used to be StopIteration, "could not be read as set()", a bare UnicodeDecodeError, row 0)."""
    from lit_posttrain.data import DataFormatError, load_rows

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=expected):
        load_rows(str(path))


def test_data_errors_reach_the_command_line_as_one_line(tmp_path):
    """A data error at the CLI is one clear line on stderr and exit code 2, not a traceback."""
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "1+2=", "completion": "\xff"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "lit_posttrain", "fit", "--config", "configs/quickstart/sft.yaml",
         "--data.init_args.train_data", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"lit-posttrain: error: {path}: line 1 is not UTF-8 text" in out.stderr
    assert "Traceback" not in out.stderr


def test_rows_without_targets_are_skipped_with_a_warning_and_never_give_nan(tiny_model_dir):
    """SFT rows whose prompt fills max_length have no target token: they used to divide by zero and
    train the model to NaN. Now they are skipped with a warning naming how many, the loss stays finite,
    and data where no row keeps a target is an error before training."""
    import lightning as L
    import torch

    from lit_posttrain import SFTDataModule, SFTModule
    from lit_posttrain.data import DataFormatError

    long_prompt = [{"prompt": "1+1+1+1+1+1+1+1+1+1+1=", "completion": "11"}] * 4  # 22 prompt characters
    short = [{"prompt": "1+1=", "completion": "2"}] * 4
    dm = SFTDataModule(tiny_model_dir, train_data=long_prompt + short, max_length=12, batch_size=2)
    with pytest.warns(UserWarning, match=r"4 of 8 rows have no target tokens within max_length=12 \(.*first: row 0\)"):
        dm.setup("fit")
    assert len(dm.train_examples) == 4
    module = SFTModule(tiny_model_dir, random_init=True, diagnostics=False)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    with pytest.raises(DataFormatError, match="no row has a target token within max_length=12"):
        SFTDataModule(tiny_model_dir, train_data=long_prompt, max_length=12).setup("fit")


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    """SIGTERM (a scheduler's stop) used to exit 0, which pipelines read as success, and lose the steps
    since the last periodic checkpoint. Now: the batch in flight finishes, last.ckpt is saved there,
    exit code 143, and --ckpt_path last continues from exactly that step."""
    import csv

    from test_cli import _checkpointing_config

    config = ["fit", "--config", "configs/quickstart/sft.yaml", "--config", str(_checkpointing_config(tmp_path))]
    # signalled when 5 optimizer steps are done (the last periodic checkpoint, every 3 steps, is step 3)
    stopped = subprocess.run(
        [sys.executable, "-m", "lit_posttrain", *config, "--trainer.callbacks+=tests.helpers.kill_at_step.KillAtStep",
         "--trainer.callbacks.step", "5", "--trainer.callbacks.signal", "SIGTERM"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stderr
    import torch

    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert saved["global_step"] == 6  # the batch in flight (step 5 -> 6) finished, then the save
    resumed = subprocess.run(
        [sys.executable, "-m", "lit_posttrain", *config, "--ckpt_path", "last", "--trainer.max_steps", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = sorted(tmp_path.glob("lightning_logs/version_*/metrics.csv"))[-1]
    steps = [int(row["step"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    assert steps == [6, 7], steps


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), 1e38])
def test_rewards_must_be_finite_and_representable(value):
    """A reward function returning inf or 1e38 used to train on NaN advantages (loss 0, no warning)."""
    from lit_posttrain.rewards.scoring import RewardFunctionError, score_completions

    def huge(completions, **kwargs):
        return [1.0] * (len(completions) - 1) + [value]

    with pytest.raises(RewardFunctionError, match=r"'huge' returned .* for sample 3 .*must be finite numbers within"):
        score_completions([huge], ["p"] * 4, ["c"] * 4, completion_ids=[[1]] * 4, columns={})


def test_a_batch_no_reward_function_scored_warns():
    """Every function returning None for every sample: the batch trains nothing, and says so."""
    from lit_posttrain.rewards.scoring import score_completions

    def never(completions, **kwargs):
        return [None] * len(completions)

    with pytest.warns(UserWarning, match="no reward function scored any of the 4 samples"):
        rewards = score_completions([never], ["p"] * 4, ["c"] * 4, completion_ids=[[1]] * 4, columns={})
    assert rewards.isnan().all()


def test_fewer_prompts_than_a_batch_is_an_error_not_an_empty_run(tiny_model_dir):
    """GRPO with 3 prompts and batch_size 8 used to print "No training batches" and exit 0."""
    from lit_posttrain import GRPODataModule
    from lit_posttrain.data import DataFormatError

    dm = GRPODataModule(tiny_model_dir, train_data=[{"prompt": f"{i}+1="} for i in range(3)], batch_size=8)
    dm.setup("fit")
    with pytest.raises(DataFormatError, match=r"3 training rows but batch_size=8 .*not one training batch"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="batch_size must be a positive integer .* got 0"):
        GRPODataModule(tiny_model_dir, train_data=[{"prompt": "1+1="}], batch_size=0).train_dataloader()


@pytest.mark.parametrize("case", ["identical", "prompt_too_long"])
def test_dpo_data_that_cannot_train_is_an_error(tiny_model_dir, case):
    """DPO where every chosen equals its rejected, or every prompt fills max_length, used to train on a
    constant loss (ln 2) and exit 0; now an error before training; a few such rows only warn."""
    from lit_posttrain import DPODataModule
    from lit_posttrain.data import DataFormatError

    good = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}]
    bad = (
        [{"prompt": "1+2=", "chosen": "3", "rejected": "3"}] * 3
        if case == "identical"
        else [{"prompt": "1+2+3+4+5+6+7+8=", "chosen": "36", "rejected": "37"}] * 3
    )
    with pytest.raises(DataFormatError, match="no row can train"):
        DPODataModule(tiny_model_dir, train_data=bad, max_length=12).setup("fit")
    expected = "same chosen and rejected tokens" if case == "identical" else "no completion token left"
    with pytest.warns(UserWarning, match=expected):
        DPODataModule(tiny_model_dir, train_data=bad + good, max_length=12).setup("fit")


def test_resume_at_an_epoch_boundary_sees_every_epoch(tmp_path, tiny_model_dir):
    """A checkpoint taken on an epoch's last batch used to resume one epoch too far (that epoch's data
    never seen). Resumed from the last step of epoch 0 and from the first step of epoch 1, the run
    sees exactly the batches of the uninterrupted run and ends with bit-identical weights."""
    import hashlib

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_posttrain import SFTDataModule, SFTModule

    class Record(L.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            digest = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]
            self.seen[trainer.global_step] = (trainer.current_epoch, digest)

    class SaveAt(ModelCheckpoint):  # one more checkpoint, after the first step of epoch 1
        def __init__(self, step):
            super().__init__(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                super().on_train_batch_end(trainer, *args)

        def on_train_epoch_end(self, trainer, pl_module):
            pass

    def run(ckpt_path=None):
        L.seed_everything(0)
        record = Record()
        # where ModelCheckpoint(every_n_train_steps=...) saves: at the end of the step's batch
        checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
        callbacks = [record, checkpoints] + ([SaveAt(5)] if ckpt_path is None else [])
        trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
        module = SFTModule(tiny_model_dir, random_init=True, diagnostics=False)
        trainer.fit(module, datamodule=SFTDataModule(tiny_model_dir, train_data=SFT_ROWS, batch_size=4),
                    ckpt_path=ckpt_path)
        return record.seen, module.state_dict()

    full, final = run()  # 16 rows / 4 = 4 steps per epoch, 3 epochs
    assert [full[s][0] for s in sorted(full)] == [0] * 4 + [1] * 4 + [2] * 4
    for step in (4, 5):  # saved after epoch 0's last batch; after epoch 1's first batch
        resumed, weights = run(tmp_path / f"step={step}.ckpt")
        assert resumed == {s: full[s] for s in range(step, 12)}, (step, resumed)
        assert all(torch.equal(weights[k], final[k]) for k in final)


def test_reliability_table_matches_the_tests():
    """docs/reliability.md names a test for every case; each named test exists, and every test of
    this file appears in the table."""
    table = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", table))
    assert named
    for path, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name} is not a test"
    here = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), re.M)) - {
        "test_reliability_table_matches_the_tests"
    }
    missing = here - {name for path, name in named if path == "tests/test_reliability.py"}
    assert not missing, f"tests of tests/test_reliability.py not in docs/reliability.md: {sorted(missing)}"


def test_a_mistyped_local_model_path_is_named(monkeypatch):
    """`examples/tiny-modle` used to be looked up as a hub id (a connection error offline); it is named
    as a missing local directory, with the closest names first and what the parent folder holds."""
    from lit_posttrain.models import load_model, load_tokenizer

    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError, match=r"model_name_or_path 'examples/tiny-modle': no such local directory \(did you mean 'tiny-model'.*\(examples/ holds: tiny-model, "):
        load_model("examples/tiny-modle", random_init=True)
    with pytest.raises(FileNotFoundError, match=r"tokenizer_name_or_path './nowhere'"):
        load_tokenizer("./nowhere")


def test_a_diverged_run_stops_before_the_weights_and_keeps_the_good_export(tmp_path, tiny_model_dir):
    """lr 1e6 used to train to NaN, exit 0 and replace a good export with an all-NaN model. Now the first
    non-finite gradient stops the run before the optimizer step (NonFiniteError naming the step): the
    weights stay finite and the earlier export is untouched."""
    import hashlib

    import lightning as L
    import torch

    from lit_posttrain import SFTDataModule, SFTModule
    from lit_posttrain.callbacks import HubExport
    from lit_posttrain.ops import NonFiniteError

    modules = []

    def fit(lr):
        L.seed_everything(0)
        module = SFTModule(tiny_model_dir, random_init=True, diagnostics=False,
                           optimizer=lambda params: torch.optim.AdamW(params, lr=lr))
        modules.append(module)
        trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[HubExport(dirpath=tmp_path / "export", overwrite=True)])
        trainer.fit(module, datamodule=SFTDataModule(tiny_model_dir, train_data=SFT_ROWS, batch_size=4))
        return module

    fit(1e-3)
    exported = tmp_path / "export" / "final" / "model.safetensors"
    good = hashlib.sha256(exported.read_bytes()).hexdigest()
    with pytest.raises(NonFiniteError, match=r"step [1-5]: the gradient norm is (nan|inf)"):
        fit(1e6)
    assert hashlib.sha256(exported.read_bytes()).hexdigest() == good
    assert all(torch.isfinite(p).all() for p in modules[-1].parameters())  # the bad step never applied


def test_a_tokenizer_that_needs_remote_code_loads_only_when_asked(tmp_path):
    """A DataModule never runs a tokenizer repository's code unless trust_remote_code is set (the CLI sets it
    from the model's: one switch)."""
    import shutil

    from lit_posttrain import SFTDataModule
    from lit_posttrain.cli import cli_main

    repo = tmp_path / "remote-tokenizer"
    shutil.copytree(ROOT / "examples" / "tiny-model", repo)
    marker = tmp_path / "code-ran"
    (repo / "custom_tokenizer.py").write_text(
        "from pathlib import Path\nfrom transformers import PreTrainedTokenizerFast\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((repo / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]}
    (repo / "tokenizer_config.json").write_text(json.dumps(config))

    try:  # transformers either refuses or loads the repository's plain tokenizer files: never its code
        unasked = SFTDataModule(str(repo), train_data=SFT_ROWS)
        assert type(unasked.tokenizer).__name__ != "CustomTokenizer"
    except ValueError as err:
        assert "trust_remote_code" in str(err)
    assert not marker.exists()
    dm = SFTDataModule(str(repo), train_data=SFT_ROWS, trust_remote_code=True)
    assert type(dm.tokenizer).__name__ == "CustomTokenizer" and marker.exists()

    cli = cli_main(
        ["--config", str(ROOT / "configs/quickstart/sft.yaml"), "--trainer.logger", "false",
         "--model.init_args.model_name_or_path", str(ROOT / "examples/tiny-model"),
         "--model.init_args.trust_remote_code", "true"],
        run=False,
    )
    assert cli.datamodule.hparams.trust_remote_code is True
