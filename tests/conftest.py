import os
import tempfile
from pathlib import Path

# no network at test time: everything is built locally
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", "1")
# the tokenization cache of this test session only (never the user's ~/.cache)
os.environ.setdefault("LIT_POSTTRAIN_CACHE", tempfile.mkdtemp(prefix="lit-posttrain-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "examples" / "tiny-model"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The shipped tiny model directory (config + character tokenizer, no weights)."""
    return str(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from lit_posttrain.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A freshly initialised tiny causal LM (seeded: the same weights every time)."""
    from lit_posttrain.models import load_model

    return load_model(tiny_model_dir, random_init=True, init_seed=0)


@pytest.fixture
def with_stats_calls(monkeypatch):
    """Records ``with_stats`` of every gradient-enabled `chunked_selective_log_softmax` call a method file
    makes: ``calls = with_stats_calls(sft_module_file)`` (the real function still runs)."""

    def record(method_file) -> list[bool]:
        calls, chunked = [], method_file.chunked_selective_log_softmax

        def spy(*args, with_stats=False, **kwargs):
            if torch.is_grad_enabled():
                calls.append(with_stats)
            return chunked(*args, with_stats=with_stats, **kwargs)

        monkeypatch.setattr(method_file, "chunked_selective_log_softmax", spy)
        return calls

    return record
