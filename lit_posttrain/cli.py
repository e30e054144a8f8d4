"""The ``lit-posttrain`` command: a LightningCLI in subclass mode.

    lit-posttrain fit --config configs/quickstart/sft.yaml
    lit-posttrain fit --config configs/quickstart/sft.yaml --config configs/strategies/ddp.yaml
    lit-posttrain fit --config configs/quickstart/sft.yaml --trainer.max_steps 10 --print_config

The model (``model.class_path``) and data (``data.class_path``) are any LightningModule /
LightningDataModule; ``model.init_args.model_name_or_path`` is linked to the DataModule's
``tokenizer`` unless the module names a separate ``tokenizer_name_or_path``, and its
``trust_remote_code`` to the DataModule's (one switch for both). Reward functions and
other callables can be given as import paths; the working directory is importable, so a
``my_rewards.py`` next to your config works as ``my_rewards.my_reward``.

Quiet by default: the progress bar names the step budget (``Training to step 400``, not
``Epoch 0/-2``) and drops ``v_num``; Lightning's litlogger tip and a deprecation warning Lightning raises inside
its own code on every fit are not shown. ``--verbose`` (anywhere on the command line) or
``LIT_POSTTRAIN_VERBOSE=1`` shows everything again.

A checkpoint never configures the run: LightningCLI lays a checkpoint's saved hyperparameters over
the config given with ``--ckpt_path``; here the config and command line alone decide (a checkpoint
cannot switch on ``trust_remote_code``, change a model path or the module class), and a checkpoint
whose saved values differ from them stops the run before anything is built, listing each difference.

Resuming: ``--ckpt_path last`` resumes from the newest ``last*.ckpt`` of the run's
``ModelCheckpoint`` callbacks and is an error when there is none (Lightning would warn and start
from step 0, exit code 0); ``--ckpt_path last_if_any`` resumes when there is one and starts afresh
otherwise (for job scripts that run the same command first and after a preemption). Give the
``ModelCheckpoint`` a fixed ``dirpath``: without one it writes into the logger's version folder,
which is new on every run, so a rerun never finds it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import sys
import warnings
from pathlib import Path

import lightning
import torch
import transformers
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning_utilities.core.imports import RequirementCache

import lit_posttrain
from lit_posttrain import diagnostics, export, vllm_serve
from lit_posttrain.data import DataFormatError
from lit_posttrain.models import LoRAConfig

OVERVIEW = f"""lit-posttrain {lit_posttrain.__version__}: post-training for language models as Lightning modules.

Usage: lit-posttrain SUBCOMMAND [options]

Subcommands:
  fit          train:                 lit-posttrain fit --config configs/quickstart/sft.yaml
  validate     the validation metrics of a model (or a checkpoint with --ckpt_path)
  vllm-serve   a vLLM generation server for VLLMRollout(mode="server")
  diagnose     a run's health from its metrics.csv: lit-posttrain diagnose outputs/quickstart-grpo
  export       a checkpoint -> a Hugging Face directory: lit-posttrain export --config C --ckpt PATH --out DIR
  (each takes --help)

Methods (model.class_path / data.class_path):
  lit_posttrain.SFTModule / SFTDataModule         supervised fine-tuning
  lit_posttrain.DPOModule / DPODataModule         direct preference optimization (15 loss types)
  lit_posttrain.RewardModule / RewardDataModule   reward modeling (Bradley-Terry)
  lit_posttrain.GRPOModule / GRPODataModule       online RL, group-relative advantages
  lit_posttrain.RLOOModule / RLOODataModule       online RL, leave-one-out baselines
  lit_posttrain.KTOModule / KTODataModule         unpaired preferences (desirable / undesirable)
  experimental (lit_posttrain.experimental.<file>.<Method>Module, warn on import):
    orpo.ORPOModule   odds-ratio preference optimization, no reference model
    cpo.CPOModule     contrastive preference optimization; SimPO and AlphaPO as loss types
    bco.BCOModule     binary classifier optimization, unpaired
    ppo.PPOModule     proximal policy optimization with a value model (RLHF)
    online_dpo.OnlineDPOModule   DPO on the policy's own samples, ranked by reward functions
    xpo.XPOModule     exploratory preference optimization (policy vs reference samples)
    nash_md.NashMDModule   Nash learning from preferences by mirror descent
    gkd.GKDModule     generalized knowledge distillation from a frozen TeacherModel
    distill.DistillationModule   on-policy distillation (reverse KL to a TeacherModel)
    sdft.SDFTModule   self-distilled fine-tuning (the model with a privileged context teaches itself)
    async_grpo.AsyncGRPOModule   GRPO with generation on a vLLM process running ahead of training

Quickstarts (CPU, tiny local model, a few minutes each): configs/quickstart/*.yaml
Options of a method: lit-posttrain fit --model.help lit_posttrain.GRPOModule
Options: --version; --verbose (show Lightning's and vLLM's full output)
"""


def _tokenizer_source(model_name_or_path, tokenizer_name_or_path=None):
    return tokenizer_name_or_path or model_name_or_path


class StepProgressBar(RichProgressBar if RequirementCache("rich") else TQDMProgressBar):
    """Lightning's progress bar, naming the step budget when the run is bounded by ``max_steps``
    (Lightning prints ``Epoch 0/-2`` there) and without ``v_num``."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:  # RichProgressBar's hook
        if self.trainer.max_steps > 0 and self.trainer.max_epochs in (None, -1):
            return f"Training to step {self.trainer.max_steps}"
        return super()._get_train_description(current_epoch)


class SaveOnSigterm(lightning.Callback):
    """On SIGTERM (a scheduler's "stop now"), save the run's last checkpoint at the end of the current
    batch, where `ModelCheckpoint` itself saves, so ``--ckpt_path last`` resumes exactly; the CLI then
    exits with code 143 (128 + SIGTERM) instead of Lightning's 0, which pipelines read as success.

    Saved only when a `ModelCheckpoint` has a ``dirpath``: to ``last.ckpt`` there with ``save_last``,
    else to ``sigterm-step=<N>.ckpt``."""

    def __init__(self) -> None:
        self.saved: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # one decision for all ranks (the signal may reach one process first): saving is collective
        if not trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False) or self.saved:
            return
        trainer._signal_connector.received_sigterm = True  # every rank stops after this batch
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                name = "last" if callback.save_last else f"sigterm-step={trainer.global_step}"
                self.saved = os.path.join(callback.dirpath, name + callback.FILE_EXTENSION)
                trainer.save_checkpoint(self.saved)
                break


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet() -> None:
    """Hide what every run prints and nobody acts on (``--verbose`` keeps it)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTip())


class PostTrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            ("model.init_args.model_name_or_path", "model.init_args.tokenizer_name_or_path"),
            "data.init_args.tokenizer",
            compute_fn=_tokenizer_source,
        )
        # one switch: a tokenizer that needs its repository's code needs the same permission as the model
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")

    def _parse_ckpt_path(self) -> None:
        """Compare the checkpoint's saved hyperparameters with the config; never apply them.

        (LightningCLI's version parses them over the config: an edited checkpoint could then switch
        on ``trust_remote_code`` or replace the module class and explicit options silently.)
        """
        if not self.config.get("subcommand"):
            return
        subcommand = self.config.subcommand
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # "last" (resolved in before_fit) or a sharded checkpoint directory
        torch.serialization.add_safe_globals([LoRAConfig])
        try:
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError) as err:
            raise SystemExit(f"lit-posttrain: --ckpt_path {ckpt_path} cannot be loaded safely (weights only): {err}")
        saved = dict(checkpoint.get("hyper_parameters") or {})
        saved.pop("_instantiator", None)
        model = self.config[subcommand].model
        differences = []
        saved_class = saved.pop("_class_path", None)
        if saved_class and saved_class.rsplit(".", 1)[-1] != model.class_path.rsplit(".", 1)[-1]:
            differences.append(("class_path", saved_class, model.class_path))
        given = _plain(model.get("init_args")) or {}
        for key, value in saved.items():
            if key in given and _plain(value) != given[key]:
                differences.append((f"init_args.{key}", _plain(value), given[key]))
        if differences:
            lines = "\n".join(f"  model.{key}: checkpoint {old!r}, config {new!r}" for key, old, new in differences)
            raise SystemExit(
                f"lit-posttrain: the checkpoint {ckpt_path} was saved with other model settings than this run's config "
                f"and command line:\n{lines}\nA checkpoint never changes the configuration here: resume with the "
                "config it was trained with, or start a new run (to start from its weights, export it with "
                "`lit-posttrain export` and point model_name_or_path at the export)."
            )

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` / ``last_if_any`` before Lightning does, refusing a silent restart."""
        config = self.config_init[self.subcommand]
        requested = config.get("ckpt_path")
        if requested not in ("last", "last_if_any"):
            return
        callbacks = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        found = set()
        for callback in callbacks:
            found |= {path for path in callback._find_last_checkpoints(self.trainer) if os.path.exists(path)}
        if found:
            config["ckpt_path"] = "last"
            return
        if requested == "last_if_any":
            rank_zero_info("lit-posttrain: --ckpt_path last_if_any found no checkpoint: training starts at step 0")
            config["ckpt_path"] = None
            return
        where = ", ".join(str(c.dirpath) if c.dirpath else "the logger's version folder (new on every run)" for c in callbacks)
        raise SystemExit(
            "lit-posttrain: --ckpt_path last: no last checkpoint to resume from "
            + (f"(looked in {where}). " if callbacks else "(the run has no ModelCheckpoint callback). ")
            + "Give a ModelCheckpoint a fixed dirpath and save_last: true, e.g. trainer.callbacks: "
            "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: outputs/run/checkpoints, "
            "save_last: true, every_n_train_steps: 100}}]; or pass --ckpt_path last_if_any to start afresh when "
            "there is nothing to resume."
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: the methods define no ``test_step`` / ``predict_step``."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def _instantiate_trainer(self, config: dict, callbacks: list) -> lightning.Trainer:
        """Lightning's, plus the step-counting progress bar unless the config has its own or none."""
        given = (config.get("callbacks") or []) + callbacks
        given = given if isinstance(given, list) else [given]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not _verbose() and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, StepProgressBar()]
        callbacks = [*callbacks, SaveOnSigterm()]
        return super()._instantiate_trainer(config, callbacks)


def _plain(value):
    """Config values in one comparable form: namespaces and dataclasses as dicts, tuples as lists."""
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _verbose() -> bool:
    return os.environ.get("LIT_POSTTRAIN_VERBOSE", "") in ("1", "true", "True")


def cli_main(args=None, run: bool = True) -> PostTrainCLI:
    if not _verbose():
        _quiet()
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return PostTrainCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    if "--verbose" in sys.argv[1:]:
        sys.argv.remove("--verbose")
        os.environ["LIT_POSTTRAIN_VERBOSE"] = "1"
    if sys.argv[1:] in ([], ["-h"], ["--help"]):
        print(OVERVIEW)
        return
    if sys.argv[1:] == ["--version"]:
        print(
            f"lit-posttrain {lit_posttrain.__version__} (lightning {lightning.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__})"
        )
        return
    if sys.argv[1:2] == ["vllm-serve"]:  # `lit-posttrain vllm-serve --model PATH ...` (not a LightningCLI subcommand)
        return vllm_serve.main(sys.argv[2:])
    if sys.argv[1:2] == ["export"]:  # `lit-posttrain export --config C --ckpt PATH --out DIR`: export.py
        return export.main(sys.argv[2:])
    if sys.argv[1:2] == ["diagnose"]:  # `lit-posttrain diagnose RUN_DIR`: the TrainingDiagnostics heuristics offline
        sys.exit(diagnostics.main(sys.argv[2:]))
    try:
        cli_main()
    except SIGTERMException:  # Lightning stops on SIGTERM with SystemExit(None), i.e. exit code 0
        print("lit-posttrain: stopped by SIGTERM (exit code 143); --ckpt_path last resumes from the last "
              "checkpoint if one was configured", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except DataFormatError as err:  # the message names file, row and column: a traceback adds nothing
        if _verbose():
            raise
        print(f"lit-posttrain: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
