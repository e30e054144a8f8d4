"""Export the trained model as a plain Hugging Face directory, and optionally push it to the Hub.

`HubExport` writes, at the end of training and optionally every N optimizer steps, a directory
that loads with ``AutoModelForCausalLM.from_pretrained`` (or ``AutoModelForSequenceClassification``
for reward models) and nothing from this package:

    <dirpath>/                      default: <trainer.log_dir or default_root_dir>/export
        checkpoint-<step>/          every ``every_n_train_steps`` optimizer steps (if > 0)
        final/                      at the end of training (``on_train_end``); pushed to the Hub
            model.safetensors       weights (LoRA merged, by default)
            config.json
            generation_config.json  causal LMs
            tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
            README.md               model card: method, paper, base model, dataset,
                                    hyperparameters, final metrics
            adapter/                only with ``lora_export="both"``: the LoRA adapter

Each of ``final/`` and ``checkpoint-<step>/`` is written whole into a hidden temporary directory
beside it (``.final.tmp-*``) and then renamed into place, so a reader never sees a half-written
export and a failed write leaves the previous export untouched. An existing export of the same
name is replaced (renamed aside, then deleted once the new one is in place).

What the callback reads from the LightningModule (the whole protocol):

- ``pl_module.model``: a transformers ``PreTrainedModel`` or a PEFT ``PeftModel`` (one adapter).
- ``pl_module.tokenizer``: a ``PreTrainedTokenizerBase``; saved with its chat template.
- ``pl_module.hparams``: listed in the model card (``random_init`` is reported too).
- Optional class attributes ``METHOD = "DPO"`` and ``PAPER = "https://arxiv.org/abs/2305.18290"``
  name the method and its paper in the card; without them the card names the class.

The dataset comes from ``trainer.datamodule.hparams["train_data"]`` when there is a datamodule
that saved it, the final metrics from ``trainer.callback_metrics``.

LoRA (``lora_export``): ``"merged"`` (default) writes a plain transformers model with the adapter
merged in: it loads anywhere (transformers, vLLM, TGI) without PEFT and without the base weights,
which for a ``random_init`` run exist nowhere else. ``"adapter"`` writes only the adapter
(``PeftModel.from_pretrained(base, path)``), ``"both"`` writes the merged model plus the adapter in
``adapter/``. The training model is never modified: the export is built on a separate CPU copy.

Distributed: every rank takes part in gathering the weights (FSDP2 DTensor parameters are gathered
one tensor at a time with ``full_tensor()``); only global rank 0 holds the CPU copy and writes.
Supports single device, DDP and FSDP2 (``ModelParallelStrategy`` with ``fully_shard``); not
DeepSpeed ZeRO-3 or FSDP1 (their parameters are flat shards).

With ``fast_dev_run`` nothing is exported (as Lightning disables checkpoints and loggers).

Hub (``push_to_hub=True``): ``final/`` is uploaded to ``hub_repo_id`` (created if missing, private
by default) with the token in the ``HF_TOKEN`` environment variable, never anything stored on disk;
missing repo id or token fail before training starts.

    trainer = L.Trainer(callbacks=[HubExport(every_n_train_steps=500)])
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from huggingface_hub import HfApi, ModelCardData
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_posttrain.data import describe_source
from lit_posttrain.models import unwrap_peft

LoRAExport = Literal["adapter", "merged", "both"]
_LORA_EXPORTS = ("adapter", "merged", "both")


class HubExport(L.Callback):
    """Write a plain Hugging Face directory (weights, config, tokenizer, model card); see the module docstring.

    Args:
        dirpath: directory that holds the exports (``final/``, ``checkpoint-<step>/``); default
            ``<trainer.log_dir or trainer.default_root_dir>/export``.
        every_n_train_steps: also export every this many optimizer steps (0: only at the end).
        lora_export: for a PEFT model, ``"merged"`` (a plain transformers model), ``"adapter"``
            (the adapter alone) or ``"both"`` (merged, adapter in ``adapter/``).
        push_to_hub: upload ``final/`` to the Hub after training (token from ``HF_TOKEN``).
        hub_repo_id: e.g. ``"my-org/qwen2.5-0.5b-dpo"``; required with ``push_to_hub``.
        hub_private: create the repository as private (when it does not exist yet).
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        *,
        every_n_train_steps: int = 0,
        lora_export: LoRAExport = "merged",
        push_to_hub: bool = False,
        hub_repo_id: str | None = None,
        hub_private: bool = True,
    ):
        if lora_export not in _LORA_EXPORTS:
            raise ValueError(f"HubExport: lora_export must be one of {_LORA_EXPORTS}, got {lora_export!r}")
        if every_n_train_steps < 0:
            raise ValueError(f"HubExport: every_n_train_steps must be >= 0, got {every_n_train_steps}")
        if push_to_hub and not hub_repo_id:
            raise ValueError("HubExport: push_to_hub=True needs hub_repo_id (e.g. 'my-org/my-model')")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self._export_dir: Path | None = None  # dirpath, or the default resolved in setup
        self.every_n_train_steps = every_n_train_steps
        self.lora_export = lora_export
        self.push_to_hub = push_to_hub
        self.hub_repo_id = hub_repo_id
        self.hub_private = hub_private
        self._last_exported_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.push_to_hub and not os.environ.get("HF_TOKEN"):
            raise ValueError(
                "HubExport: push_to_hub=True needs a Hugging Face token in the HF_TOKEN environment "
                "variable (a write token); set it or set push_to_hub=False"
            )
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it
        self._export_dir = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export"
        self._last_exported_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after configure_model, before the first step: fail now rather than after training
        model, tokenizer = pl_module.model, pl_module.tokenizer
        if not isinstance(model, (PreTrainedModel, PeftModel)):
            raise TypeError(
                f"HubExport: pl_module.model must be a transformers PreTrainedModel or a PEFT PeftModel, "
                f"got {type(model).__name__}"
            )
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                f"HubExport: pl_module.tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
            )
        if isinstance(model, PeftModel) and len(model.peft_config) != 1:
            raise ValueError(
                f"HubExport: exports one LoRA adapter, the model has {sorted(model.peft_config)}"
            )
        if not isinstance(model, PeftModel) and self.lora_export != "merged":
            raise ValueError(
                f"HubExport: lora_export={self.lora_export!r} needs a PEFT (LoRA) model, pl_module.model is a "
                f"{type(model).__name__}; use lora_export='merged' (the default) to export the full model"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        step = trainer.global_step
        # with gradient accumulation several micro-batches end at the same global step: export once
        if self.every_n_train_steps == 0 or step == 0 or step % self.every_n_train_steps != 0:
            return
        if trainer.fast_dev_run:
            return
        if step == self._last_exported_step:
            return
        self._last_exported_step = step
        self.export(trainer, pl_module, self._export_dir / f"checkpoint-{step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            trainer.fast_dev_run
        ):  # like checkpoints and loggers: a smoke test must not replace (or push) an export
            if trainer.is_global_zero:
                print("HubExport: nothing exported (fast_dev_run)")
            return
        target = self._export_dir / "final"
        self.export(trainer, pl_module, target)
        if self.push_to_hub and trainer.is_global_zero:
            self._push(target, _method_name(pl_module), trainer.global_step)
        trainer.strategy.barrier("HubExport.push")

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule, target: Path) -> None:
        """Write ``pl_module``'s model, tokenizer and model card to ``target`` (call it on every rank)."""
        state_dict = _full_state_dict(pl_module.model, keep=trainer.is_global_zero)  # collective
        if trainer.is_global_zero:
            with _atomic_directory(target) as tmp:
                self._write(tmp, trainer, pl_module, state_dict)
            print(f"HubExport: wrote {target.absolute()} ({self._loads_with(pl_module.model)})")
        trainer.strategy.barrier("HubExport.export")

    def _write(self, tmp: Path, trainer: L.Trainer, pl_module: L.LightningModule, state_dict: dict) -> None:
        model_copy = _plain_copy(pl_module.model, state_dict)
        is_lora = isinstance(model_copy, PeftModel)
        written = []  # (directory, library that loads it)
        if is_lora and self.lora_export in ("adapter", "both"):
            adapter_dir = tmp if self.lora_export == "adapter" else tmp / "adapter"
            model_copy.save_pretrained(adapter_dir)
            written.append((adapter_dir, "peft"))
        if not is_lora or self.lora_export in ("merged", "both"):
            if is_lora:
                model_copy = model_copy.merge_and_unload()
            model_copy.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
            written.append((tmp, "transformers"))
        generation_config = unwrap_peft(pl_module.model).generation_config  # None for classifiers
        for directory, library_name in written:
            pl_module.tokenizer.save_pretrained(directory)
            if library_name == "peft" and generation_config is not None:
                generation_config.save_pretrained(directory)
            card = _model_card(trainer, pl_module, library_name, self.lora_export)
            (directory / "README.md").write_text(card)  # replaces the template card PEFT writes

    def _loads_with(self, model: PreTrainedModel | PeftModel) -> str:
        auto_class, _ = _auto_class(model)
        adapter = "peft.PeftModel.from_pretrained(base, path)"
        if not isinstance(model, PeftModel) or self.lora_export == "merged":
            return f"loads with {auto_class}.from_pretrained"
        if self.lora_export == "adapter":
            return f"LoRA adapter: loads with {adapter}"
        return f"loads with {auto_class}.from_pretrained; the LoRA adapter in adapter/ with {adapter}"

    def _push(self, folder: Path, method: str, step: int) -> None:
        api = HfApi(token=os.environ["HF_TOKEN"])  # the token is only ever read from the environment
        api.create_repo(self.hub_repo_id, private=self.hub_private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=self.hub_repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=f"HubExport: {method}, step {step}",
        )
        print(f"HubExport: pushed {folder.absolute()} to https://huggingface.co/{self.hub_repo_id}")


def _full_state_dict(model: torch.nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict as CPU copies; empty unless ``keep``.

    Every rank must call this: a DTensor (FSDP2) parameter is gathered with ``full_tensor()``, a
    collective, one tensor at a time so no rank ever holds more than one full tensor beyond the
    copy rank 0 keeps. Tied parameters (one tensor under two names) are copied once and stay shared.
    """
    state_dict, copies = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in copies:
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            copies[id(tensor)] = full.detach().to("cpu", copy=True) if keep else None
        if keep:
            state_dict[name] = copies[id(tensor)]
    return state_dict


def _plain_class(model: PreTrainedModel) -> type[PreTrainedModel]:
    """The transformers class of ``model``, without the ``FSDP<Name>`` class ``fully_shard`` swaps in."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def _plain_copy(
    model: PreTrainedModel | PeftModel, state_dict: dict[str, torch.Tensor]
) -> PreTrainedModel | PeftModel:
    """An unsharded copy of ``model`` (and of its LoRA adapter) that holds ``state_dict``.

    Built on the meta device (no memory, no random init) and then given the CPU tensors, so merging
    or saving it never touches the training model.
    """
    base = unwrap_peft(model)
    with torch.device("meta"):
        model_copy = _plain_class(base)(copy.deepcopy(base.config))
        model_copy.generation_config = copy.deepcopy(base.generation_config)
        if isinstance(model, PeftModel):
            (adapter_name,) = model.peft_config
            model_copy = PeftModel(
                model_copy, copy.deepcopy(model.peft_config[adapter_name]), adapter_name=adapter_name
            )
    model_copy.load_state_dict(state_dict, assign=True, strict=True)
    return model_copy.eval()


@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` whole.

    On an error the temporary directory is removed and ``target`` is left as it was. The existing
    ``target`` is renamed aside before the new one is renamed into place, so a crash between the two
    renames leaves both on disk (``.<name>.old-*`` and ``.<name>.tmp-*``), never neither.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # not tempfile.mkdtemp: that makes the export private (0700) regardless of umask
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    if target.exists():
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old.exists():
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _auto_class(model: PreTrainedModel | PeftModel) -> tuple[str, str | None]:
    """The Auto class that reloads an export of ``model``, and its Hub pipeline tag."""
    class_name = _plain_class(unwrap_peft(model)).__name__
    if class_name.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification", "text-classification"
    if class_name.endswith("ForCausalLM"):
        return "AutoModelForCausalLM", "text-generation"
    return "AutoModel", None


def _method_name(pl_module: L.LightningModule) -> str:
    return getattr(type(pl_module), "METHOD", type(pl_module).__name__)


def _model_card(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    library_name: str,
    lora_export: str,
) -> str:
    """README.md: YAML metadata for the Hub, then method, base model, data, hyperparameters, metrics."""
    auto_class, pipeline_tag = _auto_class(pl_module.model)
    method = _method_name(pl_module)
    paper = getattr(type(pl_module), "PAPER", None)
    module_class = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"
    hparams = dict(pl_module.hparams)
    base_model = unwrap_peft(pl_module.model).config.name_or_path or None
    random_init = bool(hparams.get("random_init", False))
    data_hparams = dict(trainer.datamodule.hparams) if trainer.datamodule is not None else {}
    train_data = data_hparams.get("train_data")
    dataset = None if train_data is None else describe_source(train_data)
    metrics = {name: float(value) for name, value in sorted(trainer.callback_metrics.items())}

    # Hub metadata only names what is on the Hub: no local paths, no base model for a random init
    metadata = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        base_model=base_model if _on_hub(base_model) and not random_init else None,
        datasets=[train_data] if _on_hub(train_data) else None,
        tags=["lit-posttrain", method.lower()] + (["lora"] if isinstance(pl_module.model, PeftModel) else []),
    )
    if base_model is None:
        base_text = "none (built from a config)"
    elif random_init:
        base_text = f"`{base_model}` (architecture only: weights randomly initialised, `random_init: true`)"
    else:
        base_text = f"`{base_model}`"
    if isinstance(pl_module.model, PeftModel):
        weights_text = {
            "merged": "LoRA adapter merged into the base weights",
            "adapter": "LoRA adapter only",
            "both": "LoRA adapter merged into the base weights; the adapter alone is in `adapter/`",
        }[lora_export]
    else:
        weights_text = "all weights"
    if library_name == "peft":
        load = (
            f"from peft import PeftModel\nfrom transformers import {auto_class}, AutoTokenizer\n\n"
            f"base = {auto_class}.from_pretrained({base_model!r})\n"
            'model = PeftModel.from_pretrained(base, "<this directory or repo id>")\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")'
        )
    else:
        load = (
            f"from transformers import {auto_class}, AutoTokenizer\n\n"
            f'model = {auto_class}.from_pretrained("<this directory or repo id>")\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")'
        )
    training = {
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "precision": trainer.precision,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "world_size": trainer.world_size,
        "optimizer": ", ".join(_describe_optimizer(optimizer) for optimizer in trainer.optimizers),
        "lr_scheduler": ", ".join(type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs)
        or None,
    }
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {method} model",
        "",
        f"Trained with **{method}**"
        + (f" ({paper})" if paper else "")
        + f" using lit-posttrain (`{module_class}`).",
        "",
        f"- Method: {method}" + (f", paper: {paper}" if paper else ""),
        f"- Base model: {base_text}",
        f"- Dataset: {f'`{dataset}`' if dataset else 'not recorded (no datamodule with a train_data hyperparameter)'}",
        f"- Weights: {weights_text}",
        f"- Exported at optimizer step {trainer.global_step}",
        "",
        "## Load",
        "",
        "```python",
        load,
        "```",
        "",
        "## Hyperparameters",
        "",
        _table("Module", hparams),
        _table(
            "Data",
            {
                name: describe_source(value)
                if name in ("train_data", "val_data") and value is not None
                else value
                for name, value in data_hparams.items()
            },
        ),
        _table("Trainer", training),
        "## Final metrics",
        "",
        _table("", {name: f"{value:.6g}" for name, value in metrics.items()}) if metrics else "none logged\n",
    ]
    return "\n".join(lines)


def _on_hub(name: Any) -> bool:
    """A hub id rather than a local path (the rule `lit_posttrain.data.load_rows` follows)."""
    return isinstance(name, str) and bool(name) and not os.path.exists(name)


def _describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """``AdamW(lr=0.0001, weight_decay=0.01, betas=(0.9, 0.999))``: the settings people compare."""
    keys = ("lr", "weight_decay", "betas", "momentum")
    return f"{type(optimizer).__name__}({', '.join(f'{k}={optimizer.defaults[k]}' for k in keys if k in optimizer.defaults)})"


def _table(title: str, values: dict[str, Any]) -> str:
    if not values:
        return ""
    rows = ([f"**{title}**", ""] if title else []) + ["| name | value |", "|---|---|"]
    rows += [f"| {name} | {_format_value(value)} |" for name, value in values.items()]
    return "\n".join(rows) + "\n"


def _format_value(value: Any, limit: int = 200) -> str:
    """One table cell: dataclasses and containers as JSON, tokenizers by name, long values cut."""
    if isinstance(value, PreTrainedTokenizerBase):
        value = value.name_or_path
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = json.dumps(dataclasses.asdict(value), default=str)
    elif isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, default=str)
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "..."
