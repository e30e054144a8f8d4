"""Dataset loading and format checks, shared by every method's DataModule.

Sources: a hub id (``"trl-lib/Capybara"``), a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv``
file or a directory of them, an in-memory list of dicts, or a `datasets.Dataset`.

Formats (the field's usual column names):

| format                  | columns                                   |
|-------------------------|-------------------------------------------|
| language modeling       | ``text`` or ``messages``                  |
| prompt-completion       | ``prompt`` + ``completion``               |
| preference              | ``prompt`` (optional) + ``chosen`` + ``rejected`` |
| unpaired preference     | ``prompt`` + ``completion`` + ``label``   |
| prompt-only             | ``prompt`` (+ any columns rewards need)   |

Each text column is either a string ("plain") or a list of ``{"role", "content"}`` messages
("conversational"). `check_rows` validates every row before training starts and raises a
`DataFormatError` naming the source, row index, column and what was expected.

Tokenization is cached across runs (`tokenize_cached`): a rerun with the same data, tokenizer, options
and code reads the tokenized rows back instead of tokenizing again. The cache lives in
``$LIT_POSTTRAIN_CACHE`` (default ``~/.cache/lit_posttrain/tokenized``); ``LIT_POSTTRAIN_CACHE=off``
switches it off. Delete the directory to reclaim its space.
"""

from __future__ import annotations

import builtins
import hashlib
import inspect
import json
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import datasets
import pyarrow as pa
import torch
import torch.distributed as dist
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

# os.PathLike in the union keeps paths paths on the command line: without it jsonargparse would read a
# path argument as a file of values (a CSV's text, a JSON array copied into config.yaml and checkpoints)
DatasetSource = Union[str, os.PathLike, list, datasets.Dataset]
ROLES = ("system", "user", "assistant", "tool")
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataFormatError(ValueError):
    """A dataset row does not have the expected format; the message names source, row and column."""


def describe_source(source: DatasetSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, list):
        return "in-memory list"
    return f"in-memory Dataset ({source.num_rows} rows)"


def load_rows(
    source: DatasetSource,
    *,
    split: str = "train",
    name: str | None = None,
    columns: dict[str, str] | None = None,
) -> datasets.Dataset:
    """Load ``source`` as a `datasets.Dataset` (one split), its columns renamed as ``columns`` says.

    Local paths are read with the loader their extension names; anything else that is a string is
    taken as a hub id (which needs network access). ``split`` and ``name`` (the configuration)
    apply to hub datasets. ``columns`` maps the names a method expects to the data's own
    (``{"prompt": "question"}``: the data's ``question`` column is read as ``prompt``).
    """
    rows = _load(source, split=split, name=name)
    return rename_columns(rows, columns, describe_source(source)) if columns else rows


def rename_columns(rows: datasets.Dataset, columns: dict[str, str], source: str) -> datasets.Dataset:
    """Rename the data's columns to the expected names: ``columns`` maps expected -> the data's."""
    for expected, actual in columns.items():
        if actual not in rows.column_names:
            raise DataFormatError(
                f"{source}: columns maps {expected!r} to {actual!r}, which the data does not have "
                f"(its columns: {', '.join(rows.column_names)})"
            )
    renames = {actual: expected for expected, actual in columns.items() if actual != expected}
    clashes = [expected for expected in renames.values() if expected in rows.column_names and expected not in renames]
    if clashes:
        raise DataFormatError(
            f"{source}: columns renames a column to {clashes[0]!r}, which the data already has; "
            f"drop or map that column too"
        )
    return rows.rename_columns(renames) if renames else rows


def _load(source: DatasetSource, *, split: str, name: str | None) -> datasets.Dataset:
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, list):
        if not source:
            raise DataFormatError("in-memory list: the dataset is empty")
        try:
            return datasets.Dataset.from_list(source)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:  # a column mixes kinds (e.g. strings and numbers)
            raise DataFormatError(f"in-memory list: {_odd_value(source)} ({err})") from err
    if not isinstance(source, str):
        raise TypeError(f"a dataset is a path, hub id, list of dicts or datasets.Dataset, got {type(source)}")
    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.iterdir() if p.suffix in _EXTENSIONS) if path.is_dir() else [path]
        if not files:
            raise DataFormatError(f"{source}: no {', '.join(_EXTENSIONS)} files found")
        kinds = {_EXTENSIONS.get(p.suffix) for p in files}
        if None in kinds or len(kinds) > 1:
            raise DataFormatError(
                f"{source}: expected files ending in one of {', '.join(_EXTENSIONS)} (all of one kind), "
                f"got {', '.join(p.name for p in files)}"
            )
        kind = kinds.pop()
        for file in files:  # what Arrow reports badly or not at all, named with file and line
            _check_file(file, kind)
        try:
            rows = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
        except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
            where = _bad_json(files) if kind == "json" else None
            raise DataFormatError(where or f"{source}: could not be read as {kind}: {err}") from err
        mixed = [c for c, f in rows.features.items() if type(f).__name__ == "Json"]
        if mixed and kind == "json":  # a column mixes kinds: Arrow stored it as JSON text and converted the rest
            raise DataFormatError(f"{source}: {_odd_value(_json_rows(files))}")
        return rows
    if path.suffix in _EXTENSIONS or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"dataset file or directory not found: {source}")
    return datasets.load_dataset(source, name, split=split)


def _check_file(file: Path, kind: str) -> None:
    """Empty files and text that is not UTF-8 (Arrow reads both without complaint), by file and line."""
    if kind == "parquet":
        return
    empty = True
    with open(file, "rb") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{file}: line {number} is not UTF-8 text (byte {line[err.start]:#04x} at column "
                    f"{err.start + 1}); save the file as UTF-8"
                ) from None
            empty = empty and not line.strip()
    if empty:
        raise DataFormatError(f"{file}: the file is empty (expected {kind} rows)")


def _bad_json(files: list[Path]) -> str | None:
    """Where the first JSON / JSON Lines file fails to parse, or None (called once Arrow has failed)."""
    for file in files:
        if file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as stream:
                for number, line in enumerate(stream, start=1):
                    try:
                        line.strip() and json.loads(line.rstrip())
                    except json.JSONDecodeError as err:
                        return f"{file}: line {number} is not valid JSON ({err.msg}, column {err.colno})"
        elif file.suffix == ".json":
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                return f"{file}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg})"
    return None


def _json_rows(files: list[Path]) -> list:
    """The rows of JSON / JSON Lines files as Python values (to name a row Arrow could not type)."""
    rows: list = []
    for file in files:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".jsonl":
            rows.extend(json.loads(line) for line in text.splitlines() if line.strip())
        else:
            value = json.loads(text)
            rows.extend(value if isinstance(value, list) else [value])
    return rows


def _odd_value(rows: list) -> str:
    """Name the first value whose kind differs from most of its column (what Arrow refuses)."""

    def kind(value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool):
            return "bool"
        return "number" if isinstance(value, (int, float)) else type(value).__name__

    for column in dict.fromkeys(c for row in rows if isinstance(row, dict) for c in row):
        kinds = [kind(row.get(column)) if isinstance(row, dict) else None for row in rows]
        counts: dict[str, int] = {}
        for k in kinds:
            if k is not None:
                counts[k] = counts.get(k, 0) + 1
        if len(counts) > 1:
            common = max(counts, key=counts.get)
            i = next(i for i, k in enumerate(kinds) if k not in (None, common))
            expected = {"bool": "true or false", "number": "a number", "str": "a string", "list": "a list"}.get(
                common, f"a {common}"
            )  # what most rows hold, in check_rows' words
            return f"row {i}, column '{column}': expected {expected}, got {_show(rows[i][column])}"
    return "the rows cannot be stored as one table"


def tokenize_cached(owner: Any, tokenize: Callable[..., Any], rows: datasets.Dataset, *args: Any) -> Any:
    """``tokenize(rows, *args)``, shown with a progress bar and cached on disk across runs.

    The cache key is everything the result depends on: the rows (their `datasets` fingerprint, which
    follows the content of in-memory data and the files' modification times of file data), the
    tokenizer (`datasets`' hash of it: vocabulary, chat template, special tokens), ``owner``'s class
    and hyperparameters, ``args`` (e.g. the source name its messages quote), the source file of
    ``owner``'s class and the versions of this package and of transformers. Warnings that
    ``tokenize`` raises are stored with the result and raised again on a cache hit; an error is never
    cached. Results that are not plain JSON (the cache is JSON: nothing read back can run code) are
    simply not cached.

    Several processes (DDP, FSDP: ``torch.distributed`` initialised): global rank 0 tokenizes (or
    reads the cache) first while the others wait, then they read what it wrote; an error on rank 0
    is raised on every rank. Ranks on other machines that do not share the cache directory tokenize
    for themselves. Every rank must call this the same number of times (every DataModule's ``setup``
    does). The others' wait is a collective: a first tokenization longer than the process group's
    timeout (Lightning's default: 30 minutes) needs a longer ``timeout`` on the strategy.
    """
    root = _cache_root()
    key = _cache_key(owner, rows, args) if root is not None else None
    file = root / f"{key}.json" if key is not None else None
    if file is None or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _tokenize_or_read(owner, tokenize, rows, args, file)
    verdict: list = [None]
    if dist.get_rank() == 0:
        try:
            result = _tokenize_or_read(owner, tokenize, rows, args, file)
        except Exception as err:
            dist.broadcast_object_list([(type(err).__name__, str(err))], src=0)
            raise
        dist.broadcast_object_list(verdict, src=0)
        return result
    dist.broadcast_object_list(verdict, src=0)  # wait for rank 0's verdict (and its cache file)
    if verdict[0] is not None:
        name, message = verdict[0]
        raise (DataFormatError if name == "DataFormatError" else RuntimeError)(f"{message} (raised on rank 0)")
    return _tokenize_or_read(owner, tokenize, rows, args, file)


def _tokenize_or_read(owner: Any, tokenize: Callable[..., Any], rows, args: tuple, file: Path | None) -> Any:
    if file is not None and file.is_file():
        try:
            cached = json.loads(file.read_text())
        except (OSError, ValueError):
            cached = None  # unreadable (a full disk, a foreign file): tokenize again
        if cached is not None:
            for category, message in cached["warnings"]:
                warnings.warn(message, _warning_class(category), stacklevel=3)
            return cached["result"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tokenize(_Progress(rows, f"Tokenizing {type(owner).__name__}"), *args)
    raised = [(type(w.message).__name__, str(w.message)) for w in caught]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if file is not None:
        try:
            text = json.dumps({"warnings": raised, "result": result})
        except (TypeError, ValueError):  # a value JSON cannot hold (bytes, dates): nothing to cache
            return result
        tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, file)
        except OSError:  # a read-only or full cache directory costs the cache, not the run
            tmp.unlink(missing_ok=True)
    return result


def _cache_root() -> Path | None:
    setting = os.environ.get("LIT_POSTTRAIN_CACHE", "")
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lit_posttrain" / "tokenized"


def _cache_key(owner: Any, rows: Any, args: tuple) -> str | None:
    fingerprint = getattr(rows, "_fingerprint", None)
    if not isinstance(rows, datasets.Dataset) or not fingerprint:
        return None
    import transformers

    import lit_posttrain

    cls = type(owner)
    hparams = {k: v for k, v in dict(getattr(owner, "hparams", {})).items() if k not in ("tokenizer", "train_data", "val_data")}
    try:
        code = Path(inspect.getsourcefile(cls)).read_bytes()
    except (OSError, TypeError):
        return None  # no source to tell a code change by
    parts = [
        fingerprint,
        Hasher.hash(owner.tokenizer),
        f"{cls.__module__}.{cls.__qualname__}",
        json.dumps(hparams, sort_keys=True, default=repr),
        json.dumps(args, default=repr),
        hashlib.sha256(code).hexdigest(),
        lit_posttrain.__version__,
        transformers.__version__,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _warning_class(name: str) -> type[Warning]:
    category = getattr(builtins, name, None)
    return category if isinstance(category, type) and issubclass(category, Warning) else UserWarning


class _Progress:
    """``rows`` as they are (columns, length, indexing), iterated with a progress bar on rank 0 when
    there are enough rows for tokenizing them to take a noticeable time."""

    MIN_ROWS = 2000

    def __init__(self, rows: datasets.Dataset, description: str):
        self._rows, self._description = rows, description

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rows, name)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        return self._rows[index]

    def __iter__(self):
        from tqdm.auto import tqdm

        quiet = len(self._rows) < self.MIN_ROWS or rank_zero_only.rank != 0
        return iter(tqdm(self._rows, desc=self._description, unit=" rows", disable=quiet, leave=False))


def split_rows(
    dataset: datasets.Dataset, val_size: float | int, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out ``val_size`` rows (a fraction if < 1) as a validation set, deterministically."""
    if not 0 < val_size < len(dataset):
        raise ValueError(f"val_size must be in (0, {len(dataset)}) for a dataset of {len(dataset)} rows, got {val_size}")
    parts = dataset.train_test_split(test_size=val_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def is_conversational(value: Any) -> bool:
    """A list of ``{"role", "content"}`` messages."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


def _check_messages(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {_show(value)}")
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataFormatError(f"{where}, message {j}: expected a dict with 'role' and 'content', got {_show(message)}")
        if message["role"] not in ROLES:
            raise DataFormatError(f"{where}, message {j}: role must be one of {ROLES}, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise DataFormatError(f"{where}, message {j}: content must be a string, got {_show(message['content'])}")


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_rows(
    dataset: datasets.Dataset,
    *,
    required: dict[str, str],
    source: str,
    optional: dict[str, str] | None = None,
) -> None:
    """Check every row before training starts.

    Args:
        required: column -> kind, kinds being ``"text"`` (a non-empty string or a list of messages),
            ``"str"``, ``"messages"``, ``"bool"``, ``"number"`` and ``"any"``.
        optional: columns checked only when present.
        source: how to name the dataset in errors (a path, hub id, ...).

    Raises:
        DataFormatError: naming the source, the row index (0-based, as `datasets` counts it), the
            column and what was expected.
    """
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise DataFormatError(
            f"{source}: missing column(s) {missing}; expected {sorted(required)}, found {dataset.column_names}"
        )
    columns = dict(required)
    columns.update({c: k for c, k in (optional or {}).items() if c in dataset.column_names})
    for i, row in enumerate(dataset.select_columns(list(columns)).to_iterable_dataset()):
        for column, kind in columns.items():
            _check_value(row[column], kind, f"{source}: row {i}, column '{column}'")


def _check_value(value: Any, kind: str, where: str) -> None:
    if kind == "any":
        return
    if kind == "text":
        if isinstance(value, list):
            _check_messages(value, where)
        elif not isinstance(value, str) or not value:
            raise DataFormatError(f"{where}: expected a non-empty string or a list of messages, got {_show(value)}")
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise DataFormatError(f"{where}: expected a non-empty string, got {_show(value)}")
    elif kind == "messages":
        _check_messages(value, where)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise DataFormatError(f"{where}: expected true or false, got {_show(value)}")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataFormatError(f"{where}: expected a number, got {_show(value)}")
    else:
        raise ValueError(f"unknown column kind {kind!r}")


def extract_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Split conversational ``chosen`` / ``rejected`` that share their leading messages into
    ``(prompt, chosen, rejected)``: the prompt is the longest common prefix of whole messages."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


class LookaheadLoader:
    """Training micro-batches that know the size of their whole optimizer step.

    A plain DataLoader cannot tell a micro-batch how many target tokens the other micro-batches of
    the same gradient-accumulation window hold, so losses normalised per micro-batch change with
    the accumulation setting. This iterable reads ``accumulate_grad_batches`` micro-batches ahead
    and attaches ``num_items_in_batch`` (this rank's count over the window, a 0-d tensor) to each;
    the module sums it over ranks. Windows start at the beginning of each epoch, as Lightning's
    accumulation does. ``window_columns`` (optional) maps a window's micro-batches to extra entries
    attached to each of them, for a loss that needs the whole step before its first backward (KTO's
    KL reference point over the mismatched rows of every micro-batch of the step).

    ``count_items=None``: no ``num_items_in_batch`` (methods that count their normaliser after
    generation, like GRPO; they still get the seeded shuffling and the exact mid-epoch resume).

    Shuffling is seeded by ``seed + epoch`` (Lightning's epoch when a trainer is attached), with a
    `DistributedSampler` when the trainer runs several processes. It is stateful: Lightning saves
    ``state_dict()`` in checkpoints, and a resumed run skips the micro-batches already consumed in
    the interrupted epoch.
    """

    def __init__(
        self,
        examples,
        *,
        batch_size: int,
        collate_fn,
        count_items=None,
        accumulate_grad_batches: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        trainer=None,
        window_columns=None,
    ):
        self.examples, self.batch_size, self.collate_fn = examples, batch_size, collate_fn
        self.window_columns = window_columns
        self.count_items, self.accumulate_grad_batches = count_items, accumulate_grad_batches
        self.shuffle, self.seed, self.drop_last, self.num_workers = shuffle, seed, drop_last, num_workers
        self.trainer = trainer
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer (rows per micro-batch), got {batch_size!r}")
        if drop_last and len(self._sampler(0)) < batch_size:
            per = " per process" if trainer is not None and trainer.world_size > 1 else ""
            raise DataFormatError(
                f"{len(self._sampler(0))} training rows{per} but batch_size={batch_size} and incomplete batches "
                "are dropped: not one training batch. Lower batch_size or add rows."
            )
        self._epoch = 0
        self._yielded = 0  # micro-batches handed out in the current epoch
        self._skip, self._skip_epoch = 0, 0  # micro-batches to skip at the next __iter__ of that epoch (resume)

    def _sampler(self, epoch: int):
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(
                self.examples,
                num_replicas=self.trainer.world_size,
                rank=self.trainer.global_rank,
                shuffle=self.shuffle,
                seed=self.seed,
                drop_last=self.drop_last,
            )
            sampler.set_epoch(epoch)
            return sampler
        if not self.shuffle:
            return SequentialSampler(self.examples)
        return RandomSampler(self.examples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        n = len(self._sampler(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch
        loader = DataLoader(
            self.examples,
            batch_size=self.batch_size,
            sampler=self._sampler(epoch),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
        )
        iterator = iter(loader)
        # skip what a resumed run already consumed, only in the epoch it was consumed in: a checkpoint
        # taken on an epoch's last batch resumes into the next epoch, which starts from its beginning
        skip = self._skip if epoch == self._skip_epoch else 0
        self._skip, self._epoch, self._yielded = 0, epoch, 0
        while True:
            window = []
            for batch in iterator:
                window.append(batch)
                if len(window) == self.accumulate_grad_batches:
                    break
            if not window:
                break
            total = torch.tensor(sum(self.count_items(b) for b in window)) if self.count_items else None
            extra = self.window_columns(window) if self.window_columns is not None else {}
            for batch in window:
                self._yielded += 1
                if self._yielded <= skip:
                    continue
                if total is not None:
                    batch["num_items_in_batch"] = total
                batch.update(extra)
                yield batch
        self._epoch, self._yielded = epoch + 1, 0  # (Lightning stops after len(self) batches: not always reached)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        # "epoch": the epoch being consumed when the state was saved; "yielded": its batches handed out
        self._epoch, self._skip_epoch, self._skip = state["epoch"], state["epoch"], state["yielded"]
