"""lit-posttrain: post-training for language models as PyTorch Lightning modules.

The names exported here are the stable API (semantic versioning; deprecations warn with a
`FutureWarning` naming the removal version). Experimental methods live in
`lit_posttrain.experimental` and are not re-exported.
"""

__version__ = "0.1.0"

from lit_posttrain.models import LoRAConfig, load_model, load_tokenizer
from lit_posttrain.stable.sft import DataCollatorForLanguageModeling, SFTDataModule, SFTModule

__all__ = [
    "DataCollatorForLanguageModeling",
    "LoRAConfig",
    "SFTDataModule",
    "SFTModule",
    "load_model",
    "load_tokenizer",
]
