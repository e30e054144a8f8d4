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
                                    hyperparameters, final metrics (names, never local paths)
            adapter/                only with ``lora_export="both"``: the LoRA adapter

Each of ``final/`` and ``checkpoint-<step>/`` is written whole into a hidden temporary directory
beside it (``.final.tmp-<host>-<pid>-*``) and then renamed into place, so a reader never sees a
half-written export and a failed write leaves the previous export untouched. A periodic
``checkpoint-<step>/`` replaces an earlier one of the same name. A run killed while exporting
(SIGKILL, a node failure) leaves its temporary directory behind: the next run's ``setup`` removes
those of processes of this machine that no longer run, and puts back a previous export a kill
caught between the two renames (``.final.old-*`` while ``final/`` is missing).

An export is never lost or replaced by a broken one:

1. ``<dirpath>/final`` of an earlier run is not replaced unless ``overwrite=True``: the run fails at
   ``setup``, before the first step. The default ``dirpath`` (``<trainer.log_dir>/export``) is new for
   every logger version, i.e. every run.
2. At ``setup`` the export directory is created and a file written to it and deleted, and before the
   first step its disk must have about 1.2 x the model's parameter bytes free: an unwritable or full
   disk fails before training rather than after it.
3. Weights with a NaN or Inf (a diverged run) are never written or pushed: the export raises
   ``FloatingPointError`` naming how many tensors and the first one, and the previous export stays.
4. If writing still fails (``OSError``: the disk filled up during training...), the trained model is
   saved as a Lightning checkpoint (``trainer.save_checkpoint``) in ``trainer.default_root_dir``, or
   the system temp directory when that is not writable, and the error says where and how to export
   it later with ``lit-posttrain export`` (`lit_posttrain.export`, which writes the same directory
   from any checkpoint through `write_hf_directory`).

What the callback reads from the LightningModule (the whole protocol):

- ``pl_module.model``: a transformers ``PreTrainedModel`` or a PEFT ``PeftModel`` (one adapter).
- ``pl_module.tokenizer``: a ``PreTrainedTokenizerBase``; saved with its chat template.
- ``pl_module.hparams``: listed in the model card (``random_init`` is reported too).
- Optional class attributes ``METHOD = "DPO"`` and ``PAPER = "https://arxiv.org/abs/2305.18290"``
  name the method and its paper in the card; without them the card names the class.

The dataset comes from ``trainer.datamodule.hparams["train_data"]`` when there is a datamodule
that saved it, the final metrics from ``trainer.callback_metrics``. The card names models and data
by hub id, or by the last component of a local path (``local: tiny-model``): it never shows the
user's filesystem layout.

LoRA (``lora_export``): ``"merged"`` (default) writes a plain transformers model with the adapter
merged in: it loads anywhere (transformers, vLLM, TGI) without PEFT and without the base weights,
which for a ``random_init`` run exist nowhere else. ``"adapter"`` writes only the adapter
(``PeftModel.from_pretrained(base, path)``), ``"both"`` writes the merged model plus the adapter in
``adapter/``. The training model is never modified: the export is built on a separate CPU copy.

QLoRA (a base quantized with bitsandbytes, ``quantization``): the merged export is the base
dequantized (in fp32), the adapter merged into it, then cast to the load ``dtype`` (the model's
``config.dtype``); its config.json has no ``quantization_config``, so it loads as a plain model. The
adapter export is the same as for LoRA; it loads with PEFT on the base, quantized or not.

Distributed: every rank takes part in gathering the weights (FSDP2 DTensor parameters are gathered
one tensor at a time with ``full_tensor()``); only global rank 0 holds the CPU copy, checks and
writes, and broadcasts its verdict so that every rank raises the same error together.
Supports single device, DDP and FSDP2 (``ModelParallelStrategy`` with ``fully_shard``); not
DeepSpeed ZeRO-3 or FSDP1 (their parameters are flat shards).

With ``fast_dev_run`` nothing is exported or checked (as Lightning disables checkpoints and loggers).

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
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
from huggingface_hub import HfApi, ModelCardData
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from lit_posttrain.data import describe_source
from lit_posttrain.rollout.base import pid_alive
from lit_posttrain.models import (
    dequantize_state_dict,
    dequantized_numel,
    export_dtype,
    is_quantized,
    plain_config,
    unwrap_peft,
)

LoRAExport = Literal["adapter", "merged", "both"]
_LORA_EXPORTS = ("adapter", "merged", "both")
FREE_SPACE_FACTOR = 1.2  # free disk needed at the start, as a multiple of the exported parameter bytes


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
        overwrite: replace ``<dirpath>/final`` when it already exists (an earlier run's export);
            without it such a run fails at setup, before training.
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
        overwrite: bool = False,
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
        self.overwrite = overwrite
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
        if trainer.fast_dev_run:  # writes nothing: nothing to check
            return
        if trainer.is_global_zero:
            for line in clean_interrupted_exports(self._export_dir):
                rank_zero_info(f"HubExport: {line}")
        error = self._directory_error() if trainer.is_global_zero else None
        error = trainer.strategy.broadcast(error)  # every rank raises rank 0's verdict together
        if error is not None:
            raise error

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after configure_model, before the first step: fail now rather than after training
        check_exportable(pl_module.model, pl_module.tokenizer, self.lora_export, who="HubExport")
        if trainer.fast_dev_run:
            return
        error = self._space_error(pl_module.model) if trainer.is_global_zero else None
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise error

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
            self._push(target, _method_name(type(pl_module)), trainer.global_step)
        trainer.strategy.barrier("HubExport.push")

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule, target: Path) -> None:
        """Write ``pl_module``'s model, tokenizer and model card to ``target`` (call it on every rank).

        Raises ``FloatingPointError`` (writing nothing) when a weight is NaN or Inf, and ``OSError``
        after saving a Lightning checkpoint to export later when the directory cannot be written.
        """
        state_dict = _full_state_dict(pl_module.model, keep=trainer.is_global_zero)  # collective
        error = None
        if trainer.is_global_zero:
            non_finite = non_finite_message(state_dict)
            if non_finite is not None:
                error = FloatingPointError(
                    f"HubExport: not exporting {target}: {non_finite}. The run diverged (lower the "
                    "learning rate, clip gradients with trainer.gradient_clip_val, check the data); nothing "
                    "was written or pushed and an earlier export there is untouched."
                )
            else:
                try:
                    write_hf_directory(
                        target, pl_module.model, pl_module.tokenizer, state_dict,
                        lora_export=self.lora_export, run=_run_summary(trainer, pl_module),
                    )  # fmt: skip
                    loads = loads_with(pl_module.model, self.lora_export)
                    print(f"HubExport: wrote {target.absolute()} ({loads})")
                except Exception as err:  # noqa: BLE001 (every rank must learn of it, or the others wait)
                    error = err
        error = trainer.strategy.broadcast(error)
        if isinstance(error, OSError):
            self._save_rescue_checkpoint(trainer, target, error)  # raises
        if error is not None:
            raise error
        trainer.strategy.barrier("HubExport.export")

    def _directory_error(self) -> Exception | None:
        """Why this run could not write its final export (rank 0, at setup), or None."""
        final = self._export_dir / "final"
        if final.exists() and not self.overwrite:
            if self.dirpath is not None:
                ways_out = (
                    "set overwrite: true to replace it, choose another dirpath, or leave dirpath unset (the "
                    "default <trainer.log_dir>/export is per logger version, i.e. per run)"
                )
            else:
                ways_out = (
                    "the default export directory is shared between runs here (no logger, or a logger with a "
                    "fixed version): set overwrite: true to replace it, or give each run its own dirpath"
                )
            return ValueError(
                f"HubExport: {final.absolute()} already exists (an earlier run's export) and this run would "
                f"replace it when it ends; {ways_out}"
            )
        try:
            _probe_writable(self._export_dir)
        except OSError as err:
            return OSError(
                f"HubExport: cannot write to the export directory {self._export_dir.absolute()} ({err}); "
                "the export would fail after training. Choose a writable dirpath."
            )
        return None

    def _space_error(self, model: PreTrainedModel | PeftModel) -> Exception | None:
        """An error when the export disk has less than ~1.2 x the exported parameter bytes free (rank 0)."""
        parameters = list(model.parameters())  # DTensor.numel() is the full tensor's: sharded or not
        if isinstance(model, PeftModel) and self.lora_export == "adapter":
            parameters = [p for p in parameters if p.requires_grad]  # the adapter (and modules_to_save)
        if is_quantized(model):  # written dequantized, in the load dtype
            element_size = torch.empty((), dtype=export_dtype(model)).element_size()
            needed = int(FREE_SPACE_FACTOR * sum(dequantized_numel(p) * element_size for p in parameters))
        else:
            needed = int(FREE_SPACE_FACTOR * sum(p.numel() * p.element_size() for p in parameters))
        free = shutil.disk_usage(self._export_dir).free
        if free >= needed:
            return None
        return OSError(
            f"HubExport: {self._export_dir.absolute()} has {_size(free)} free, the export needs about "
            f"{_size(needed)} ({FREE_SPACE_FACTOR} x the model's parameter bytes); free some space or choose "
            "a dirpath on another disk"
        )

    def _save_rescue_checkpoint(self, trainer: L.Trainer, target: Path, failure: OSError) -> None:
        """After a failed export: save the trained model as a Lightning checkpoint and raise where it is."""
        path = _rescue_path(trainer) if trainer.is_global_zero else None
        path = trainer.strategy.broadcast(path)
        try:
            trainer.save_checkpoint(path)  # collective (a directory of shards under FSDP2)
        except OSError as err:
            raise OSError(
                f"HubExport: could not write {target} ({failure}), nor save a checkpoint to {path} ({err}): "
                "the trained weights are lost"
            ) from failure
        config = Path(trainer.log_dir or trainer.default_root_dir) / "config.yaml"
        config_text = str(config) if config.is_file() else "YOUR_TRAINING_CONFIG.yaml"
        raise OSError(
            f"HubExport: could not write {target} ({failure}). The trained model is saved as a Lightning "
            f"checkpoint in {path}; once the problem is fixed, export it with\n"
            f"    lit-posttrain export --config {config_text} --ckpt {path} --out {target}"
            + ("" if self.lora_export == "merged" else f" --lora_export {self.lora_export}")
            + "\n(--config: the run's training config, whose model section builds the module)"
        ) from failure

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


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What the model card says about the run. HubExport reads it from the Trainer; `lit-posttrain
    export` from the checkpoint (step, data) and the training config (module, trainer settings)."""

    module_class: type[L.LightningModule]
    hparams: dict[str, Any]  # the module's init arguments
    data_hparams: dict[str, Any]  # the DataModule's ({} when unknown)
    step: int  # the optimizer step of the exported weights
    training: dict[str, Any]  # the card's Trainer table
    metrics: dict[str, float] | None  # final metrics; None: not recorded (export from a checkpoint)
    source: str | None = None  # where the weights come from when not from the end of a run


def check_exportable(model: Any, tokenizer: Any, lora_export: str, *, who: str) -> None:
    """Raise unless ``model`` / ``tokenizer`` follow the protocol and ``lora_export`` applies to ``model``."""
    if not isinstance(model, (PreTrainedModel, PeftModel)):
        raise TypeError(
            f"{who}: pl_module.model must be a transformers PreTrainedModel or a PEFT PeftModel, "
            f"got {type(model).__name__}"
        )
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            f"{who}: pl_module.tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
        )
    if isinstance(model, PeftModel) and len(model.peft_config) != 1:
        raise ValueError(f"{who}: exports one LoRA adapter, the model has {sorted(model.peft_config)}")
    if not isinstance(model, PeftModel) and lora_export != "merged":
        raise ValueError(
            f"{who}: lora_export={lora_export!r} needs a PEFT (LoRA) model, pl_module.model is a "
            f"{type(model).__name__}; use lora_export='merged' (the default) to export the full model"
        )


def non_finite_message(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"3 of 22 weight tensors hold NaN or Inf values (the first: model.norm.weight)"``, or None."""
    bad = [
        name
        for name, tensor in state_dict.items()
        if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if not bad:
        return None
    return f"{len(bad)} of {len(state_dict)} weight tensors hold NaN or Inf values (the first: {bad[0]})"


def write_hf_directory(
    target: Path,
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    state_dict: dict[str, torch.Tensor],
    *,
    lora_export: str,
    run: RunSummary,
) -> None:
    """Write ``target`` whole (atomically): ``model``'s architecture holding ``state_dict``, ``tokenizer``,
    the model card. ``model`` is only read (class, config, LoRA config, generation config); the weights
    are ``state_dict`` (full, unsharded, CPU), which may be modified (LoRA merge).

    transformers' own progress bar ("Writing model shards") is off while writing: inside a live
    Lightning progress bar in Jupyter, its stderr flush re-enters Rich's console and recursed until
    Python gave up (RecursionError, nothing exported)."""
    with _atomic_directory(target) as tmp, _no_transformers_progress_bar():
        model_copy = _plain_copy(model, state_dict)
        is_lora = isinstance(model_copy, PeftModel)
        written = []  # (directory, library that loads it)
        if is_lora and lora_export in ("adapter", "both"):
            adapter_dir = tmp if lora_export == "adapter" else tmp / "adapter"
            model_copy.save_pretrained(adapter_dir)
            written.append((adapter_dir, "peft"))
        if not is_lora or lora_export in ("merged", "both"):
            if is_lora:
                model_copy = model_copy.merge_and_unload()
            if is_quantized(model):  # dequantized and merged in fp32: now the load dtype
                model_copy = model_copy.to(export_dtype(model))
            model_copy.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
            written.append((tmp, "transformers"))
        generation_config = unwrap_peft(model).generation_config  # None for classifiers
        for directory, library_name in written:
            tokenizer.save_pretrained(directory)
            if library_name == "peft" and generation_config is not None:
                generation_config.save_pretrained(directory)
            card = _model_card(model, run, library_name, lora_export)
            (directory / "README.md").write_text(card)  # replaces the template card PEFT writes


@contextmanager
def _no_transformers_progress_bar() -> Iterator[None]:
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def loads_with(model: PreTrainedModel | PeftModel, lora_export: str) -> str:
    """How the export of ``model`` loads, for the message printed after writing it."""
    auto_class, _ = _auto_class(model)
    adapter = "peft.PeftModel.from_pretrained(base, path)"
    if not isinstance(model, PeftModel) or lora_export == "merged":
        return f"loads with {auto_class}.from_pretrained"
    if lora_export == "adapter":
        return f"LoRA adapter: loads with {adapter}"
    return f"loads with {auto_class}.from_pretrained; the LoRA adapter in adapter/ with {adapter}"


def _run_summary(trainer: L.Trainer, pl_module: L.LightningModule) -> RunSummary:
    return RunSummary(
        module_class=type(pl_module),
        hparams=dict(pl_module.hparams),
        data_hparams=dict(trainer.datamodule.hparams) if trainer.datamodule is not None else {},
        step=trainer.global_step,
        training={
            "global_step": trainer.global_step,
            "current_epoch": trainer.current_epoch,
            "precision": trainer.precision,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size,
            "optimizer": ", ".join(_describe_optimizer(optimizer) for optimizer in trainer.optimizers),
            "lr_scheduler": ", ".join(
                type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs
            )
            or None,
        },
        metrics={name: float(value) for name, value in sorted(trainer.callback_metrics.items())},
    )


def _probe_writable(directory: Path) -> None:
    """Create ``directory`` and write and delete a file in it; raises ``OSError`` when it cannot."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe-{uuid.uuid4().hex[:12]}"
    probe.write_bytes(b"lit-posttrain")
    probe.unlink()


def _rescue_path(trainer: L.Trainer) -> Path:
    """Where to save a checkpoint after a failed export: default_root_dir, or the temp dir if not writable."""
    name = f"hubexport-rescue-step{trainer.global_step}-{uuid.uuid4().hex[:8]}.ckpt"
    for directory in (Path(trainer.default_root_dir), Path(tempfile.gettempdir())):
        try:
            _probe_writable(directory)
        except OSError:
            continue
        return (directory / name).absolute()
    return Path(tempfile.gettempdir()) / name  # neither works: save_checkpoint reports it


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.2f} MiB"


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
    or saving it never touches the training model. A quantized (bitsandbytes) base becomes plain
    ``nn.Linear`` layers holding the dequantized fp32 weights, with a config without ``quantization_config``.
    """
    base = unwrap_peft(model)
    if is_quantized(model):
        state_dict = dequantize_state_dict(model, state_dict, torch.float32)
    with torch.device("meta"):
        model_copy = _plain_class(base)(plain_config(base.config))
        model_copy.generation_config = copy.deepcopy(base.generation_config)
        if isinstance(model, PeftModel):
            (adapter_name,) = model.peft_config
            model_copy = PeftModel(
                model_copy, copy.deepcopy(model.peft_config[adapter_name]), adapter_name=adapter_name
            )
    model_copy.load_state_dict(state_dict, assign=True, strict=True)
    return model_copy.eval()


_HOST = socket.gethostname().replace("-", "_")


def clean_interrupted_exports(export_dir: Path) -> list[str]:
    """Remove what killed exports of this machine left in ``export_dir``; returns what was done.

    ``.<name>.tmp-<host>-<pid>-*`` of a dead process is a half-written export: removed. A
    ``.<name>.old-<host>-<pid>-*`` of a dead process is a complete earlier export, renamed aside just
    before the new one would have replaced it: put back as ``<name>`` when that is missing, else
    removed. Directories of live processes and of other machines (a shared filesystem) are left.
    """
    if not export_dir.is_dir():
        return []
    done = []
    for entry in sorted(export_dir.iterdir()):
        name, kind, host, pid = _export_temp_parts(entry.name)
        if name is None or host != _HOST or pid_alive(pid):
            continue
        target = export_dir / name
        if kind == "old" and not target.exists():
            os.rename(entry, target)
            done.append(f"put back {target} (an export a killed run had moved aside)")
            continue
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        shutil.rmtree(entry, ignore_errors=True)
        done.append(f"removed {entry} ({size / 2**20:.0f} MiB left by a killed export)")
    return done


def _export_temp_parts(filename: str) -> tuple[str | None, str | None, str | None, int]:
    """``.final.tmp-host-123-abc`` -> ("final", "tmp", "host", 123); (None, ...) for anything else."""
    for kind in ("tmp", "old"):
        marker = f".{kind}-"
        if filename.startswith(".") and marker in filename:
            name, rest = filename[1:].split(marker, 1)
            parts = rest.split("-")
            if len(parts) == 3 and parts[1].isdigit():
                return name, kind, parts[0], int(parts[1])
    return None, None, None, 0


@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` whole.

    On an error the temporary directory is removed and ``target`` is left as it was. The existing
    ``target`` is renamed aside before the new one is renamed into place, so a crash between the two
    renames leaves both on disk (``.<name>.old-*`` and ``.<name>.tmp-*``), never neither.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
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


def _method_name(module_class: type) -> str:
    return getattr(module_class, "METHOD", module_class.__name__)


def _model_card(
    model: PreTrainedModel | PeftModel, run: RunSummary, library_name: str, lora_export: str
) -> str:
    """README.md: YAML metadata for the Hub, then method, base model, data, hyperparameters, metrics."""
    auto_class, pipeline_tag = _auto_class(model)
    method = _method_name(run.module_class)
    paper = getattr(run.module_class, "PAPER", None)
    module_class = f"{run.module_class.__module__}.{run.module_class.__qualname__}"
    hparams = {name: value for name, value in run.hparams.items() if not name.startswith("_")}
    data_hparams = {name: value for name, value in run.data_hparams.items() if not name.startswith("_")}
    # LightningCLI adds _class_path and _instantiator to the hyperparameters: internal, not shown
    base_model = unwrap_peft(model).config.name_or_path or None
    random_init = bool(hparams.get("random_init", False))
    train_data = data_hparams.get("train_data")
    dataset = None if train_data is None else _public(describe_source(train_data))

    # Hub metadata only names what is on the Hub: no local paths, no base model for a random init
    metadata = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        base_model=base_model if _on_hub(base_model) and not random_init else None,
        datasets=[train_data] if _on_hub(train_data) else None,
        tags=["lit-posttrain", method.lower()] + (["lora"] if isinstance(model, PeftModel) else []),
    )
    if base_model is None:
        base_text = "none (built from a config)"
    elif random_init:
        base_text = (
            f"`{_public(base_model)}` (architecture only: weights randomly initialised, `random_init: true`)"
        )
    else:
        base_text = f"`{_public(base_model)}`"
    if isinstance(model, PeftModel):
        weights_text = {
            "merged": "LoRA adapter merged into the base weights",
            "adapter": "LoRA adapter only",
            "both": "LoRA adapter merged into the base weights; the adapter alone is in `adapter/`",
        }[lora_export]
    else:
        weights_text = "all weights"
    if is_quantized(model) and library_name == "transformers":
        weights_text += f" (the base dequantized from its bitsandbytes quantization, written in {export_dtype(model)})"
    if library_name == "peft":
        base_ref = base_model if _on_hub(base_model) else f"<the base model: {_public(base_model)}>"
        load = (
            f"from peft import PeftModel\nfrom transformers import {auto_class}, AutoTokenizer\n\n"
            f"base = {auto_class}.from_pretrained({base_ref!r})\n"
            'model = PeftModel.from_pretrained(base, "<this directory or repo id>")\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")'
        )
    else:
        load = (
            f"from transformers import {auto_class}, AutoTokenizer\n\n"
            f'model = {auto_class}.from_pretrained("<this directory or repo id>")\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")'
        )
    if run.metrics is None:
        metrics_text = "not recorded (exported from a checkpoint: see the run's logs)\n"
    elif run.metrics:
        metrics_text = _table("", {name: f"{value:.6g}" for name, value in run.metrics.items()})
    else:
        metrics_text = "none logged\n"
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
        f"- Exported at optimizer step {run.step}" + (f", from {run.source}" if run.source else ""),
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
        _table("Trainer", run.training),
        "## Final metrics",
        "",
        metrics_text,
    ]
    return "\n".join(lines)


def _on_hub(name: Any) -> bool:
    """A hub id rather than a local path (the rule `lit_posttrain.data.load_rows` follows)."""
    return isinstance(name, str) and bool(name) and not _is_local_path(name) and not os.path.exists(name)


def _is_local_path(name: str) -> bool:
    """An absolute or home path, or an existing relative path with a directory part (``examples/tiny-model``).

    A single name that happens to exist in the working directory (``train``) is not taken as a path:
    it shows nothing of the filesystem either way, and hparams such as ``dataset_split: train`` keep
    their value."""
    has_directory = "/" in name or os.sep in name
    return os.path.isabs(name) or name.startswith("~") or (has_directory and os.path.exists(name))


def _public(value: Any) -> Any:
    """``value`` with every local path replaced by ``local: <its last component>`` (hub ids kept): the
    card shows what was used, never the user's filesystem layout."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return f"local: {Path(value).expanduser().name}" if _is_local_path(value) else value
    if isinstance(value, PreTrainedTokenizerBase):
        return _public(value.name_or_path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _public(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {name: _public(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(item) for item in value]
    return value


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
    """One table cell: local paths by name, dataclasses and containers as JSON, long values cut."""
    value = _public(value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value, default=str)
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "..."
