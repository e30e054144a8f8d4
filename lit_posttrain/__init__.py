"""lit-posttrain: post-training for language models as PyTorch Lightning modules.

The names exported here are the stable API (semantic versioning; deprecations warn with a
`FutureWarning` naming the removal version). Experimental methods live in
`lit_posttrain.experimental` and are not re-exported.
"""

__version__ = "0.1.0"

from lit_posttrain.models import LoRAConfig, load_model, load_tokenizer

__all__ = [
    "LoRAConfig",
    "load_model",
    "load_tokenizer",
]
