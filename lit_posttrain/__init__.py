"""lit-posttrain: post-training for language models as PyTorch Lightning modules.

The names exported here are the stable API (semantic versioning; deprecations warn with a
`FutureWarning` naming the removal version). Experimental methods live in
`lit_posttrain.experimental` and are not re-exported.
"""

__version__ = "0.1.0"


class LitPosttrainExperimentalWarning(UserWarning):
    """Warned once when an experimental module (`lit_posttrain.experimental`) is imported."""


def _drop_optional_kernel_notice() -> None:
    """bitsandbytes (installed for QLoRA, imported by peft) logs at import that an optional kernels
    package is missing: nothing to act on, and printed by every run. ``LIT_POSTTRAIN_VERBOSE=1`` keeps it."""
    import logging
    import os

    if os.environ.get("LIT_POSTTRAIN_VERBOSE", "") not in ("1", "true", "True"):
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
            lambda record: "kernels-community" not in record.getMessage()
        )


_drop_optional_kernel_notice()

from lit_posttrain.models import LoRAConfig, load_model, load_tokenizer
from lit_posttrain.stable.dpo import DataCollatorForPreference, DPODataModule, DPOModule, dpo_loss
from lit_posttrain.stable.sft import DataCollatorForLanguageModeling, SFTDataModule, SFTModule, sft_loss
from lit_posttrain.stable.grpo import GRPODataModule, GRPOModule, group_advantages, grpo_loss
from lit_posttrain.stable.rloo import RLOODataModule, RLOOModule, rloo_advantages
from lit_posttrain.stable.reward import RewardDataModule, RewardModule, reward_loss
from lit_posttrain.stable.kto import DataCollatorForUnpairedPreference, KTODataModule, KTOModule, kto_kl, kto_loss

__all__ = [
    "LitPosttrainExperimentalWarning",
    "GRPODataModule",
    "GRPOModule",
    "group_advantages",
    "grpo_loss",
    "RLOODataModule",
    "RLOOModule",
    "rloo_advantages",
    "DataCollatorForPreference",
    "DPODataModule",
    "DPOModule",
    "dpo_loss",
    "DataCollatorForUnpairedPreference",
    "KTODataModule",
    "KTOModule",
    "kto_kl",
    "kto_loss",
    "RewardDataModule",
    "RewardModule",
    "reward_loss",
    "DataCollatorForLanguageModeling",
    "SFTDataModule",
    "SFTModule",
    "sft_loss",
    "LoRAConfig",
    "load_model",
    "load_tokenizer",
]
