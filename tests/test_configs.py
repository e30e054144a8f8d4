"""Every YAML in configs/ is instantiated through the CLI, without downloading anything.

Local configs (the quickstarts) are instantiated as they are. Configs that name a hub model are
parsed and type-checked against the classes' signatures as they are, then instantiated with the
model swapped for the tiny local one (``random_init``), so every other argument is still checked
by the real constructors. Strategy configs are merged with the SFT quickstart.
"""

from pathlib import Path

import pytest
import torch
import yaml

from lit_posttrain.cli import PostTrainCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "strategies" not in p.parts)
STRATEGIES = sorted((ROOT / "configs" / "strategies").glob("*.yaml"))
TINY = str(ROOT / "examples" / "tiny-model")


class ParseOnlyCLI(PostTrainCLI):
    """Parse and validate the config, build nothing."""

    def instantiate_classes(self) -> None:
        pass


def _cli(cls, args):
    from lightning import LightningDataModule, LightningModule

    return cls(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args, run=False
    )  # fmt: skip


def _is_local(config: dict) -> bool:
    path = config["model"]["init_args"]["model_name_or_path"]
    return (ROOT / path).exists()


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_instantiates(path, monkeypatch):
    """A shipped YAML has a header with its launch command and builds its module, data and trainer."""
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load(path.read_text())
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), f"{path.name}: configs start with a header comment"
    assert "lit-posttrain fit --config" in path.read_text(), f"{path.name}: the header names its launch command"
    parsed = _cli(ParseOnlyCLI, ["--config", str(path)]).config
    assert parsed.model.class_path.startswith("lit_posttrain")
    args = ["--config", str(path)]
    if not _is_local(config):
        args += ["--model.init_args.model_name_or_path", TINY, "--model.init_args.random_init", "true"]
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
        if config["model"]["init_args"].get("attn_implementation") == "flash_attention_2":
            args += ["--model.init_args.attn_implementation", "sdpa"]
        if config["model"]["init_args"].get("dtype") in ("bfloat16", "float16"):
            args += ["--model.init_args.dtype", "float32"]
    cli = _cli(PostTrainCLI, args)
    assert type(cli.model).__name__ == parsed.model.class_path.rsplit(".", 1)[1]
    assert cli.datamodule.tokenizer is not None
    assert cli.trainer is not None
    optimizer = cli.model.optimizer([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW), f"{path.name}: AdamW, as every method's default"
    assert optimizer.defaults["fused"], f"{path.name}: AdamW is fused (the default; TRL's adamw_torch_fused)"


@pytest.mark.parametrize("path", STRATEGIES, ids=[p.name for p in STRATEGIES])
def test_strategy_config_merges_with_a_method_config(path, monkeypatch):
    """A strategy YAML merges with a method config and sets the strategy."""
    monkeypatch.chdir(ROOT)
    parsed = _cli(ParseOnlyCLI, ["--config", "configs/quickstart/sft.yaml", "--config", str(path)]).config
    assert parsed.trainer.strategy is not None
    assert path.read_text().startswith("#")
