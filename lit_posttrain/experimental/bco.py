"""Binary Classifier Optimization (BCO): a binary classifier on implicit rewards, for unpaired data.

Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
https://arxiv.org/abs/2404.04656. Each row is a prompt x, one completion y and a binary label; no
pairs are needed. The implicit reward against a frozen reference policy is the logit of a binary
classifier that tells desirable completions from undesirable ones, shifted by delta:

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))
    loss    = -log sigmoid(r(x, y) - delta)       if y is desirable
              -log sigmoid(-(r(x, y) - delta))    if y is undesirable

where log pi(y|x) sums the log-probs of the completion tokens and delta, the reward shift, is the
running mean of the implicit rewards seen in training so far (the current ones included), not
back-propagated through.

Departures from the paper / from TRL, numbered:
1. No underlying distribution matching (UDM): the paper (and TRL's ``match_underlying_distribution``)
   can weigh each undesirable row by a density ratio from a classifier trained on prompt embeddings
   of an embedding model; it is left out, every row weighs 1.
2. delta is the mean of every implicit reward of every training step so far, each row counted once,
   over all micro-batches and ranks (TRL's RunningMoments averages per-process batch means), kept in
   checkpointed buffers (``delta``, ``num_rewards``) so resume is exact. A step's rewards enter it
   at the step's first micro-batch, before any of them is used: with gradient accumulation that
   micro-batch also runs the policy (and the reference) without gradients on the step's other
   micro-batches, which `BCODataModule` hands it (one more forward of each of their rows), so 4x1 ==
   1x4 (with your own DataLoader, each micro-batch's rewards enter at that micro-batch). Validation
   reads delta without updating it.
3. The loss is a mean over the rows of the whole optimizer step (from the DataModule's
   ``num_items_in_batch``), and so are the logged training metrics; ``rewards/margins`` is the mean
   desirable reward minus the mean undesirable reward of the step (the rows are unpaired).
4. The reference comes from the `ReferenceModel` callback (a frozen copy, the base model under LoRA,
   TR-DPO sync, or precomputed log-probs).

Supports: plain or conversational ``prompt``/``completion``/``label`` rows (chat template applied;
``label`` true = desirable); preference pairs ``prompt``/``chosen``/``rejected`` or conversational
``chosen``/``rejected`` with an implicit prompt, unpaired automatically (each pair gives a desirable
and an undesirable row); prompt truncation (``max_prompt_length``, keeps the end) and sequence
truncation (``max_length``, keeps the start), LoRA, DDP and FSDP2 (``ModelParallelStrategy``; the
reference is a full replica in every process), validation with the same metrics: ``loss``,
``delta``, ``rewards/chosen|rejected|margins``, ``logps/chosen|rejected``, ``entropy``,
``num_tokens`` (train); "chosen" are the desirable rows, "rejected" the undesirable ones (TRL's names).
Assumes: a causal LM whose forward accepts ``logits_to_keep`` (transformers >= 4.50 models); a
tokenizer with an EOS token (appended to plain completions).

    lit-posttrain fit --config configs/quickstart/bco.yaml
"""

from __future__ import annotations

import warnings
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_posttrain.callbacks.diagnostics import TrainingDiagnostics
from lit_posttrain.callbacks.reference_model import ReferenceModel, find_reference_model
from lit_posttrain.data import (
    DataFormatError,
    DatasetSource,
    LookaheadLoader,
    check_rows,
    describe_source,
    extract_prompt,
    is_conversational,
    load_rows,
    split_rows,
    tokenize_cached,
)
from lit_posttrain.experimental import warn_experimental
from lit_posttrain.models import DType, LoRAConfig, decoder_layers, load_model, load_tokenizer
from lit_posttrain.ops import entropy_from_logits, finite_grad_norm, masked_sum, pad, selective_log_softmax
from lit_posttrain.schedulers import WarmupDecayLR

warn_experimental(__name__)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForUnpairedPreference:
    """Turn tokenized unpaired examples into a batch of B rows.

    Each example has ``prompt_ids`` and ``completion_ids`` (lists of token ids, the completion
    ending with EOS / end-of-turn), ``label`` (True: desirable) and optionally float columns
    (``ref_logps``, ... added by `ReferenceModel` precomputation), passed through as (B,) tensors.

    Truncation: the prompt keeps its last ``max_prompt_length`` tokens, then prompt + completion keeps
    its first ``max_length`` tokens. Row ``i`` is ``prompt_i + completion_i``, right-padded with
    ``pad_token_id`` to the longest row.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T) 1 on real tokens, ``completion_mask`` (B, T)
        1 on completion tokens; ``label`` (B,) bool; the float columns (B,).

    >>> collator = DataCollatorForUnpairedPreference(pad_token_id=0)
    >>> batch = collator([
    ...     {"prompt_ids": [5, 6], "completion_ids": [7, 8], "label": True},
    ...     {"prompt_ids": [10], "completion_ids": [9], "label": False},
    ... ])
    >>> batch["input_ids"]
    tensor([[ 5,  6,  7,  8],
            [10,  9,  0,  0]])
    >>> batch["completion_mask"]
    tensor([[0, 0, 1, 1],
            [0, 1, 0, 0]])
    >>> batch["label"]
    tensor([ True, False])
    """

    def __init__(
        self, pad_token_id: int, max_length: int | None = None, max_prompt_length: int | None = None
    ):
        self.pad_token_id, self.max_length, self.max_prompt_length = (
            pad_token_id,
            max_length,
            max_prompt_length,
        )

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        input_ids, completion_mask = [], []
        for example in examples:
            prompt = example["prompt_ids"]
            if self.max_prompt_length is not None:
                prompt = prompt[-self.max_prompt_length :]
            ids = prompt + example["completion_ids"]
            mask = [0] * len(prompt) + [1] * len(example["completion_ids"])
            if self.max_length is not None:
                ids, mask = ids[: self.max_length], mask[: self.max_length]
            input_ids.append(torch.tensor(ids, dtype=torch.long))
            completion_mask.append(torch.tensor(mask, dtype=torch.long))
        batch["input_ids"] = pad(input_ids, self.pad_token_id)  # (B, T)
        batch["attention_mask"] = pad([torch.ones_like(ids) for ids in input_ids], 0)  # (B, T)
        batch["completion_mask"] = pad(completion_mask, 0)  # (B, T)
        batch["label"] = torch.tensor([example["label"] for example in examples], dtype=torch.bool)  # (B,)
        for key in examples[0]:
            if key not in ("prompt_ids", "completion_ids", "label"):
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)  # (B,)
        return batch


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
class BCODataModule(L.LightningDataModule):
    """Load, check, tokenize and batch unpaired preference data.

    Rows are ``prompt`` + ``completion`` + ``label`` (bool, true = desirable), each text a string
    ("plain") or a list of ``{"role", "content"}`` messages ("conversational": the chat template is
    applied; the completion is what the template renders after the prompt's generation prompt).
    Preference pairs (``prompt`` + ``chosen`` + ``rejected``, or conversational ``chosen`` +
    ``rejected`` whose shared leading messages are the prompt) are unpaired: each gives a desirable
    row (its chosen completion) and an undesirable row (its rejected one). Plain completions get the
    EOS token appended. Every row is checked in `setup`, before training: a malformed row raises
    `DataFormatError` naming the source, row and column.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows (pairs, for paired data) held out for validation.
        batch_size: rows per micro-batch.
        max_length: tokens per sequence (prompt + completion); longer ones keep their start.
        max_prompt_length: prompt tokens; longer prompts keep their end. None: no limit.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the ``val_size`` split.
        dataset_split: split to read ``train_data`` from, for a hub dataset (e.g. ``train``).
        val_dataset_split: split to read ``val_data`` from (e.g. ``test``); default ``dataset_split``.
        dataset_config: hub dataset configuration name.
        columns: maps the column names BCO expects to the data's own, e.g.
            ``{prompt: question, completion: answer, label: thumbs_up}``; unmapped columns keep their names.
        trust_remote_code: let the tokenizer load code from its repository (off unless asked; the
            CLI sets it from the model's ``trust_remote_code``).

    For `ReferenceModel` precomputation it also offers ``ordered_dataloader(split, batch_size)``
    and ``add_columns(split, columns)``.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        train_data: DatasetSource | None = None,
        val_data: DatasetSource | None = None,
        val_size: float = 0.0,
        batch_size: int = 8,
        max_length: int | None = 1024,
        max_prompt_length: int | None = 512,
        num_workers: int = 0,
        seed: int = 0,
        dataset_split: str = "train",
        val_dataset_split: str | None = None,
        dataset_config: str | None = None,
        columns: dict[str, str] | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"] if not isinstance(tokenizer, str) else None)
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.train_data, self.val_data, self.val_size = train_data, val_data, val_size
        self.batch_size, self.max_length, self.max_prompt_length = batch_size, max_length, max_prompt_length
        self.num_workers, self.seed = num_workers, seed
        self.dataset_split, self.val_dataset_split = dataset_split, val_dataset_split or dataset_split
        self.dataset_config, self.columns = dataset_config, columns
        self.collator = DataCollatorForUnpairedPreference(
            self.tokenizer.pad_token_id, max_length, max_prompt_length
        )
        self.examples: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        if self.train_data is None:
            raise ValueError(
                "BCODataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
            )
        train = load_rows(self.train_data, split=self.dataset_split, name=self.dataset_config, columns=self.columns)
        source = describe_source(self.train_data)
        self._check(train, source)
        val, val_source = None, None
        if self.val_data is not None:
            val = load_rows(self.val_data, split=self.val_dataset_split, name=self.dataset_config, columns=self.columns)
            val_source = describe_source(self.val_data)
            self._check(val, val_source)
        elif self.val_size:
            train, val = split_rows(train, self.val_size, seed=self.seed)
            val_source = f"{source} (validation split)"
        self.examples["train"] = tokenize_cached(self, self._tokenize, train, source)
        if val is not None:
            self.examples["val"] = tokenize_cached(self, self._tokenize, val, val_source)

    def _check(self, rows, source: str) -> None:
        if "chosen" in rows.column_names or "rejected" in rows.column_names:  # pairs, unpaired in _tokenize
            if "prompt" in rows.column_names:
                check_rows(rows, required={"prompt": "text", "chosen": "text", "rejected": "text"}, source=source)
            else:  # implicit prompt: the shared leading messages of chosen and rejected
                check_rows(rows, required={"chosen": "messages", "rejected": "messages"}, source=source)
        else:
            check_rows(rows, required={"prompt": "text", "completion": "text", "label": "bool"}, source=source)

    def _tokenize(self, rows, source: str) -> list[dict]:
        """-> [{"prompt_ids", "completion_ids", "label"}] (untruncated; the collator truncates)."""
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        examples, no_completion = [], 0
        for i, row in enumerate(rows):
            if "completion" in row:
                prompt, completions = row["prompt"], {"completion": (row["completion"], row["label"])}
            elif "prompt" in row:
                prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
                completions = {"chosen": (chosen, True), "rejected": (rejected, False)}
            else:
                prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
                if not prompt:
                    raise DataFormatError(
                        f"{source}: row {i}, column 'chosen': without a 'prompt' column, 'chosen' and 'rejected' "
                        "must share their leading (prompt) messages; these share none"
                    )
                completions = {"chosen": (chosen, True), "rejected": (rejected, False)}
            conversational = [is_conversational(v) for v in (prompt, *(c for c, _ in completions.values()))]
            if any(conversational) and not all(conversational):
                column = ("prompt", *completions)[conversational.index(not conversational[0])]
                raise DataFormatError(
                    f"{source}: row {i}, column '{column}': prompt and {' and '.join(completions)} must all be "
                    "strings or all be lists of messages; this row mixes both"
                )
            if conversational[0]:
                prompt_ids = tok.apply_chat_template(
                    prompt, tokenize=True, add_generation_prompt=True, return_dict=True
                )["input_ids"]
                for column, (completion, label) in completions.items():
                    ids = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)[
                        "input_ids"
                    ]
                    if list(ids[: len(prompt_ids)]) != list(prompt_ids):
                        raise DataFormatError(
                            f"{source}: row {i}, column '{column}': the chat template renders prompt + {column} with "
                            "a different prefix than the prompt alone, so the completion mask would be misaligned"
                        )
                    examples.append(
                        {"prompt_ids": list(prompt_ids), "completion_ids": list(ids[len(prompt_ids) :]), "label": label}
                    )
            else:
                prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                for completion, label in completions.values():
                    completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [eos]
                    examples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label})
            prompt_length = len(examples[-1]["prompt_ids"])
            if self.max_prompt_length is not None:
                prompt_length = min(prompt_length, self.max_prompt_length)
            no_completion += self.max_length is not None and prompt_length >= self.max_length
        if no_completion:
            warnings.warn(
                f"{source}: {no_completion} row(s) have no completion token left after truncation to max_length="
                f"{self.max_length} (their prompts are that long); they add nothing to the loss. Raise max_length "
                "or set max_prompt_length below it."
            )
        return examples

    def train_dataloader(self):
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return LookaheadLoader(
            self.examples["train"],
            batch_size=self.batch_size,
            collate_fn=self.collator,
            accumulate_grad_batches=accumulate,
            count_items=_count_rows,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            trainer=self.trainer,
            window_columns=_step_rows,
        )

    def val_dataloader(self):
        if "val" not in self.examples:
            return []
        return DataLoader(
            self.examples["val"],
            batch_size=self.batch_size,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def ordered_dataloader(
        self, split: Literal["train", "val"], batch_size: int | None = None
    ) -> DataLoader | None:
        """Every row of ``split`` in stored order (for precomputing per-row values); None if absent."""
        if split not in self.examples:
            return None
        return DataLoader(
            self.examples[split], batch_size=batch_size or self.batch_size, collate_fn=self.collator
        )

    def add_columns(self, split: Literal["train", "val"], columns: dict[str, torch.Tensor]) -> None:
        """Attach per-row values (each (rows,), in stored order); the collator emits them as (B,) tensors."""
        rows = self.examples[split]
        for name, values in columns.items():
            if len(values) != len(rows):
                raise ValueError(
                    f"add_columns: column {name!r} has {len(values)} values for {len(rows)} {split} rows"
                )
            for row, value in zip(rows, values.tolist()):
                row[name] = value


def _count_rows(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


def _step_rows(window: list[dict]) -> dict:
    """The rows of every micro-batch of an optimizer step, handed to each of them."""
    keys = ("input_ids", "attention_mask", "completion_mask", "ref_logps")
    return {"step_rows": [{key: batch[key] for key in keys if key in batch} for batch in window]}


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def bco_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    delta: float | torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row BCO losses.

    Args:
        policy_logps, ref_logps: (B,) policy and reference log-probs of each completion (sum over its tokens).
        labels: (B,) bool, True where the completion is desirable.
        delta: the reward shift (the running mean of the implicit rewards, kept by the caller), detached.
        beta: inverse temperature of the implicit reward (higher: stay closer to the reference).
    Returns:
        ``(losses, rewards)``, each (B,) in input order: the losses and the implicit rewards
        ``beta * (policy_logps - ref_logps)``, detached. The loss to minimise is ``losses.mean()``.
    """
    rewards = beta * (policy_logps - ref_logps)  # (B,) r(x, y)

    # BCO: binary cross-entropy with the shifted reward as the logit, desirable = 1, undesirable = 0
    desirable_losses = -F.logsigmoid(rewards - delta)
    undesirable_losses = -F.logsigmoid(-(rewards - delta))
    losses = torch.where(labels, desirable_losses, undesirable_losses)

    return losses, rewards.detach()


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class BCOModule(L.LightningModule):
    """Binary Classifier Optimization of a causal LM (full or LoRA).

    The reference model comes from a `ReferenceModel` callback. If the Trainer has none,
    ``configure_callbacks`` adds a default ``ReferenceModel()`` (a frozen copy of the initial
    policy; with LoRA the base model with adapters disabled). Pass your own to the Trainer for TR-DPO
    sync or precomputed reference log-probs.

    Args:
        model_name_or_path: hub id or local directory of the model (usually an SFT model).
        tokenizer_name_or_path: tokenizer location when it differs from the model's.
        random_init: build the model from its config with random weights (tests, quickstart).
        model_config: config fields to override.
        init_seed: seed of the random initialisation.
        dtype: parameter dtype at load time (Lightning's ``precision`` decides the compute dtype).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: allow model code from the hub (off unless asked).
        lora: LoRA adapter settings; None for full fine-tuning.
        quantization: QLoRA: load the base in 4-bit or 8-bit (transformers' ``BitsAndBytesConfig`` fields,
            e.g. ``{load_in_4bit: true, bnb_4bit_quant_type: nf4}``); needs ``lora``. See docs/qlora.md.
        beta: inverse temperature of the implicit reward (higher: stay closer to the reference).
        disable_dropout: set every dropout probability in the model to 0 (TRL's default), so the
            policy and the reference see the same network at the start.
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback (findings about the
            run's health, docs/diagnostics.md) unless the Trainer has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
    """

    METHOD = "BCO"
    PAPER = "https://arxiv.org/abs/2404.04656"

    def __init__(
        self,
        model_name_or_path: str,
        *,
        tokenizer_name_or_path: str | None = None,
        random_init: bool = False,
        model_config: dict | None = None,
        init_seed: int = 0,
        dtype: DType = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        lora: LoRAConfig | None = None,
        quantization: dict | None = None,
        beta: float = 0.1,
        disable_dropout: bool = True,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = load_model(
            model_name_or_path,
            random_init=random_init,
            model_config=model_config,
            init_seed=init_seed,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
            lora=lora,
            quantization=quantization,
            disable_dropout=disable_dropout,
        )
        self.tokenizer = load_tokenizer(
            tokenizer_name_or_path or model_name_or_path, trust_remote_code=trust_remote_code
        )
        self.beta = beta
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        # the reward shift: the running mean of every implicit reward so far and their count, checkpointed
        self.register_buffer("delta", torch.zeros(()))
        self.register_buffer("num_rewards", torch.zeros((), dtype=torch.long))
        # input tokens trained on, all ranks (checkpointed, as in SFTModule)
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.long))
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in _METRICS})
        self._step_sums: dict[str, torch.Tensor] = {}  # training metric sums of the current optimizer step
        self._step_sums_at = -1  # ... and the global step they belong to
        self._delta_at = -1  # the global step whose rewards delta holds last

    def configure_callbacks(self):
        """A default `ReferenceModel` unless the Trainer has one, and a default `TrainingDiagnostics`
        unless the Trainer has one (or ``diagnostics=False``)."""
        given = [cb for cb in self.trainer.callbacks if isinstance(cb, ReferenceModel)]
        callbacks = [] if given else [ReferenceModel()]
        # training diagnostics, on by default: the user's TrainingDiagnostics callback, else one with defaults
        if self.diagnostics and not any(isinstance(c, TrainingDiagnostics) for c in self.trainer.callbacks):
            callbacks.append(TrainingDiagnostics())
        return callbacks

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard each decoder layer, then the root."""
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, use_cache=False
        ).logits

    def training_step(self, batch, batch_idx):
        # the step's rewards enter delta at its first micro-batch, before its first backward;
        # without BCODataModule's step_rows, each micro-batch's own rewards (as TRL)
        update = "step_rows" not in batch or self._delta_at != self.trainer.global_step
        self._delta_at = self.trainer.global_step
        loss, metrics = self._shared_step(batch, update_running_stats=update)
        num_rows = batch["input_ids"].new_tensor(batch["input_ids"].shape[0])
        weights = _metric_weights(batch)
        num_items_in_batch = batch.get("num_items_in_batch")
        # one collective: the optimizer step's rows, tokens, weighted metric sums and their weights, all ranks
        metric_stats = {f"{name} sum": metrics[name] * weights[name] for name in _METRICS}
        metric_stats.update({f"{name} weight": weights[name] for name in _METRICS})
        stats = {
            "num_items_in_batch": num_items_in_batch if num_items_in_batch is not None else num_rows,
            "num_tokens": batch["attention_mask"].sum(),
            **metric_stats,
        }
        reduced = self.trainer.strategy.reduce(torch.stack([s.float() for s in stats.values()]), reduce_op="sum")
        sums = dict(zip(stats, reduced))  # name -> its sum over all ranks
        if num_items_in_batch is not None:
            # the mean over the rows of the whole optimizer step (all micro-batches and ranks), so
            # unequal micro-batches weigh by their rows; Lightning divides the loss by the
            # accumulation steps and DDP averages over ranks, so undo both
            micro_batches = self.trainer.accumulate_grad_batches * self.trainer.world_size  # per step, all ranks
            loss = loss * num_rows / (sums["num_items_in_batch"] / micro_batches)
        # the logged metrics are weighted over the optimizer step so far (all micro-batches and
        # ranks): at its last micro-batch, the one Lightning logs, they cover the whole step
        if self._step_sums_at != self.trainer.global_step:
            self._step_sums = {name: torch.zeros_like(sums[name]) for name in metric_stats}
            self._step_sums_at = self.trainer.global_step
        for name in self._step_sums:
            self._step_sums[name] += sums[name]
        step = self._step_sums
        self.num_tokens += sums["num_tokens"].long()
        values = {name: step[f"{name} sum"] / step[f"{name} weight"].clamp(min=1) for name in _METRICS}
        values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "rewards/margins"))
        self.log("train/num_tokens", self.num_tokens.float())
        return loss

    def validation_step(self, batch, batch_idx):
        _, metrics = self._shared_step(batch, update_running_stats=False)
        weights = _metric_weights(batch)
        for name in _METRICS:  # row-weighted (desirable / undesirable rows, tokens for entropy) over the set
            self.val_metrics[name].update(metrics[name], weight=weights[name])
            self.log(f"val/{name}", self.val_metrics[name], prog_bar=name == "loss")

    def on_validation_epoch_end(self) -> None:
        margins = self.val_metrics["rewards/chosen"].compute() - self.val_metrics["rewards/rejected"].compute()
        self.log("val/rewards/margins", margins, prog_bar=True)

    def _shared_step(self, batch, update_running_stats: bool):
        if update_running_stats:
            # the rewards of the step's other micro-batches, before this one's forward (it is the first
            # of its step: LookaheadLoader windows are Lightning's accumulation windows)
            other_rewards = self.implicit_rewards(batch.get("step_rows", [batch])[1:])  # (N,)
        logps, logits, mask = self.completion_logps(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )  # (B,), (B, K-1, V), (B, K-1)
        labels = batch["label"]  # (B,) True: desirable

        if "ref_logps" in batch:  # precomputed by the ReferenceModel callback
            ref_logps = batch["ref_logps"]
        else:
            ref = self.compute_ref_logps(batch)
            ref_logps = ref["ref_logps"]

        if update_running_stats:
            self.update_delta(torch.cat([self.beta * (logps.detach() - ref_logps), other_rewards]))

        losses, rewards = bco_loss(logps, ref_logps, labels, self.delta, beta=self.beta)
        loss = losses.mean()

        with torch.no_grad():
            logits = logits.detach()
            num_chosen, num_rejected = labels.sum().clamp(min=1), (~labels).sum().clamp(min=1)
            metrics = {
                "loss": loss.detach(),
                "delta": self.delta.clone(),
                "rewards/chosen": rewards[labels].sum() / num_chosen,
                "rewards/rejected": rewards[~labels].sum() / num_rejected,
                "logps/chosen": logps.detach()[labels].sum() / num_chosen,
                "logps/rejected": logps.detach()[~labels].sum() / num_rejected,
                "entropy": masked_sum(entropy_from_logits(logits), mask) / mask.sum().clamp(min=1),
            }
        return loss, metrics

    @torch.no_grad()
    def implicit_rewards(self, batches: list[dict]) -> torch.Tensor:
        """``beta * (log pi - log pi_ref)`` of every row of ``batches`` (no gradient), concatenated (N,).

        The reference's log-probs come from ``ref_logps`` when precomputed.
        """
        rewards = [torch.zeros(0, device=self.device)]
        for rows in batches:
            inputs = (rows["input_ids"], rows["attention_mask"], rows["completion_mask"])
            logps, _, _ = self.completion_logps(*inputs)  # (B,)
            if "ref_logps" in rows:  # precomputed by the ReferenceModel callback
                ref_logps = rows["ref_logps"]
            else:
                ref_logps, _, _ = self.completion_logps(*inputs, reference=True)
            rewards.append(self.beta * (logps - ref_logps))
        return torch.cat(rewards)

    @torch.no_grad()
    def update_delta(self, rewards: torch.Tensor) -> None:
        """Fold ``rewards`` (N,) of every rank into delta, the running mean of all rewards so far.

        One collective reduces their sum and count over ranks; ``num_rewards`` counts them all.
        """
        stats = {"rewards": rewards.sum(), "num_rewards": torch.tensor(rewards.numel(), device=rewards.device)}
        reduced = self.trainer.strategy.reduce(torch.stack([s.float() for s in stats.values()]), reduce_op="sum")
        sums = dict(zip(stats, reduced))  # name -> its sum over all ranks
        self.num_rewards += sums["num_rewards"].long()
        self.delta += (sums["rewards"] - sums["num_rewards"] * self.delta) / self.num_rewards.clamp(min=1)

    def completion_logps(self, input_ids, attention_mask, completion_mask, reference: bool = False):
        """One forward of B rows (policy, or the reference model): their completions' log-probs.

        Only the logits from the position before the first completion token on are computed
        (``logits_to_keep``), and only the label tokens' log-probs are gathered from them.

        Returns:
            logps (B,): sums of completion-token log-probs; logits (B, K-1, V): the logits that
            predict tokens T-K+1 .. T-1; mask (B, K-1): which of those tokens are completion tokens.
        """
        logits_to_keep = _logits_to_keep(completion_mask)  # K
        forward = find_reference_model(self.trainer, self.METHOD).forward if reference else self.forward
        logits = forward(input_ids, attention_mask, logits_to_keep=logits_to_keep)[:, :-1]  # (B, K-1, V)
        start = input_ids.shape[1] - logits.shape[1]  # T - (K-1)
        labels = input_ids[:, start:]  # (B, K-1): the token each logit row predicts
        mask = completion_mask[:, start:].bool()  # (B, K-1)
        per_token_logps = selective_log_softmax(logits, labels)  # (B, K-1)
        return masked_sum(per_token_logps, mask, dim=1), logits, mask

    @torch.no_grad()
    def compute_ref_logps(self, batch) -> dict[str, torch.Tensor]:
        """Reference log-probs of each row's completion, (B,).

        Runs the `ReferenceModel` callback's frozen model; the callback also calls this once per
        row when it precomputes them.
        """
        ref_logps, _, _ = self.completion_logps(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"], reference=True
        )
        return {"ref_logps": ref_logps}

    def configure_optimizers(self):
        optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, WarmupDecayLR) and scheduler.num_training_steps is None:
            scheduler.set_num_training_steps(self.trainer.estimated_stepping_batches)  # the run's optimizer steps
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # TRL's grad_norm (before clipping) and learning_rate, once per optimizer step
        self.log("train/grad_norm", finite_grad_norm(self.parameters(), self.global_step))
        self.log("train/learning_rate", float(optimizer.param_groups[0]["lr"]))


_METRICS = (
    "loss",
    "delta",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "entropy",
)


def _metric_weights(batch) -> dict[str, torch.Tensor]:
    """What each metric is a mean over: all rows, the desirable or undesirable rows, or the completion tokens."""
    labels = batch["label"]
    num_rows = labels.new_tensor(labels.numel(), dtype=torch.long)
    num_chosen, num_rejected = labels.sum(), (~labels).sum()
    weights = {"loss": num_rows, "delta": num_rows, "entropy": batch["completion_mask"].sum()}
    weights["rewards/chosen"], weights["logps/chosen"] = num_chosen, num_chosen
    weights["rewards/rejected"], weights["logps/rejected"] = num_rejected, num_rejected
    return weights


def _logits_to_keep(completion_mask: torch.Tensor) -> int:
    """How many final positions' logits are needed: from the one before the first completion token."""
    has_completion = completion_mask.any(0)  # (T,)
    first = int(has_completion.int().argmax()) if bool(has_completion.any()) else completion_mask.shape[1] - 1
    return completion_mask.shape[1] - max(first, 1) + 1
