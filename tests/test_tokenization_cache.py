"""Tokenization is cached across runs (`lit_posttrain.data.tokenize_cached`) and shown with a progress bar."""

import importlib
import json
import warnings
from pathlib import Path

import pytest
import yaml

from lit_posttrain import SFTDataModule
from lit_posttrain.data import DataFormatError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTARTS = sorted((ROOT / "configs" / "quickstart").glob("*.yaml"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("LIT_POSTTRAIN_CACHE", str(directory))
    return directory


def _datamodule(config: Path):
    """The DataModule a quickstart config builds, as the CLI would (tokenizer linked to the model's)."""
    spec = yaml.safe_load(config.read_text())
    model_args = spec["model"]["init_args"]
    module_name, class_name = spec["data"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    tokenizer = model_args.get("tokenizer_name_or_path") or model_args["model_name_or_path"]
    return cls(tokenizer=str(ROOT / tokenizer), **_rooted(spec["data"].get("init_args") or {}))


def _rooted(args: dict) -> dict:
    out = {}
    for key, value in args.items():
        if key in ("train_data", "val_data") and isinstance(value, str) and (ROOT / value).exists():
            value = str(ROOT / value)
        out[key] = value
    return out


def _examples(dm):
    return json.dumps(
        [getattr(dm, name, None) for name in ("train_examples", "val_examples", "examples")], default=repr
    )


@pytest.mark.parametrize("config", QUICKSTARTS, ids=[c.stem for c in QUICKSTARTS])
def test_every_datamodule_reads_its_tokenization_back(config, cache, monkeypatch):
    """A second setup with the same data, tokenizer and options tokenizes nothing and yields the same examples."""
    first = _datamodule(config)
    first.setup("fit")
    assert list(cache.glob("*.json")), "the first setup wrote nothing to the cache"

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this data")

    monkeypatch.setattr(type(first), "_tokenize", fail)
    second = _datamodule(config)
    second.setup("fit")
    assert _examples(second) == _examples(first)


def _rows(n: int = 12) -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(n)]


def test_a_change_of_data_options_or_tokenizer_tokenizes_again(cache, tiny_model_dir, tiny_tokenizer):
    """Different rows, a different option or a different chat template each miss the cache."""
    def files():
        return len(list(cache.glob("*.json")))

    SFTDataModule(tiny_model_dir, train_data=_rows()).setup("fit")
    assert files() == 1
    SFTDataModule(tiny_model_dir, train_data=_rows()).setup("fit")
    assert files() == 1  # a hit writes nothing new
    SFTDataModule(tiny_model_dir, train_data=_rows(13)).setup("fit")
    assert files() == 2
    SFTDataModule(tiny_model_dir, train_data=_rows(), completion_only_loss=False).setup("fit")
    assert files() == 3
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    SFTDataModule(tokenizer, train_data=_rows()).setup("fit")
    assert files() == 4


def test_cached_examples_equal_fresh_ones(cache, tiny_model_dir, monkeypatch):
    """The examples read back equal those tokenized with the cache off."""
    cached = SFTDataModule(tiny_model_dir, train_data=_rows(), max_length=6)
    cached.setup("fit")
    again = SFTDataModule(tiny_model_dir, train_data=_rows(), max_length=6)
    again.setup("fit")
    monkeypatch.setenv("LIT_POSTTRAIN_CACHE", "off")
    fresh = SFTDataModule(tiny_model_dir, train_data=_rows(), max_length=6)
    fresh.setup("fit")
    assert again.train_examples == fresh.train_examples == cached.train_examples
    assert len(list(cache.glob("*.json"))) == 1


def test_warnings_are_raised_again_on_a_hit_and_errors_never_cached(cache, tiny_model_dir):
    """A warning tokenization raised comes back on a cache hit; a data error is raised every time."""
    rows = [{"prompt": "x" * 40, "completion": "y"}] + _rows()
    for _ in range(2):
        with pytest.warns(UserWarning, match="have no target tokens within max_length=8"):
            SFTDataModule(tiny_model_dir, train_data=rows, max_length=8).setup("fit")
    bad = [{"prompt": "x" * 40, "completion": "y"}]
    for _ in range(2):
        with pytest.raises(DataFormatError, match="no row has a target token"):
            SFTDataModule(tiny_model_dir, train_data=bad, max_length=8).setup("fit")


def test_cache_off_writes_nothing(tmp_path, monkeypatch, tiny_model_dir):
    """LIT_POSTTRAIN_CACHE=off tokenizes every time and writes no file."""
    monkeypatch.setenv("LIT_POSTTRAIN_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    SFTDataModule(tiny_model_dir, train_data=_rows()).setup("fit")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_corrupt_cache_file_is_tokenized_again(cache, tiny_model_dir):
    """An unreadable cache entry costs a tokenization, not the run."""
    SFTDataModule(tiny_model_dir, train_data=_rows()).setup("fit")
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json")
    dm = SFTDataModule(tiny_model_dir, train_data=_rows())
    dm.setup("fit")
    assert len(dm.train_examples) == len(_rows())
    assert json.loads(entry.read_text())["result"]  # rewritten whole


def test_large_data_shows_a_progress_bar(cache, tiny_model_dir, capfd):
    """Tokenizing thousands of rows shows a progress bar naming the DataModule; a hit shows none."""
    rows = _rows(2500)
    SFTDataModule(tiny_model_dir, train_data=rows).setup("fit")
    assert "Tokenizing SFTDataModule" in capfd.readouterr().err
    SFTDataModule(tiny_model_dir, train_data=rows).setup("fit")
    assert "Tokenizing" not in capfd.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the small case: no bar, no noise
        SFTDataModule(tiny_model_dir, train_data=_rows(20)).setup("fit")
    assert "Tokenizing" not in capfd.readouterr().err


_RANK_SCRIPT = r"""
import json, os, sys
import torch.distributed as dist
from lit_posttrain import SFTDataModule

rank, out, port, model = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
calls = []
original = SFTDataModule._tokenize
SFTDataModule._tokenize = lambda self, *args: calls.append(1) or original(self, *args)
reports = []
for rows, max_length in json.loads(sys.argv[5]):  # one process start-up (slow here) for every case
    calls.clear()
    try:
        dm = SFTDataModule(model, train_data=rows, max_length=max_length)
        dm.setup("fit")
        reports.append({"calls": len(calls), "examples": dm.train_examples})
    except Exception as err:
        reports.append({"calls": len(calls), "error": f"{type(err).__name__}: {err}"})
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(reports, f)
dist.destroy_process_group()
"""


def _two_ranks(tmp_path, cases, tiny_model_dir, cache):
    """Each rank's reports for ``cases`` ([(rows, max_length)]), run in two processes joined by gloo."""
    import subprocess
    import sys

    from lit_posttrain.rollout.base import free_port

    port = str(free_port())
    env = {**__import__("os").environ, "LIT_POSTTRAIN_CACHE": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(rank), str(tmp_path), port, tiny_model_dir, json.dumps(cases)],
            env=env,
        )
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_under_ddp_rank_zero_tokenizes_and_the_others_read_its_cache(tmp_path, cache, tiny_model_dir):
    """Two processes, a cold cache: rank 0 tokenizes, rank 1 waits and reads the same examples; an error on
    rank 0 (every row without a target token) is raised on both ranks."""
    bad = [{"prompt": "x" * 40, "completion": "y"}]
    (good0, bad0), (good1, bad1) = _two_ranks(tmp_path, [(_rows(), 1024), (bad, 8)], tiny_model_dir, cache)
    assert (good0["calls"], good1["calls"]) == (1, 0)
    assert good1["examples"] == good0["examples"] and good0["examples"]
    assert bad0["error"].startswith("DataFormatError") and "no row has a target token" in bad0["error"]
    assert bad1["error"].startswith("DataFormatError") and bad1["error"].endswith("(raised on rank 0)")
    assert bad1["calls"] == 0
