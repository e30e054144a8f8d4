"""`lit-posttrain export`: a Lightning checkpoint becomes the directory HubExport writes, same weights.

Three runs, each with a ModelCheckpoint and HubExport, so the command's output is compared with
HubExport's export of the same run: the SFT quickstart through the CLI (its saved config.yaml is the
--config), a LoRA run with a plain Trainer (a YAML written for it), and a 2-process FSDP2 run
(tests/distributed/fit_script.py), whose checkpoint is a directory of shards.
"""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lit_posttrain import SFTDataModule, SFTModule
from lit_posttrain import export as export_command
from lit_posttrain.callbacks import HubExport
from lit_posttrain.cli import cli_main
from lit_posttrain.models import LoRAConfig, load_model

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "examples" / "tiny-model"
SFT_DATA = ROOT / "examples" / "data" / "sft"
FIT_SCRIPT = ROOT / "tests" / "distributed" / "fit_script.py"


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert tensor.dtype == b[name].dtype and torch.equal(tensor, b[name]), name


@torch.no_grad()
def logits(model) -> torch.Tensor:
    input_ids = torch.tensor([[5, 17, 22, 9, 30, 41], [7, 7, 12, 3, 50, 2]])
    return model.eval()(input_ids=input_ids).logits


def table(card: str, title: str) -> str:
    """The card's ``**title**`` hyperparameter table."""
    return card.split(f"**{title}**")[1].split("**")[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The SFT quickstart, 3 steps of `lit-posttrain fit` (in-process), with a checkpoint and HubExport."""
    root = tmp_path_factory.mktemp("cli_run")
    override = root / "override.yaml"
    override.write_text(f"""\
trainer:
  max_steps: 3
  num_sanity_val_steps: 0
  limit_val_batches: 0
  enable_checkpointing: true
  enable_progress_bar: false
  default_root_dir: {root}
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {root}}}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root / "ckpt"}, save_last: true, save_top_k: 0}}
    - {{class_path: lit_posttrain.callbacks.HubExport, init_args: {{dirpath: {root / "export"}}}}}
model: {{init_args: {{model_name_or_path: {TINY_MODEL}}}}}
data: {{init_args: {{train_data: {SFT_DATA / "train.jsonl"}, val_data: {SFT_DATA / "val.jsonl"}}}}}
""")  # fmt: skip
    cli = cli_main(
        ["fit", "--config", str(ROOT / "configs" / "quickstart" / "sft.yaml"), "--config", str(override)]
    )
    (config,) = root.glob("lightning_logs/version_*/config.yaml")
    return {"root": root, "config": config, "ckpt": root / "ckpt" / "last.ckpt", "module": cli.model}


def test_cli_checkpoint_exports_as_hub_export(cli_run, tmp_path):
    """`python -m lit_posttrain export` on a CLI run's last.ckpt with its config.yaml writes the weights
    HubExport wrote, bit for bit; they load with AutoModelForCausalLM and give the trained module's logits
    exactly; the card has HubExport's Module and Data tables and no local path."""
    out = tmp_path / "hf"
    command = [sys.executable, "-m", "lit_posttrain", "export", "--config", str(cli_run["config"]),
               "--ckpt", str(cli_run["ckpt"]), "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert (
        f"lit-posttrain export: wrote {out} from {cli_run['ckpt']} (optimizer step 3; loads with"
        in result.stdout
    )

    hub_export = cli_run["root"] / "export" / "final"
    assert_same_tensors(tensors(out), tensors(hub_export))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in hub_export.iterdir())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), logits(cli_run["module"].model))

    card, hub_card = (out / "README.md").read_text(), (hub_export / "README.md").read_text()
    for title in ("Module", "Data"):
        assert table(card, title) == table(hub_card, title)
    assert "Exported at optimizer step 3, from checkpoint `last.ckpt`" in card
    assert "Base model: `local: tiny-model`" in card and "Dataset: `local: train.jsonl`" in card
    assert str(cli_run["root"]) not in card and str(ROOT) not in card


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA SFT run with a plain Trainer (hparams hold a LoRAConfig), a checkpoint, HubExport(both)."""
    root = tmp_path_factory.mktemp("lora_run")
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0)
    module = SFTModule(
        str(TINY_MODEL), random_init=True, lora=lora, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)
    )
    data = SFTDataModule(
        str(TINY_MODEL), train_data=str(SFT_DATA / "train.jsonl"), batch_size=8, max_length=32
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0),
                   HubExport(root / "export", lora_export="both")],
    )  # fmt: skip
    trainer.fit(module, data)
    config = root / "sft_lora.yaml"
    config.write_text(f"""\
model:
  class_path: lit_posttrain.SFTModule
  init_args:
    model_name_or_path: {TINY_MODEL}
    random_init: true
    lora: {{r: 4, alpha: 8, dropout: 0.0}}
""")
    return {"root": root, "config": config, "ckpt": root / "ckpt" / "last.ckpt", "module": module}


def test_lora_checkpoint_exports_merged_and_adapter(lora_run, tmp_path):
    """--lora_export both: the merged model and the adapter equal HubExport's bit for bit; the adapter loads
    with PEFT on the base and gives the trained PEFT model's logits."""
    out = tmp_path / "hf"
    argv = ["--config", str(lora_run["config"]), "--ckpt", str(lora_run["ckpt"]), "--out", str(out)]
    export_command.main([*argv, "--lora_export", "both"])
    hub_export = lora_run["root"] / "export" / "final"
    assert_same_tensors(tensors(out), tensors(hub_export))
    assert_same_tensors(load_file(out / "adapter" / "adapter_model.safetensors"),
                        load_file(hub_export / "adapter" / "adapter_model.safetensors"))  # fmt: skip

    expected = logits(lora_run["module"].model)
    merged, hub_merged = (AutoModelForCausalLM.from_pretrained(d) for d in (out, hub_export))
    assert torch.equal(logits(merged), logits(hub_merged))
    adapted = PeftModel.from_pretrained(
        load_model(str(TINY_MODEL), random_init=True, init_seed=0), out / "adapter"
    )
    torch.testing.assert_close(logits(adapted), expected, atol=1e-5, rtol=0)
    card = (out / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "<the base model: local: tiny-model>" in card
    assert str(TINY_MODEL) not in card


def test_fsdp2_sharded_checkpoint(tmp_path):
    """The directory of shards a 2-process FSDP2 run checkpoints (last.ckpt/*.distcp + meta.pt) exports to
    the weights that run's HubExport gathered, bit for bit."""
    spec = tmp_path / "runs.json"
    run = {"root": str(tmp_path), "name": "sft_fsdp2", "method": "sft", "strategy": "fsdp2", "devices": 2,
           "batch_size": 8, "max_steps": 2, "checkpoint": True}  # fmt: skip
    spec.write_text(json.dumps([run]))
    command = [sys.executable, str(FIT_SCRIPT), str(spec)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "sft_fsdp2" / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and list(ckpt.glob("*.distcp")) and (ckpt / "meta.pt").is_file()
    config = tmp_path / "sft.yaml"  # fit_script.py's SFT module
    config.write_text(f"model: {{class_path: lit_posttrain.SFTModule, init_args: "
                      f"{{model_name_or_path: {TINY_MODEL}, random_init: true}}}}\n")  # fmt: skip

    out = tmp_path / "hf"
    export_command.main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(out)])
    assert_same_tensors(tensors(out), tensors(tmp_path / "sft_fsdp2" / "export" / "final"))


def test_refusals(cli_run, lora_run, tmp_path, capsys):
    """No --config, a checkpoint of another module class, a config whose module the weights do not fit,
    NaN weights, or an existing --out without --overwrite: a clear error, and nothing written."""
    out = tmp_path / "hf"
    ckpt = ["--ckpt", str(cli_run["ckpt"]), "--out", str(out)]
    with pytest.raises(SystemExit):
        export_command.main(ckpt)
    assert "--config is required" in capsys.readouterr().err

    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(
        f"model: {{class_path: lit_posttrain.DPOModule, init_args: {{model_name_or_path: {TINY_MODEL}}}}}\n"
    )
    other_class = (
        r"written by a lit_posttrain.SFTModule module, the config builds a "
        r"lit_posttrain.stable.dpo.DPOModule; pass the training config of the run"
    )
    with pytest.raises(SystemExit, match=other_class):
        export_command.main(["--config", str(dpo), *ckpt])

    no_lora = tmp_path / "no_lora.yaml"  # the LoRA run's config without its lora section
    no_lora.write_text(
        lora_run["config"].read_text().replace("    lora: {r: 4, alpha: 8, dropout: 0.0}\n", "")
    )
    assert "lora" not in no_lora.read_text()
    not_fitting = (
        r"tensors do not fit the SFTModule the config builds: "
        r"\d+ missing \(first: model.model.embed_tokens.weight\); "
        r"\d+ unexpected \(first: model.base_model.model.model.embed_tokens.weight\)"
    )
    with pytest.raises(SystemExit, match=not_fitting):
        export_command.main(["--config", str(no_lora), "--ckpt", str(lora_run["ckpt"]), "--out", str(out)])

    checkpoint = torch.load(cli_run["ckpt"], weights_only=True)
    checkpoint["state_dict"]["model.model.norm.weight"][3] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    non_finite = (
        r"1 of 21 weight tensors hold NaN or Inf values \(the first: model.norm.weight\); the run had"
    )
    with pytest.raises(SystemExit, match=non_finite):
        export_command.main(
            ["--config", str(cli_run["config"]), "--ckpt", str(tmp_path / "nan.ckpt"), "--out", str(out)]
        )
    assert not out.exists() and not list(tmp_path.glob(".hf*"))

    out.mkdir()
    (out / "mine.txt").write_text("not to be lost")
    with pytest.raises(SystemExit, match="already exists: pass --overwrite"):
        export_command.main(["--config", str(cli_run["config"]), *ckpt])
    assert (out / "mine.txt").read_text() == "not to be lost"
    export_command.main(["--config", str(cli_run["config"]), *ckpt, "--overwrite"])
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
