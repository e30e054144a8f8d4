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
