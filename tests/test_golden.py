"""Refactors keep behaviour: each stable quickstart, shortened to 20 steps, logs the metrics and
exports the weights recorded in ``tests/golden/`` (made by `tests/golden/run_quickstart.py` before the
"make the algorithm visible" refactor).

Metrics must match to 1e-6 relative (they matched exactly when recorded twice on this machine);
exported tensors bit for bit. A metric added later may appear as a new column; every recorded column
must still be there with the same values. When a change is meant to alter behaviour, re-record with
``python tests/golden/run_quickstart.py NAME tests/golden`` and say why in the commit.
"""

import csv
import json
import math
from pathlib import Path

import pytest

from golden.run_quickstart import run

GOLDEN = Path(__file__).parent / "golden"
QUICKSTARTS = ["sft", "dpo", "reward", "grpo", "rloo"]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize("name", QUICKSTARTS)
def test_quickstart_matches_recorded_run(name, tmp_path):
    """Metrics of a 20-step quickstart run equal the recorded ones, and its export is bit-identical."""
    run(name, tmp_path)
    expected, actual = _rows(GOLDEN / f"{name}.csv"), _rows(tmp_path / f"{name}.csv")
    assert len(actual) == len(expected), f"{name}: {len(actual)} logged rows, recorded {len(expected)}"
    missing = set(expected[0]) - set(actual[0])
    assert not missing, f"{name}: metrics no longer logged: {sorted(missing)}"
    for i, (want, got) in enumerate(zip(expected, actual)):
        for column, value in want.items():
            if value == "":
                assert got[column] == "", f"{name}: row {i}, {column}: logged {got[column]}, recorded nothing"
                continue
            assert math.isclose(float(got[column]), float(value), rel_tol=1e-6, abs_tol=1e-12), (
                f"{name}: row {i}, {column}: {got[column]} != recorded {value}"
            )
    assert json.loads((tmp_path / f"{name}.json").read_text()) == json.loads((GOLDEN / f"{name}.json").read_text())
