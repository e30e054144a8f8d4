"""The ``lit-posttrain`` command: a LightningCLI in subclass mode.

    lit-posttrain fit --config configs/quickstart/sft.yaml
    lit-posttrain fit --config configs/quickstart/sft.yaml --config configs/strategies/ddp.yaml
    lit-posttrain fit --config configs/quickstart/sft.yaml --trainer.max_steps 10 --print_config

The model (``model.class_path``) and data (``data.class_path``) are any LightningModule /
LightningDataModule; ``model.init_args.model_name_or_path`` is linked to the DataModule's
``tokenizer`` unless the module names a separate ``tokenizer_name_or_path``. Reward functions and
other callables can be given as import paths; the working directory is importable, so a
``my_rewards.py`` next to your config works as ``my_rewards.my_reward``.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lit_posttrain import vllm_serve


def _tokenizer_source(model_name_or_path, tokenizer_name_or_path=None):
    return tokenizer_name_or_path or model_name_or_path


class PostTrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            ("model.init_args.model_name_or_path", "model.init_args.tokenizer_name_or_path"),
            "data.init_args.tokenizer",
            compute_fn=_tokenizer_source,
        )


def cli_main(args=None, run: bool = True) -> PostTrainCLI:
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
    if sys.argv[1:2] == ["vllm-serve"]:  # `lit-posttrain vllm-serve --model PATH ...` (not a LightningCLI subcommand)
        return vllm_serve.main(sys.argv[2:])
    cli_main()


if __name__ == "__main__":
    main()
