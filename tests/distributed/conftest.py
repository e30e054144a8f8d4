"""Session fixtures of the distributed tests: the shared launches of ``fit_script.py``."""

from pathlib import Path

import pytest
from distributed_runs import MULTI_RUNS, SINGLE_RUNS, launch


@pytest.fixture(scope="session")
def multi_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multi")
    launch(MULTI_RUNS, root)
    return root


@pytest.fixture(scope="session")
def single_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single")
    launch(SINGLE_RUNS, root)
    return root
