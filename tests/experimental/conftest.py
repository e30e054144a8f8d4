"""Shared fixtures of the experimental methods' tests: the shipped distillation teacher and student."""

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def teacher_dir() -> str:
    """examples/tiny-teacher: the tiny model (2 layers) trained on the addition data by examples/make_teacher.py
    (held-out completion-token accuracy ~0.7; the same character tokenizer as examples/tiny-model)."""
    path = EXAMPLES / "tiny-teacher"
    assert (path / "model.safetensors").is_file(), "run python examples/make_teacher.py"
    return str(path)


@pytest.fixture(scope="session")
def student_dir() -> str:
    """examples/tiny-student: examples/tiny-model with one decoder layer, no weights (load with random_init=True)."""
    return str(EXAMPLES / "tiny-student")
