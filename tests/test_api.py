"""The stable public API is pinned: `lit_posttrain.__all__` and every exported signature match the
snapshot in ``tests/api/stable_api.txt``. Changing the stable surface means updating the snapshot in
the same commit (``python tests/test_api.py``), where a reviewer sees it; a removal or a changed
default needs a deprecation first (DESIGN.md, "Stable and experimental")."""

import inspect
import re
import sys
import warnings
from pathlib import Path

import pytest

import lit_posttrain
from lit_posttrain import LitPosttrainExperimentalWarning

SNAPSHOT = Path(__file__).parent / "api" / "stable_api.txt"


def describe_api() -> str:
    """One line per exported name: its kind and signature (a class: its ``__init__``)."""
    lines = []
    for name in sorted(lit_posttrain.__all__):
        obj = getattr(lit_posttrain, name)
        if inspect.isclass(obj):
            signature = inspect.signature(obj.__init__) if "__init__" in vars(obj) else "(inherited)"
            lines.append(f"class {name}{signature}")
        else:
            lines.append(f"def {name}{inspect.signature(obj)}")
    return re.sub(r" at 0x[0-9a-f]+", "", "\n".join(lines)) + "\n"  # default lambdas print an address


def test_stable_api_matches_snapshot():
    """__all__ and the exported signatures equal the stored snapshot (update it with the change)."""
    assert SNAPSHOT.read_text() == describe_api(), (
        "the stable API changed: if that is intended, run `python tests/test_api.py` and commit the snapshot"
    )


def test_experimental_modules_warn_with_their_own_category(monkeypatch):
    """An experimental module warns once, as LitPosttrainExperimentalWarning, which a filter silences."""
    from lit_posttrain.experimental import warn_experimental

    monkeypatch.delenv("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", raising=False)
    with pytest.warns(LitPosttrainExperimentalWarning, match="lit_posttrain.experimental.demo is experimental"):
        warn_experimental("lit_posttrain.experimental.demo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=LitPosttrainExperimentalWarning)
        warn_experimental("lit_posttrain.experimental.demo")  # filtered: no error
    monkeypatch.setenv("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_experimental("lit_posttrain.experimental.demo")  # silenced by the environment


if __name__ == "__main__":
    SNAPSHOT.write_text(describe_api())
    print(f"wrote {SNAPSHOT}", file=sys.stderr)
