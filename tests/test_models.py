"""Model loading (lit_posttrain.models): train mode, dropout, errors."""

from pathlib import Path

import lightning as L
import torch

from lit_posttrain import SFTDataModule, SFTModule
from lit_posttrain.models import load_model


def test_pretrained_model_trains_in_train_mode(tiny_model_dir, tmp_path):
    """A model loaded from saved weights is in train mode at every training step (from_pretrained returns eval)."""
    load_model(tiny_model_dir, random_init=True).save_pretrained(tmp_path / "pretrained")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "pretrained" / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    assert load_model(str(tmp_path / "pretrained")).training

    modes = []

    class RecordMode(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(all(m.training for m in pl_module.model.modules()))

    module = SFTModule(str(tmp_path / "pretrained"))
    data = SFTDataModule(str(tmp_path / "pretrained"), train_data="examples/data/sft/val.jsonl", batch_size=8, max_length=16)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordMode()])  # fmt: skip
    trainer.fit(module, data)
    assert modes == [True, True]


def test_disable_dropout_zeroes_every_dropout_module():
    """disable_dropout sets p=0 on every nn.Dropout and keeps the model in train mode."""
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}
    kept = load_model(None, random_init=True, model_config=config)
    assert {m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    model = load_model(None, random_init=True, model_config=config, disable_dropout=True)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts) and model.training


def test_transformer_blocks_are_found_by_class_or_base_class(tiny_model):
    """The decoder layers are the modules whose class the model names in `_no_split_modules`; after FSDP2's
    fully_shard, which swaps each layer's class for an ``FSDP<name>`` subclass, they are still found."""
    from lit_posttrain.models import transformer_blocks

    layers = transformer_blocks(tiny_model)
    assert layers == list(tiny_model.model.layers) and len(layers) == tiny_model.config.num_hidden_layers
    for layer in layers:  # what fully_shard does to the class
        layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    assert transformer_blocks(tiny_model) == layers
