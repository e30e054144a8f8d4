"""Training diagnostics: is the run learning? Callbacks that answer with numbers and findings.

`TrainingDiagnostics` watches every row the Trainer logs and turns the training-health heuristics
of `lit_posttrain.diagnostics` into findings: a code, a severity, the evidence and the option to
change (docs/diagnostics.md). They go to the console, to ``<log_dir>/diagnostics.jsonl`` and to the
logger as ``diagnostics/<code>``; ``lit-posttrain diagnose RUN_DIR`` gives the same findings offline.

`LearningSignal` records chosen metrics at the first validation (run it before training with
``trainer.num_sanity_val_steps: -1``: the sanity check then covers the whole validation set) and
at the last one, and prints them side by side at the end of ``fit``:

    LearningSignal           before      after     change
    val/loss                 4.8521     1.2034    -3.6487
    val/mean_token_accuracy  0.0103     0.6012    +0.5909

The figures are also kept in ``callback.before`` / ``callback.after`` (dicts) for notebooks and tests.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.tensor import DTensor

from lit_posttrain.diagnostics import Diagnoser, Finding, Thresholds, run_context
from lit_posttrain.precision import check_fused_clipping, warn_if_slow_precision


class LearningSignal(L.Callback):
    """Print chosen validation metrics before and after training.

    "After" is the final model: when the run's last periodic validation would not fall on its last
    optimizer step (``max_steps`` not a multiple of ``val_check_interval``), the callback asks
    Lightning for one more validation at that step (the way early stopping does, through
    ``trainer.should_stop`` on the final step). Each column is labelled with its step.

    Args:
        metrics: metric names as logged (e.g. ``val/loss``, ``val/rewards/accuracies``).
        final_validation: validate the final model when the last validation would be stale.
    """

    def __init__(self, metrics: list[str] | None = None, final_validation: bool = True):
        self.metrics = list(metrics) if metrics else ["val/loss"]
        self.final_validation = final_validation
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.before_step: int | None = None  # the optimizer step each column was measured at
        self.after_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = {name: float(trainer.callback_metrics[name]) for name in self.metrics if name in trainer.callback_metrics}
        if not self.before:
            self.before, self.before_step = values, trainer.global_step
        elif not trainer.sanity_checking:
            self.after, self.after_step = values, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # the batch that completed the last optimizer step of a max_steps-bounded run: Lightning validates
        # after this hook when the step is a periodic one, or when should_stop is set (as early stopping
        # does); either way once, so asking is harmless when the periodic validation falls here anyway
        final = 0 < trainer.max_steps <= trainer.global_step
        if self.final_validation and final and trainer.enable_validation:
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self.table()
        if not self.before:
            rows.append("(no validation before training: set trainer.num_sanity_val_steps: -1)")
        if self.after_step is not None and self.after_step != trainer.global_step:
            rows.append(
                f"(the last validation ran at step {self.after_step}, training ended at step {trainer.global_step}: "
                "set trainer.val_check_interval so that it divides trainer.max_steps to measure the final model)"
            )
        rank_zero_info("\n".join(rows))

    def table(self) -> list[str]:
        """The header and one row per metric: name, before, after, change (names wider than the
        default column widen it, so the figures stay aligned)."""
        width = max([28] + [len(name) + 2 for name in self.metrics])
        before_label = "before" if self.before_step is None else f"step {self.before_step}"
        after_label = "after" if self.after_step is None else f"step {self.after_step}"
        rows = [f"{'LearningSignal':<{width}}{before_label:>10}{after_label:>10}{'change':>10}"]
        for name in self.metrics:
            before, after = self.before.get(name), self.after.get(name)
            if before is None or after is None:
                rows.append(f"{name:<{width}}{_fmt(before):>10}{_fmt(after):>10}{'':>10}")
            else:
                rows.append(f"{name:<{width}}{before:>10.4f}{after:>10.4f}{after - before:>+10.4f}")
        return rows

    def state_dict(self) -> dict:
        return {"before": self.before, "after": self.after, "before_step": self.before_step, "after_step": self.after_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before, self.after = dict(state_dict["before"]), dict(state_dict["after"])
        self.before_step, self.after_step = state_dict.get("before_step"), state_dict.get("after_step")


def _is_number(value) -> bool:
    """A scalar a metrics row holds (a Python number or a one-element tensor), not a table or image."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class TrainingDiagnostics(L.Callback):
    """Findings about the run's health, from the metrics it logs: codes, evidence and actions.

    Every row the Trainer writes to its (first) logger is fed to a `lit_posttrain.diagnostics.Diagnoser`
    on rank 0 (the modules log metrics already reduced over ranks). A finding is printed once when it
    appears, then every ``remind_every`` steps while it persists (with a count), and once when it is
    resolved; every such event is a JSON line in ``diagnostics.jsonl`` (schema in docs/diagnostics.md)
    and the logger gets ``diagnostics/<code>`` (logged steps the finding has been active, 0 once
    resolved). ``fit`` ends with a summary. The heuristics used are the ones whose metrics the module
    logs, so any method can add ``TrainingDiagnostics()`` as is.

    With ``measure`` (default) the callback adds to every logged training row a few measurements the
    heuristics use, accumulated over the batches since the previous row (the gradient norm: at the
    logged optimizer step) and reduced over ranks when the row is written (no per-step logging,
    collective or host sync): ``diagnostics/grad_norm``,
    ``diagnostics/lr``, ``diagnostics/memory/peak_fraction``, ``diagnostics/data_wait_fraction`` and,
    for batches with ``attention_mask`` / ``labels``, ``diagnostics/padding_fraction``,
    ``diagnostics/frac_rows_at_max_length``, ``diagnostics/frac_rows_no_loss_tokens``
    (definitions in docs/diagnostics.md).

    Without a logger the callback reads ``trainer.callback_metrics`` after every training batch and
    validation instead, and writes no file unless ``dirpath`` is given. The windows are not
    checkpointed: a resumed run starts them afresh, as ``diagnose`` on its new log directory does.

    Args:
        window: logged steps per window.
        remind_every: repeat a persisting finding every this many steps.
        thresholds: overrides of `lit_posttrain.diagnostics.Thresholds` by name.
        stop_on_error: stop the run (``trainer.should_stop``) at the first ``error`` finding.
        stop_on_non_finite_loss: stop at a non-finite ``train/loss`` (LPT001) even without ``stop_on_error``.
        measure: add the ``diagnostics/*`` measurements above to the logged rows.
        dirpath: directory of ``diagnostics.jsonl``; default the Trainer's ``log_dir`` (none without a logger).
    """

    def __init__(
        self,
        window: int = 20,
        remind_every: int = 50,
        thresholds: dict[str, float] | None = None,
        stop_on_error: bool = False,
        stop_on_non_finite_loss: bool = True,
        measure: bool = True,
        dirpath: str | None = None,
    ):
        self.window, self.remind_every = window, remind_every
        self.thresholds = Thresholds.with_overrides(thresholds)
        self.stop_on_error, self.stop_on_non_finite_loss = stop_on_error, stop_on_non_finite_loss
        self.measure, self.dirpath = measure, dirpath
        Diagnoser(window=window, remind_every=remind_every)  # bad values raise here, not at fit
        self.diagnoser: Diagnoser | None = None
        self.findings: list[Finding] = []  # every event printed, in order (rank 0)
        self.path: Path | None = None  # diagnostics.jsonl
        self._wrapped: list[tuple] = []  # (logger, its own log_metrics or None)
        self._extra: dict[str, float] = {}  # measurements and counts added to the current row
        self._stop = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        warn_if_slow_precision(trainer)  # e.g. bf16 on a CPU without AVX512-BF16 / AMX: slower than 32-true
        hparams = dict(trainer.datamodule.hparams_initial) if trainer.datamodule is not None else {}
        hparams.update(pl_module.hparams_initial)
        self.diagnoser = Diagnoser(
            run_context(hparams, trainer.precision),
            window=self.window,
            remind_every=self.remind_every,
            thresholds=self.thresholds,
        )
        self.findings, self._extra, self._stop = [], {}, False
        self.path = None
        if self.dirpath is not None:
            self.path = Path(self.dirpath) / "diagnostics.jsonl"
        elif trainer.loggers:
            log_dir = trainer.log_dir or trainer.default_root_dir  # every rank: Trainer.log_dir broadcasts
            self.path = Path(log_dir) / "diagnostics.jsonl"
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")  # an empty file: diagnosed, no findings (yet)
        max_length = self.diagnoser.context.get("max_length")
        self._max_length = max_length if isinstance(max_length, int) else None
        self._measure_grads = self.measure and not isinstance(
            trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)
        )
        self._memory_total = _memory_total(pl_module.device)
        self._params: list[torch.nn.Parameter] | None = None  # the trainable parameters, at the first step
        self._reset_sums()
        # timing: the previous batch's end, the last thing done before the next fetch (that end, a logged
        # row, a validation), the current batch's start, time spent validating since the previous end
        self._previous_end = self._ready = self._batch_start = None
        self._val_start, self._val_time = None, 0.0
        for i, logger in enumerate(trainer.loggers):
            self._wrap(trainer, pl_module, logger, diagnose=i == 0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_fused_clipping(trainer, pl_module)  # 16-mixed cannot clip a fused AdamW (the default): say so now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._measure_grads:
            return
        if pl_module.automatic_optimization and (trainer.global_step + 1) % trainer.log_every_n_steps:
            return  # only the optimizer steps whose row Lightning logs (as TRL logs grad_norm): cheap
        if self._params is None:  # after configure_model (FSDP2 shards the parameters there)
            self._params = [p for p in pl_module.parameters() if p.requires_grad]
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        self._sharded_grads = isinstance(grads[0], DTensor)  # FSDP2: each rank holds a shard
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        norm = torch.nn.utils.get_total_norm(local, norm_type=2.0)
        self._grad_sumsq.append(norm.detach().float() ** 2)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.measure:
            self._accumulate(batch)
        if not trainer.loggers:  # nothing to wrap: read what the module logged
            row = {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("val/")}
            if self.measure:
                row.update(self._collect(trainer, pl_module))
            self._diagnose(trainer, trainer.global_step, row)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.diagnoser is None or trainer.state.fn != "fit":  # trainer.validate(): nothing to watch
            return
        self._ready = time.perf_counter()
        self._val_time += self._ready - self._val_start
        if not trainer.loggers and not trainer.sanity_checking:
            row = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self._diagnose(trainer, trainer.global_step, row)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.diagnoser is not None and trainer.is_global_zero:
            rank_zero_info(self.diagnoser.summary())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger, own in self._wrapped:
            if own is None:
                del logger.log_metrics  # back to the class's method
            else:
                logger.log_metrics = own
        self._wrapped = []

    # ------------------------------------------------------------------ the logged rows
    def _wrap(self, trainer: L.Trainer, pl_module: L.LightningModule, logger, diagnose: bool) -> None:
        """Route ``logger.log_metrics`` through the diagnoser (first logger) and add measurements and counts."""
        own = logger.__dict__.get("log_metrics")
        original = logger.log_metrics

        def log_metrics(metrics, step=None):
            # a call with no numbers (e.g. WandbLogger.log_table's wandb.Table) is not a metrics row
            if not any(_is_number(v) for v in metrics.values()):
                return original(metrics=metrics, step=step)
            # every rank gets here at the same rows (Lightning logs on all ranks; loggers write on rank 0)
            training_row = any(k.startswith("train/") for k in metrics)
            if diagnose:
                self._extra = self._collect(trainer, pl_module) if self.measure and training_row else {}
                self._diagnose(trainer, step, {**metrics, **self._extra})
                self._extra.update(self.diagnoser.counts())
            if training_row and self._extra:
                metrics = {**metrics, **self._extra}
            original(metrics=metrics, step=step)
            self._ready = time.perf_counter()  # writing the row (and waiting for rank 0) is not data wait

        logger.log_metrics = log_metrics
        self._wrapped.append((logger, own))

    def _diagnose(self, trainer: L.Trainer, step: int, metrics: dict) -> None:
        # rank 0 decides; the other ranks follow its decision to stop
        if trainer.is_global_zero:
            row = {k: float(v) for k, v in metrics.items() if _is_number(v)}
            for event in self.diagnoser.update(step, row):
                self._emit(event)
                if event.status == "new" and event.severity == "error":
                    self._stop = (
                        self._stop
                        or self.stop_on_error
                        or (event.code == "LPT001" and self.stop_on_non_finite_loss)
                    )
        stop = trainer.strategy.broadcast(self._stop, src=0) if trainer.world_size > 1 else self._stop
        if stop and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info("[lit-posttrain] TrainingDiagnostics: stopping the run after an error finding.")

    def _emit(self, event: Finding) -> None:
        self.findings.append(event)
        rank_zero_info(event.line())
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(event.to_json()) + "\n")

    # ------------------------------------------------------------------ measurements
    def _reset_sums(self) -> None:
        self._grad_sumsq: list[torch.Tensor] = []  # one per optimizer step since the last row
        self._sharded_grads = False
        self._fractions: dict[
            str, list
        ] = {}  # name -> [numerator (tensor), denominator (int)] since the last row
        self._wait = self._interval = 0.0  # seconds since the last row

    def _accumulate(self, batch) -> None:
        """Per batch: timings, and this rank's batch counts (device tensors, no host sync)."""
        now = time.perf_counter()
        if self._previous_end is not None:
            # from the last thing the loop did after the previous batch (its row, a validation) to this
            # batch's start: fetching the batch, Lightning's bookkeeping
            self._wait += max(self._batch_start - max(self._ready, self._previous_end), 0.0)
            self._interval += now - self._previous_end - self._val_time
        self._previous_end = self._ready = now
        self._val_time = 0.0
        if not isinstance(batch, dict):
            return
        mask, labels = batch.get("attention_mask"), batch.get("labels")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # (B, T)
            self._add("diagnostics/padding_fraction", (mask == 0).sum(), mask.numel())
            if self._max_length:
                self._add(
                    "diagnostics/frac_rows_at_max_length", (mask.sum(1) >= self._max_length).sum(), len(mask)
                )
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:  # (B, T)
            self._add(
                "diagnostics/frac_rows_no_loss_tokens", ((labels != -100).sum(1) == 0).sum(), len(labels)
            )

    def _add(self, name: str, numerator: torch.Tensor, denominator: int) -> None:
        sums = self._fractions.setdefault(name, [0, 0])
        sums[0], sums[1] = sums[0] + numerator, sums[1] + denominator

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The measurements since the previous row, over all ranks (one collective, one host sync)."""
        columns = [torch.as_tensor(float(self._wait)), torch.as_tensor(float(self._interval))]
        peak = _memory_peak(pl_module.device)
        columns.append(
            torch.as_tensor(peak / self._memory_total if peak is not None and self._memory_total else -1.0)
        )
        for numerator, denominator in self._fractions.values():
            columns += [torch.as_tensor(numerator), torch.as_tensor(float(denominator))]
        columns += self._grad_sumsq
        values = torch.stack([c.to(pl_module.device, torch.float32) for c in columns])  # (C,)
        if trainer.world_size > 1:
            values = pl_module.all_gather(values).reshape(trainer.world_size, -1)  # (ranks, C)
        else:
            values = values[None]
        sums, maxima = values.sum(0).tolist(), values.max(0).values.tolist()
        wait, interval, peak_fraction = sums[0], sums[1], maxima[2]
        row = {}
        if trainer.optimizers:
            row["diagnostics/lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        if peak_fraction >= 0:
            row["diagnostics/memory/peak_fraction"] = peak_fraction
        if interval > 0:
            row["diagnostics/data_wait_fraction"] = wait / interval
        for i, name in enumerate(self._fractions):
            numerator, denominator = sums[3 + 2 * i], sums[4 + 2 * i]
            row[name] = numerator / denominator if denominator else 0.0
        grad_sumsq = sums[3 + 2 * len(self._fractions) :]
        if grad_sumsq:
            # FSDP2 shards: the squares add up over ranks; DDP: every rank holds the same gradients
            scale = 1.0 if self._sharded_grads else 1.0 / trainer.world_size
            row["diagnostics/grad_norm"] = math.sqrt(max(v * scale for v in grad_sumsq))
        self._reset_sums()
        return row


def _memory_total(device: torch.device) -> int | None:
    """Bytes the process may use: the GPU's memory, else the host's (or its cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if sys.platform == "win32":
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        if limit.is_file() and limit.read_text().strip().isdigit():
            total = min(total, int(limit.read_text().strip()))
    return total


def _memory_peak(device: torch.device) -> int | None:
    """Peak bytes so far: reserved by PyTorch's CUDA allocator, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    if sys.platform == "win32":
        return None
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB
