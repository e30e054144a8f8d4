"""Experimental methods: their API may change in any release.

Each module here (``from lit_posttrain.experimental.orpo import ORPOModule``) warns once when it
is first imported, with the category `lit_posttrain.LitPosttrainExperimentalWarning`, so it can be
filtered like any warning::

    import warnings
    from lit_posttrain import LitPosttrainExperimentalWarning
    warnings.filterwarnings("ignore", category=LitPosttrainExperimentalWarning)

or silenced for a whole process with ``LIT_POSTTRAIN_SILENCE_EXPERIMENTAL=1``.
"""

import os
import warnings

from lit_posttrain import LitPosttrainExperimentalWarning


def warn_experimental(module: str) -> None:
    """Warn that ``module`` is experimental (called once, at the module's import)."""
    if os.environ.get("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", "") in ("1", "true", "True"):
        return
    warnings.warn(
        f"{module} is experimental: its API may change in any release "
        "(filter lit_posttrain.LitPosttrainExperimentalWarning, or set LIT_POSTTRAIN_SILENCE_EXPERIMENTAL=1).",
        LitPosttrainExperimentalWarning,
        stacklevel=3,
    )
