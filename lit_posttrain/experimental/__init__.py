"""Experimental methods: their API may change in any release.

Importing this package warns once; set ``LIT_POSTTRAIN_SILENCE_EXPERIMENTAL=1`` to silence it.
"""

import os
import warnings

if os.environ.get("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", "") not in ("1", "true", "True"):
    warnings.warn(
        "lit_posttrain.experimental is experimental: its API may change in any release "
        "(set LIT_POSTTRAIN_SILENCE_EXPERIMENTAL=1 to silence this warning).",
        UserWarning,
        stacklevel=2,
    )
