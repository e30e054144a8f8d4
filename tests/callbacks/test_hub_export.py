"""HubExport: the exported directory reloads with plain transformers / PEFT and equals the trained model.

The round trips use the real SFTModule and RewardModule; the lifecycle tests (atomic writes,
periodic exports, Hub push) use `TinyModule`, a minimal causal LM module that follows the protocol
HubExport reads (``model``, ``tokenizer``, ``hparams``, optional ``METHOD`` / ``PAPER``).
"""

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

import lit_posttrain.callbacks.hub_export as hub_export_module
from lit_posttrain import SFTDataModule, SFTModule
from lit_posttrain.callbacks import HubExport
from lit_posttrain.data import load_rows
from lit_posttrain.models import LoRAConfig, load_model, load_tokenizer
from lit_posttrain.stable.reward import RewardDataModule, RewardModule


class TinyModule(L.LightningModule):
    METHOD = "Tiny LM"

    def __init__(self, model_name_or_path: str, *, random_init: bool = True, init_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = load_model(model_name_or_path, random_init=random_init, init_seed=init_seed)
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        loss = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class TinyDataModule(L.LightningDataModule):
    def __init__(self, tokenizer: str, train_data: str, batch_size: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)

    def setup(self, stage):
        self.rows = list(load_rows(self.hparams.train_data))

    def train_dataloader(self):
        return DataLoader(self.rows, batch_size=self.hparams.batch_size, collate_fn=self.collate)

    def collate(self, rows):
        enc = self.tokenizer([r["prompt"] + r["completion"] for r in rows], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    """Sums as prompt-completion rows (SFT) and as preference pairs (right vs wrong answer)."""
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("data")
    pairs = [(rng.randrange(50), rng.randrange(50)) for _ in range(64)]
    sft = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]
    preference = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a, b in pairs]
    for name, rows in (("sums.jsonl", sft), ("sums_preference.jsonl", preference)):
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"sft": str(directory / "sums.jsonl"), "preference": str(directory / "sums_preference.jsonl")}


@pytest.fixture
def train_file(data_files) -> str:
    return data_files["sft"]


def adamw(lr):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def fit(module, datamodule, tmp_path, callbacks, max_steps=2, **trainer_kwargs):
    """``datamodule``: a LightningDataModule, or a data file for `TinyDataModule`."""
    trainer_kwargs = {"logger": False, **trainer_kwargs}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    if isinstance(datamodule, str):
        datamodule = TinyDataModule(module.hparams.model_name_or_path, datamodule)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def encode(tokenizer):
    return tokenizer(["12+30=42", "7+5=12, 19+2=21"], padding=True, return_tensors="pt")


@torch.no_grad()
def logits(model, inputs):
    return model.eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


class Snapshot(L.Callback):
    """Copies of the training model's state dict: at the end of training, and per optimizer step."""

    def __init__(self):
        self.at_end, self.per_step = None, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step[trainer.global_step] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        self.at_end = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_export_round_trip(tiny_model_dir, train_file, tmp_path, capsys):
    """The default export (<log dir>/export/final) reloads with Auto classes and gives the trained model's
    logits; the tokenizer, chat template and generation config survive; the card names the run."""
    module = SFTModule(tiny_model_dir, random_init=True, optimizer=adamw(1e-2))
    datamodule = SFTDataModule(tiny_model_dir, train_data=train_file, batch_size=8, max_length=64)
    fit(module, datamodule, tmp_path, [HubExport()], max_steps=3)
    final = tmp_path / "export" / "final"
    assert (
        f"HubExport: wrote {final.absolute()} (loads with AutoModelForCausalLM.from_pretrained"
        in capsys.readouterr().out
    )
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))

    inputs = encode(module.tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(reloaded, inputs), logits(module.model, inputs), atol=1e-5, rtol=0)
    # the export holds the trained weights, not the initial ones
    initial = load_model(tiny_model_dir, random_init=True, init_seed=0)
    assert (logits(initial, inputs) - logits(reloaded, inputs)).abs().max() > 1e-3
    assert reloaded.generation_config.eos_token_id == [1, 3]
    assert reloaded.config.tie_word_embeddings

    tokenizer = AutoTokenizer.from_pretrained(final)
    text = "<|im_start|>user\nWhat is 12+30?<|im_end|>\n"
    assert tokenizer(text)["input_ids"] == module.tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert (
        tokenizer.chat_template == module.tokenizer.chat_template
        and "{% generation %}" in tokenizer.chat_template
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == module.tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)

    card = (final / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "library_name: transformers" in metadata and "pipeline_tag: text-generation" in metadata
    assert "base_model" not in metadata  # a random init from a local path is not a Hub base model
    assert "Trained with **SFT** (https://arxiv.org/abs/2203.02155)" in card
    # names, never the user's filesystem layout: a local path is shown by its last component
    assert "Base model: `local: tiny-model` (architecture only" in card
    assert "Dataset: `local: sums.jsonl`" in card and "| tokenizer | local: tiny-model |" in card
    for local in (tmp_path, Path(train_file).parent, tiny_model_dir):
        assert str(local) not in card
    assert (
        "| loss_type | nll |" in card
        and "| optimizer | AdamW(lr=0.01," in card
        and "| global_step | 3 |" in card
    )
    logged = next(line for line in card.splitlines() if line.startswith("| train/loss |"))
    assert abs(float(logged.split("|")[2]) - float(module.trainer.callback_metrics["train/loss"])) < 1e-5


def test_lora_export(tiny_model_dir, train_file, tmp_path):
    """lora_export="both": the merged model and the adapter on its base both give the trained PEFT model's
    logits; the merged directory is a plain transformers model; the training model is left untouched."""
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0)
    module = SFTModule(tiny_model_dir, random_init=True, lora=lora, optimizer=adamw(1e-2))
    datamodule = SFTDataModule(tiny_model_dir, train_data=train_file, batch_size=8, max_length=64)
    snapshot = Snapshot()  # runs before HubExport's on_train_end
    fit(
        module, datamodule, tmp_path, [snapshot, HubExport(tmp_path / "out", lora_export="both")], max_steps=3
    )
    final = tmp_path / "out" / "final"
    inputs = encode(module.tokenizer)
    expected = logits(module.model, inputs)
    with module.model.disable_adapter():
        base_logits = logits(module.model, inputs)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter learned something: merging matters

    merged = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(merged, PreTrainedModel) and not isinstance(merged, PeftModel)
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=0)
    with safe_open(final / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys
    assert not [k for k in keys if "lora" in k or "base_layer" in k or "base_model" in k]
    assert not (final / "adapter_config.json").exists()
    assert json.loads((final / "config.json").read_text())["tie_word_embeddings"] is True

    base = load_model(tiny_model_dir, random_init=True, init_seed=0)
    adapted = PeftModel.from_pretrained(base, final / "adapter")
    torch.testing.assert_close(logits(adapted, inputs), expected, atol=1e-5, rtol=0)
    assert (final / "adapter" / "tokenizer.json").is_file()
    adapter_card = (final / "adapter" / "README.md").read_text()
    assert "library_name: peft" in adapter_card and "<the base model: local: tiny-model>" in adapter_card
    assert tiny_model_dir not in adapter_card

    # the training model: still a PEFT model with its adapter active and unmerged, same weights as before export
    assert isinstance(module.model, PeftModel) and module.model.active_adapters == ["default"]
    lora_layers = [m for m in module.model.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and not any(m.merged for m in lora_layers)
    after = module.model.state_dict()
    assert after.keys() == snapshot.at_end.keys()
    assert all(torch.equal(after[k], v) for k, v in snapshot.at_end.items())


def test_atomic_replace_and_failed_write(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """With overwrite=True an existing export is replaced whole; a write that fails half-way leaves the
    previous export byte for byte and no temporary directory behind, and saves the trained model as a
    Lightning checkpoint that the error names, with the command that exports it."""
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "stale.txt").write_text("from an older run")
    fit(TinyModule(tiny_model_dir), train_file, tmp_path, [HubExport(out, overwrite=True)], max_steps=1)
    assert os.listdir(out) == ["final"]
    assert not (out / "final" / "stale.txt").exists() and (out / "final" / "model.safetensors").is_file()
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}

    def broken_save(self, save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half a file")
        raise OSError("simulated: no space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    module = TinyModule(tiny_model_dir, init_seed=1)
    with pytest.raises(OSError, match="simulated") as failure:
        fit(module, train_file, tmp_path, [HubExport(out, overwrite=True)], max_steps=1)
    assert os.listdir(out) == ["final"]
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before

    (rescued,) = tmp_path.glob("hubexport-rescue-step1-*.ckpt")  # in trainer.default_root_dir
    message = str(failure.value)
    assert f"saved as a Lightning checkpoint in {rescued}" in message
    assert (
        f"lit-posttrain export --config YOUR_TRAINING_CONFIG.yaml --ckpt {rescued} --out {out / 'final'}"
        in message
    )
    saved = torch.load(rescued, weights_only=True)["state_dict"]
    trained = module.state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_existing_final_export_is_not_replaced(tiny_model_dir, train_file, tmp_path):
    """A run whose dirpath already holds final/ fails at setup, before any step, naming the path and the ways
    out; the default dirpath is per logger version, so two runs there both export."""
    out = tmp_path / "out"
    fit(TinyModule(tiny_model_dir), train_file, tmp_path, [HubExport(out)], max_steps=1)
    before = (out / "final" / "model.safetensors").read_bytes()
    module = TinyModule(tiny_model_dir, init_seed=1)
    with pytest.raises(ValueError, match="already exists") as failure:
        fit(module, train_file, tmp_path, [HubExport(out)], max_steps=1)
    assert module.steps_run == 0 and (out / "final" / "model.safetensors").read_bytes() == before
    message = str(failure.value)
    assert str(out / "final") in message and "overwrite: true" in message and "another dirpath" in message
    assert "leave dirpath unset" in message

    for seed in (0, 1):
        logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
        fit(
            TinyModule(tiny_model_dir, init_seed=seed),
            train_file,
            tmp_path,
            [HubExport()],
            max_steps=1,
            logger=logger,
        )
    versions = tmp_path / "logs" / "lightning_logs"
    assert all(
        (versions / v / "export" / "final" / "model.safetensors").is_file()
        for v in ("version_0", "version_1")
    )


class SetToNaN(L.Callback):
    """Puts a NaN into a weight at the end of training, as a diverged run would (before HubExport exports)."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model.model.norm.weight[0] = float("nan")


def test_non_finite_weights_are_never_exported(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """A model with a NaN weight is neither written nor pushed: the error names how many tensors and the
    first, and the previous final/ stays byte for byte."""
    out = tmp_path / "out"
    fit(TinyModule(tiny_model_dir), train_file, tmp_path, [HubExport(out)], max_steps=1)
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(hub_export_module, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    export = HubExport(out, overwrite=True, push_to_hub=True, hub_repo_id="me/tiny")
    non_finite = r"1 of \d+ weight tensors hold NaN or Inf values \(the first: model.norm.weight\)"
    with pytest.raises(FloatingPointError, match=non_finite):
        fit(TinyModule(tiny_model_dir, init_seed=1), train_file, tmp_path, [SetToNaN(), export], max_steps=1)
    assert os.listdir(out) == ["final"]
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before
    assert FakeHfApi.calls == []
    assert not list(tmp_path.glob("hubexport-rescue-*"))  # a diverged model is not worth a checkpoint


def test_unwritable_export_directory_fails_before_training(tiny_model_dir, train_file, tmp_path):
    """An export directory that cannot be written fails at setup, before any step (not after training)."""
    if (
        os.geteuid() == 0
    ):  # root writes into a 0o555 directory: a path under a regular file fails for root too
        (tmp_path / "file.txt").write_text("a file, not a directory")
        out = tmp_path / "file.txt" / "export"
    else:
        (tmp_path / "read-only").mkdir(mode=0o555)
        out = tmp_path / "read-only" / "export"
    module = TinyModule(tiny_model_dir)
    with pytest.raises(
        OSError, match=r"cannot write to the export directory .*export.*Choose a writable dirpath"
    ):
        fit(module, train_file, tmp_path, [HubExport(out)])
    assert module.steps_run == 0


def test_full_disk_fails_before_training(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """Less free space than ~1.2 x the parameter bytes on the export disk fails before the first step."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    module = TinyModule(tiny_model_dir)
    with pytest.raises(OSError, match=r"has 0.00 MiB free, the export needs about \d+\.\d+ MiB \(1.2 x"):
        fit(module, train_file, tmp_path, [HubExport(tmp_path / "out")])
    assert module.steps_run == 0


def test_every_n_train_steps(tiny_model_dir, train_file, tmp_path):
    """every_n_train_steps=2 over 5 optimizer steps (2 micro-batches each) writes checkpoint-2 and
    checkpoint-4 holding the weights of those steps, plus final."""
    snapshot = Snapshot()
    module = TinyModule(tiny_model_dir)
    fit(
        module,
        train_file,
        tmp_path,
        [snapshot, HubExport(tmp_path / "out", every_n_train_steps=2)],
        max_steps=5,
        accumulate_grad_batches=2,
    )
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-2", "checkpoint-4", "final"]
    assert not torch.equal(
        snapshot.per_step[2]["model.norm.weight"], snapshot.per_step[4]["model.norm.weight"]
    )
    for step in (2, 4):
        directory = tmp_path / "out" / f"checkpoint-{step}"
        saved = load_file(directory / "model.safetensors")
        assert saved and all(torch.equal(saved[k], snapshot.per_step[step][k]) for k in saved)
        assert f"Exported at optimizer step {step}" in (directory / "README.md").read_text()
        assert (directory / "tokenizer.json").is_file()
    assert "Exported at optimizer step 5" in (tmp_path / "out" / "final" / "README.md").read_text()


def test_option_errors(tiny_model_dir, train_file, tmp_path):
    """Bad options fail when the callback is built, or before the first training step, naming the option."""
    with pytest.raises(ValueError, match="lora_export must be one of"):
        HubExport(lora_export="full")
    with pytest.raises(ValueError, match="every_n_train_steps"):
        HubExport(every_n_train_steps=-1)
    module = TinyModule(tiny_model_dir)
    with pytest.raises(ValueError, match="lora_export='adapter' needs a PEFT"):
        fit(module, train_file, tmp_path, [HubExport(lora_export="adapter")])
    assert module.steps_run == 0


def test_fast_dev_run_exports_nothing(tiny_model_dir, train_file, tmp_path):
    """A fast_dev_run smoke test neither writes nor replaces an export (as with checkpoints)."""
    module = TinyModule(tiny_model_dir)
    fit(module, train_file, tmp_path, [HubExport(tmp_path / "out", every_n_train_steps=1)], fast_dev_run=2)
    assert module.steps_run == 2 and not (tmp_path / "out").exists()


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: the Hub cannot be reached from here (no network), so the
    push path is checked up to the calls it makes, recorded instead of sent."""

    calls: ClassVar[list] = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(os.listdir(kwargs["folder_path"]))}))


def test_push_to_hub(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    """push_to_hub without a repo id or without HF_TOKEN fails before training, naming what is missing;
    with both, final/ is uploaded to a private repo and the token is written nowhere."""
    with pytest.raises(ValueError, match="hub_repo_id"):
        HubExport(push_to_hub=True)

    monkeypatch.delenv("HF_TOKEN", raising=False)
    module = TinyModule(tiny_model_dir)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        fit(module, train_file, tmp_path, [HubExport(push_to_hub=True, hub_repo_id="me/tiny")])
    assert module.steps_run == 0 and not (tmp_path / "export").exists()

    secret = "hf_SECRETtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(hub_export_module, "HfApi", FakeHfApi)  # the module imports HfApi by name
    FakeHfApi.calls = []
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
    fit(
        TinyModule(tiny_model_dir),
        train_file,
        tmp_path,
        [HubExport(push_to_hub=True, hub_repo_id="me/tiny")],
        logger=logger,
        log_every_n_steps=1,
    )
    final = tmp_path / "logs" / "lightning_logs" / "version_0" / "export" / "final"  # under trainer.log_dir
    (_, init), (_, create), (_, upload) = FakeHfApi.calls
    assert init == {"token": secret}
    assert create["repo_id"] == "me/tiny" and create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == "me/tiny" and Path(upload["folder_path"]) == final
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(upload["files"])

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert final / "model.safetensors" in written and any(p.suffix == ".csv" for p in written)
    assert not [p for p in written if secret.encode() in p.read_bytes()]
    captured = capsys.readouterr()
    assert "pushed" in captured.out and secret not in captured.out + captured.err


@pytest.mark.parametrize("lora", [None, LoRAConfig(r=4, alpha=8, dropout=0.0)], ids=["full", "lora"])
def test_sequence_classification_round_trip(tiny_model_dir, data_files, tmp_path, lora):
    """A reward model (sequence classification, full or LoRA with a trained score head) reloads with
    AutoModelForSequenceClassification and gives the trained model's scores."""
    module = RewardModule(tiny_model_dir, random_init=True, lora=lora, optimizer=adamw(1e-2))
    datamodule = RewardDataModule(tiny_model_dir, train_data=data_files["preference"], batch_size=8)
    fit(module, datamodule, tmp_path, [HubExport(tmp_path / "out")], max_steps=3)
    final = tmp_path / "out" / "final"
    inputs = encode(module.tokenizer)
    reloaded = AutoModelForSequenceClassification.from_pretrained(final)
    assert type(reloaded).__name__ == "LlamaForSequenceClassification"
    assert (reloaded.config.num_labels, reloaded.config.pad_token_id) == (1, 0)
    expected = logits(module.model, inputs)
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=1e-5, rtol=0)
    initial = load_model(tiny_model_dir, task="sequence-classification", random_init=True, init_seed=0)
    # trained (with LoRA: the adapter and the score head, a module PEFT saves in full)
    assert (logits(initial, inputs) - expected).abs().max() > 1e-4
    card = (final / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "Trained with **Reward modeling**" in card
    assert "AutoModelForSequenceClassification.from_pretrained(" in card


def test_card_names_local_paths_by_name(tmp_path, monkeypatch):
    """In the card a local path (absolute, home, or existing relative) becomes ``local: <last component>``
    wherever it sits (nested in dicts and lists too); hub ids and plain values stay as they are."""
    public = hub_export_module._public
    (tmp_path / "data").mkdir()
    (tmp_path / "train").mkdir()
    monkeypatch.chdir(tmp_path)
    assert public(str(tmp_path / "data" / "rows.jsonl")) == "local: rows.jsonl"  # absolute, even if missing
    assert public("data") == "data" and public("train") == "train"  # a bare name shows no layout: kept
    assert public("./data") == "local: data" and public("~/models/my-llama") == "local: my-llama"
    assert (
        public("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
        and public("trl-lib/ultrafeedback") == "trl-lib/ultrafeedback"
    )
    assert public({"paths": [str(tmp_path), "org/model"], "lr": 0.1}) == {
        "paths": [f"local: {tmp_path.name}", "org/model"],
        "lr": 0.1,
    }
    assert public(LoRAConfig(target_modules=["q_proj"])) == {
        **dataclasses.asdict(LoRAConfig()),
        "target_modules": ["q_proj"],
    }


def test_a_killed_export_is_cleaned_up_by_the_next_run(tiny_model_dir, train_file, tmp_path):
    """What a SIGKILL during an export leaves (a half-written temporary directory; an earlier export moved
    aside) is removed or put back at the next run's setup; live processes' and other machines' are kept."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    killed = (
        "import os, signal, sys\nfrom pathlib import Path\n"
        "from lit_posttrain.callbacks.hub_export import _atomic_directory\n"
        "with _atomic_directory(Path(sys.argv[1]) / 'final') as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 2**20)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", killed, str(out)], capture_output=True)
    assert run.returncode == -signal.SIGKILL
    (half_written,) = out.glob(".final.tmp-*")
    dead_pid = int(half_written.name.split("-")[-2])
    host = hub_export_module._HOST
    moved_aside = out / f".checkpoint-2.old-{host}-{dead_pid}-0123456789ab"
    moved_aside.mkdir()
    (moved_aside / "config.json").write_text("{}")
    live = out / f".checkpoint-4.tmp-{host}-{os.getpid()}-0123456789ab"  # this process: still exporting
    elsewhere = out / f".final.tmp-otherhost-{dead_pid}-0123456789ab"  # a shared filesystem's other node
    live.mkdir(), elsewhere.mkdir()

    fit(TinyModule(tiny_model_dir), train_file, tmp_path, [HubExport(out)], max_steps=1)
    assert not half_written.exists()
    assert (out / "checkpoint-2" / "config.json").read_text() == "{}" and not moved_aside.exists()
    assert live.is_dir() and elsewhere.is_dir()
    assert (out / "final" / "model.safetensors").is_file()
