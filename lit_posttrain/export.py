"""``lit-posttrain export``: a Lightning checkpoint -> the Hugging Face directory `HubExport` writes.

    lit-posttrain export --config outputs/run/lightning_logs/version_0/config.yaml \\
        --ckpt outputs/run/checkpoints/last.ckpt --out outputs/run/hf [--lora_export merged|adapter|both]

For a run without `HubExport`, one whose export failed (`HubExport` then saves a checkpoint and prints
this command), or any intermediate checkpoint. ``--out`` becomes the directory `HubExport` writes as
``final/`` (weights in safetensors, config, generation config, tokenizer and chat template, model card;
with LoRA the merged model, the adapter or both), written by the same code
(`lit_posttrain.callbacks.hub_export.write_hf_directory`), whole or not at all.

Trust: values that load or run code come only from the command line and the config, never from the
checkpoint. The module class and its init arguments (model and tokenizer paths, ``trust_remote_code``,
LoRA settings) come from ``--config``, the run's training config: LightningCLI saves it as
``config.yaml`` in the run's log directory; for a run with a plain Trainer, write a YAML with the
``model:`` section (``class_path`` / ``init_args``) of that run, as in ``configs/``. Only its ``model``
section builds anything (``trainer`` and ``data`` are only quoted in the card). The checkpoint gives
tensors, loaded with ``torch.load(weights_only=True)``, and plain values for the card and the checks
(step, hyperparameters). Relative paths in the config are read from the working directory, as in
training.

Checkpoints: a single ``.ckpt`` file, or the directory of shards that FSDP2 (``ModelParallelStrategy``)
writes (``last.ckpt/`` with ``*.distcp``, ``.metadata`` and ``meta.pt``): only the module's tensors are
read from it with ``torch.distributed.checkpoint`` (no process group, no optimizer state, no
temporary copy). The weights keep the dtype they were saved in.

Refused, writing nothing: a checkpoint written by another module class than the config's, or whose
tensors do not fit the module the config builds (names, shapes); weights with NaN or Inf; an existing
``--out`` without ``--overwrite`` (with it, ``--out`` is replaced whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from torch.distributed.checkpoint import FileSystemReader, load
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lit_posttrain.callbacks.hub_export import (
    RunSummary,
    check_exportable,
    loads_with,
    non_finite_message,
    write_hf_directory,
)
from lit_posttrain.models import LoRAConfig

SAFE_GLOBALS = [LoRAConfig]  # the project's own classes a checkpoint's hyperparameters may hold
_DCP_METADATA = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards
_HOW_TO_GET_THE_CONFIG = (
    "pass the training config of the run that wrote the checkpoint (LightningCLI saves it as config.yaml in "
    "the run's log directory, e.g. outputs/run/lightning_logs/version_0/config.yaml)"
)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.config:
        parser.error(
            "--config is required: the module class, model and tokenizer come from the training config, "
            f"never from a checkpoint; {_HOW_TO_GET_THE_CONFIG}"
        )
    out, ckpt_path = Path(args.out), Path(args.ckpt)
    if out.exists() and not args.overwrite:
        _fail(f"--out {out} already exists: pass --overwrite to replace it, or choose another --out")
    if not ckpt_path.exists():
        _fail(f"--ckpt {ckpt_path}: no such file or directory")
    if os.getcwd() not in sys.path:  # as in `lit-posttrain fit`: a my_rewards.py beside the config imports
        sys.path.insert(0, os.getcwd())

    model_parser, model_config, trainer_config, data_config = _read_configs(args.config)
    checkpoint = _load_checkpoint(ckpt_path)  # all but the tensors of the optimizers (and of FSDP2 shards)
    _check_module_class(checkpoint, _import_class(model_config.model.class_path))
    module = model_parser.instantiate(model_config).model
    try:
        check_exportable(module.model, module.tokenizer, args.lora_export, who="lit-posttrain export")
    except (TypeError, ValueError) as err:
        raise SystemExit(str(err)) from err
    state_dict = checkpoint.pop("state_dict", None)
    if state_dict is None:  # FSDP2 shards
        state_dict = _load_sharded_state_dict(ckpt_path)
    weights = _model_weights(module, state_dict)
    del state_dict
    _note_hparam_differences(checkpoint.get("hyper_parameters", {}), dict(module.hparams))
    non_finite = non_finite_message(weights)
    if non_finite is not None:
        _fail(f"not exporting {ckpt_path}: {non_finite}; the run had diverged by then. Nothing was written.")

    model_section = yaml.safe_load(model_parser.dump(model_config))["model"].get("init_args", {})
    run = RunSummary(
        module_class=type(module),
        hparams=dict(module.hparams),
        data_hparams=checkpoint.get("datamodule_hyper_parameters") or data_config.get("init_args") or {},
        step=checkpoint.get("global_step"),
        training=_training_table(checkpoint, trainer_config, model_section),
        metrics=None,
        source=f"checkpoint `{ckpt_path.name}` (`lit-posttrain export`)",
    )
    try:
        write_hf_directory(
            out, module.model, module.tokenizer, weights, lora_export=args.lora_export, run=run
        )
    except OSError as err:
        _fail(f"could not write {out} ({err}); nothing was written there")
    print(
        f"lit-posttrain export: wrote {out.absolute()} from {ckpt_path} (optimizer step {run.step}; "
        f"{loads_with(module.model, args.lora_export)})"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-posttrain export",
        description="Write the Hugging Face directory HubExport writes (safetensors, config, tokenizer, "
        "model card) from a Lightning checkpoint. The module is built from the training config; the "
        "checkpoint gives only its weights.",
    )
    parser.add_argument(
        "--config", action="append", metavar="CONFIG",
        help="the run's training config (LightningCLI's config.yaml in the run's log directory, or the "
        "configs the run was started with; repeat it as for `fit`). Its model section builds the module.",
    )  # fmt: skip
    parser.add_argument(
        "--ckpt", required=True, metavar="PATH",
        help="a Lightning checkpoint: a .ckpt file, or an FSDP2 checkpoint directory (*.distcp + meta.pt)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="the Hugging Face directory to write")
    parser.add_argument(
        "--lora_export", choices=["merged", "adapter", "both"], default="merged",
        help="for a LoRA module: the merged model (default), the adapter alone, or both (in adapter/)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def _fail(message: str) -> NoReturn:
    raise SystemExit(f"lit-posttrain export: {message}")


def _read_configs(paths: list[str]) -> tuple[ArgumentParser, Any, dict, dict]:
    """The parser and parsed ``model`` section of the configs (later files override earlier ones, as in
    ``fit``), and their ``trainer`` and ``data`` sections as plain dicts (quoted in the card only)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model", fail_untyped=False, required=True)
    model_config, trainer_config, data_config = None, {}, {}
    for path in paths:
        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            _fail(f"--config {path}: {err}")
        if not isinstance(config, dict):
            _fail(f"--config {path}: not a YAML mapping")
        if isinstance(config.get("trainer"), dict):
            trainer_config |= config["trainer"]
        if isinstance(config.get("data"), dict):
            data_config = config["data"]
        if config.get("model") is not None:
            try:
                model_config = parser.parse_object({"model": config["model"]}, namespace=model_config)
            except ArgumentError as err:  # also an unknown class_path or init argument
                _fail(f"--config {path}: the model section does not parse: {err}")
    if model_config is None:
        _fail(f"no model section in --config {' '.join(paths)}; {_HOW_TO_GET_THE_CONFIG}")
    return parser, model_config, trainer_config, data_config


def _import_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)  # from the config: trusted


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's entries (tensors memory-mapped), without optimizer states; for an FSDP2
    directory, ``meta.pt`` (everything but the tensors)."""
    file = path / _DCP_METADATA if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        _fail(f"--ckpt {path} is a directory without {_DCP_METADATA}: not a Lightning FSDP2 checkpoint")
    try:
        # added for good, not in a `safe_globals` block: leaving one removes them again, also the LoRAConfig
        # models.py allows for Lightning's resume
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
        checkpoint = torch.load(file, weights_only=True, map_location="cpu", mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        unsafe = _unsafe_globals(file)
        reason = (
            f"it holds objects of {', '.join(unsafe)}, which a weights-only load refuses" if unsafe else err
        )
        _fail(f"--ckpt {path}: cannot read it as a checkpoint with weights_only=True ({reason})")
    if not isinstance(checkpoint, dict) or not ("state_dict" in checkpoint or path.is_dir()):
        _fail(f"--ckpt {path}: not a Lightning checkpoint (no state_dict)")
    checkpoint.pop("optimizer_states", None)
    return checkpoint


def _unsafe_globals(file: Path) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        OSError,
        EOFError,
    ):  # not a zip file: the load error says it
        return []


def _check_module_class(checkpoint: dict[str, Any], module_class: type) -> None:
    """Refuse a checkpoint that LightningCLI says was written by another class than the config's.

    The class path is only compared, never imported: an already-imported module is looked up, so a
    checkpoint cannot make this process import anything."""
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if class_path is None:  # not written through LightningCLI: the weights' names and shapes are checked
        return
    module_name, _, class_name = class_path.rpartition(".")
    module = sys.modules.get(module_name)  # looked up, never imported
    if module is None or vars(module).get(class_name) is not module_class:
        _fail(
            f"the checkpoint was written by a {class_path} module, the config builds a "
            f"{module_class.__module__}.{module_class.__qualname__}; {_HOW_TO_GET_THE_CONFIG}"
        )


def _load_sharded_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The module's full tensors from an FSDP2 checkpoint directory, in the dtype they were saved in.

    Lightning saves ``{"state_dict": module state, "optimizer_0": ...}`` with torch.distributed.checkpoint;
    only the ``state_dict`` tensors are allocated (full size, CPU) and read, without a process group."""
    reader = FileSystemReader(path)
    prefix = "state_dict."
    state_dict = {
        key.removeprefix(prefix): torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": no process group is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        load({"state_dict": state_dict}, storage_reader=reader, no_dist=True)
    return state_dict


def _model_weights(module: L.LightningModule, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of ``module.model`` (names without ``model.``), after checking that the
    checkpoint's tensors are exactly the module's (names and shapes); tied weights become one tensor."""
    expected = module.state_dict(keep_vars=True)
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    # parameters and buffers only: bitsandbytes' 4-bit statistics (``...weight.absmax``) change layout once a
    # layer has run on CPU, so a QLoRA checkpoint's may differ in shape from a freshly built module's
    tensors = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    tensors |= {name for name, _ in module.named_buffers(remove_duplicate=False)}
    reshaped = [
        f"{name} {tuple(state_dict[name].shape)} (config: {tuple(expected[name].shape)})"
        for name in expected
        if name in tensors and name in state_dict and state_dict[name].shape != expected[name].shape
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{len(names)} {what} (first: {names[0]})"
            for names, what in (
                (missing, "missing"),
                (unexpected, "unexpected"),
                (reshaped, "of another shape"),
            )
            if names
        ]
        _fail(
            f"the checkpoint's tensors do not fit the {type(module).__name__} the config builds: "
            f"{'; '.join(problems)}; {_HOW_TO_GET_THE_CONFIG}"
        )
    weights, first_name = {}, {}  # first_name: id of a module tensor -> its first name (tied weights)
    for name, tensor in expected.items():
        if not name.startswith("model."):
            continue
        tied_to = first_name.setdefault(id(tensor), name)
        if tied_to != name and not torch.equal(state_dict[name], state_dict[tied_to]):
            _fail(f"{name} and {tied_to} are tied in the config's model but differ in the checkpoint")
        weights[name.removeprefix("model.")] = state_dict[tied_to]
    return weights


def _note_hparam_differences(saved: dict[str, Any], configured: dict[str, Any]) -> None:
    """Print the module arguments in which the config differs from the run that wrote the checkpoint."""

    def plain(value):
        return (
            dataclasses.asdict(value)
            if dataclasses.is_dataclass(value) and not isinstance(value, type)
            else value
        )

    differences = [
        f"{name}: {plain(configured[name])!r} (config) vs {plain(value)!r} (checkpoint)"
        for name, value in saved.items()
        if not name.startswith("_") and name in configured and plain(configured[name]) != plain(value)
    ]
    if differences:
        print(
            "lit-posttrain export: note: the config's model arguments differ from the checkpoint's (the "
            "config's are used): " + "; ".join(differences)
        )


def _training_table(checkpoint: dict[str, Any], trainer_config: dict, model_section: dict) -> dict[str, Any]:
    """The card's Trainer table: step and epoch from the checkpoint, the rest as the config sets it."""
    training = {"global_step": checkpoint.get("global_step"), "current_epoch": checkpoint.get("epoch")}
    for key in ("precision", "accumulate_grad_batches"):
        if trainer_config.get(key) is not None:
            training[key] = trainer_config[key]
    devices, num_nodes = trainer_config.get("devices"), trainer_config.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(num_nodes, int):
        training["world_size"] = devices * num_nodes
    for key in ("optimizer", "lr_scheduler"):  # init arguments of the module (OptimizerCallable, ...)
        if model_section.get(key) is not None:
            training[key] = _describe_class_config(model_section[key])
    return training


def _describe_class_config(spec: Any) -> str:
    """``{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, ...}}`` -> ``AdamW(lr=0.003, ...)``,
    with the settings HubExport's card names."""
    if not isinstance(spec, dict):
        return str(spec).rpartition(".")[2]
    init_args = spec.get("init_args") or {}
    keys = ("lr", "weight_decay", "betas", "momentum")
    settings = ", ".join(
        f"{key}={tuple(init_args[key]) if isinstance(init_args[key], list) else init_args[key]}"
        for key in keys
        if key in init_args
    )
    return f"{str(spec.get('class_path')).rpartition('.')[2]}({settings})"
