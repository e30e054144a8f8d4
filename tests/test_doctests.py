"""The examples in the package's docstrings run: every ``>>>`` line gives the output it shows."""

import doctest
import importlib
import pkgutil

import pytest

import lit_posttrain

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lit_posttrain.__path__, prefix="lit_posttrain.")
    if not info.name.startswith("lit_posttrain.experimental.") and info.name != "lit_posttrain.__main__"
)
# each method file's collator shows an input -> output example
WITH_EXAMPLES = ["lit_posttrain.stable.sft", "lit_posttrain.stable.dpo", "lit_posttrain.stable.reward",
                 "lit_posttrain.stable.grpo", "lit_posttrain.stable.rloo", "lit_posttrain.stable.kto"]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    """Every docstring example of the module prints what it shows."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name}: its collator's docstring has no example"
