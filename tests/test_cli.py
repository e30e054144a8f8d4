import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "lit_posttrain", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_print_config_resolves_overrides():
    """--print_config shows the merged config, command-line overrides included."""
    out = _run("fit", "--config", "configs/quickstart/sft.yaml", "--trainer.max_steps", "7", "--print_config")
    assert out.returncode == 0, out.stderr
    assert "max_steps: 7" in out.stdout
    assert "class_path: lit_posttrain.SFTModule" in out.stdout


def test_model_path_is_linked_to_the_datamodule_tokenizer(monkeypatch):
    """The model path is given once; the DataModule's tokenizer follows it (or tokenizer_name_or_path)."""
    from lit_posttrain.cli import cli_main

    monkeypatch.chdir(ROOT)
    cli = cli_main(["--config", "configs/quickstart/sft.yaml"], run=False)
    assert cli.datamodule.tokenizer.name_or_path == "examples/tiny-model"
    other = str(ROOT / "examples" / "tiny-model")
    cli = cli_main(["--config", "configs/quickstart/sft.yaml", "--model.init_args.tokenizer_name_or_path", other], run=False)
    assert cli.datamodule.tokenizer.name_or_path == other


def test_model_help_shows_argument_docstrings():
    """--model.help prints each argument with its docstring text."""
    out = _run("fit", "--model.help", "lit_posttrain.SFTModule")
    assert out.returncode == 0, out.stderr
    assert "build the model from its config with random weights" in out.stdout
    assert "--model.lora" in out.stdout


def test_unknown_option_is_named():
    """A misspelt option fails the CLI and the error names it."""
    out = _run("fit", "--config", "configs/quickstart/sft.yaml", "--model.init_args.loss_typ", "dft")
    assert out.returncode != 0
    assert "loss_typ" in out.stderr


def test_help_names_methods_subcommands_and_quickstarts_and_version_works():
    """`lit-posttrain --help` lists every stable method, the subcommands and the quickstarts; --version prints."""
    import lit_posttrain

    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for name in lit_posttrain.__all__:
        if name.endswith("Module") and not name.endswith("DataModule"):
            assert f"lit_posttrain.{name}" in out.stdout, name
    for word in ("fit", "validate", "vllm-serve", "configs/quickstart/", "--version"):
        assert word in out.stdout, word
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.startswith(f"lit-posttrain {lit_posttrain.__version__}")


def test_subcommands_without_a_step_method_are_not_offered():
    """`test` and `predict` (no test_step / predict_step in any method) are refused with the valid choices."""
    out = _run("test", "--config", "configs/quickstart/sft.yaml")
    assert out.returncode != 0
    assert "invalid choice: 'test'" in out.stderr and "'fit', 'validate'" in out.stderr


def test_a_run_prints_no_noise_unless_verbose(tmp_path):
    """A CLI run shows no `Epoch 0/-2`, `v_num`, litlogger tip or LeafSpec deprecation; --verbose shows them."""
    args = ["fit", "--config", "configs/quickstart/sft.yaml", "--trainer.max_steps", "2",
            "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.callbacks", "[]"]  # fmt: skip
    quiet = _run(*args)
    assert quiet.returncode == 0, quiet.stderr
    output = quiet.stdout + quiet.stderr
    for noise in ("Epoch 0/-2", "v_num", "litlogger", "LeafSpec"):
        assert noise not in output, noise
    assert "Training to step 2" in output
    loud = _run(*args, "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert "litlogger" in loud.stdout + loud.stderr and "v_num" in loud.stdout + loud.stderr


def _checkpointing_config(tmp_path: Path) -> Path:
    """The SFT quickstart with a ModelCheckpoint in a fixed folder (as docs/distributed.md recommends)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "resume.yaml"
    path.write_text(f"""\
# the SFT quickstart, checkpointing every 3 steps into a fixed folder: lit-posttrain fit --config resume.yaml
trainer:
  max_steps: 400
  enable_checkpointing: true
  num_sanity_val_steps: 0
  limit_val_batches: 0
  log_every_n_steps: 1
  default_root_dir: {tmp_path}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / "checkpoints"}, save_last: true, every_n_train_steps: 3, save_top_k: 0}}
""")
    return path


def test_ckpt_path_last_resumes_a_killed_run_and_refuses_a_silent_restart(tmp_path):
    """SIGKILL a CLI run, rerun it with --ckpt_path last: it continues after the killed step; with nothing
    to resume `last` fails (non-zero, saying what to do) and `last_if_any` starts at step 0."""
    import csv
    import signal

    config = ["fit", "--config", "configs/quickstart/sft.yaml", "--config", str(_checkpointing_config(tmp_path))]
    nothing = _run(*config, "--ckpt_path", "last")
    assert nothing.returncode != 0
    assert "no last checkpoint to resume from" in nothing.stderr and "dirpath" in nothing.stderr

    # killed at the start of step 7: the checkpoint of step 6 is complete, steps 7.. must be redone
    killed = _run(*config, "--trainer.callbacks+=tests.helpers.kill_at_step.KillAtStep", "--trainer.callbacks.step", "7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").exists(), "the run wrote no checkpoint before it was killed"

    resumed = _run(*config, "--ckpt_path", "last", "--trainer.max_steps", "12")
    assert resumed.returncode == 0, resumed.stderr
    metrics = sorted(tmp_path.glob("lightning_logs/version_*/metrics.csv"))[-1]
    steps = [int(row["step"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    assert steps[0] == 6 and steps[-1] == 11, steps  # continued from the step-6 checkpoint, up to max_steps

    fresh = _run(*config[:-2], "--config", str(_checkpointing_config(tmp_path / "other")), "--ckpt_path",
                 "last_if_any", "--trainer.max_steps", "2")  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr


def test_a_checkpoint_cannot_configure_the_run(tmp_path):
    """An edited checkpoint that switches on trust_remote_code and points at a directory with a modeling
    file never runs that file; a checkpoint of another module class or with other options stops the run,
    naming each difference."""
    import torch

    config = ["fit", "--config", "configs/quickstart/sft.yaml", "--config", str(_checkpointing_config(tmp_path))]
    trained = _run(*config, "--trainer.max_steps", "1")
    assert trained.returncode == 0, trained.stderr
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)

    marker = tmp_path / "remote-code-ran"
    evil = tmp_path / "evil-model"
    evil.mkdir()
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (evil / "config.json").write_text(
        '{"model_type": "llama", "auto_map": {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}}'
    )
    checkpoint["hyper_parameters"].update(trust_remote_code=True, model_name_or_path=str(evil))
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    attacked = _run(*config, "--ckpt_path", str(tmp_path / "edited.ckpt"))
    assert attacked.returncode != 0
    assert "model.init_args.trust_remote_code: checkpoint True, config False" in attacked.stderr
    assert not marker.exists(), "the checkpoint made the run load remote code"

    other_class = _run("fit", "--config", "configs/quickstart/dpo.yaml", "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"))
    assert other_class.returncode != 0
    assert "model.class_path: checkpoint 'lit_posttrain.SFTModule', config 'lit_posttrain.DPOModule'" in other_class.stderr
    explicit = _run(*config, "--model.init_args.loss_type", "dft", "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"))
    assert explicit.returncode != 0
    assert "model.init_args.loss_type: checkpoint 'nll', config 'dft'" in explicit.stderr


def test_vllm_engine_logging_is_quiet_unless_verbose():
    """vLLM's logger shows errors only by default (its ~80 INFO/WARNING lines per engine start), and
    everything with LIT_POSTTRAIN_VERBOSE=1 (what --verbose sets)."""
    import os

    probe = ("from lit_posttrain.rollout.vllm_engine import import_vllm; import_vllm(); "
             "import vllm.envs; print(vllm.envs.VLLM_LOGGING_LEVEL)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "LIT_POSTTRAIN_VERBOSE")}
    quiet = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    loud = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**env, "LIT_POSTTRAIN_VERBOSE": "1"})  # fmt: skip
    assert quiet.stdout.split()[-1] == "ERROR", quiet.stderr
    assert loud.stdout.split()[-1] == "INFO", loud.stderr  # vLLM's default
