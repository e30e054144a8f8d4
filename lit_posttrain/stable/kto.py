"""Kahneman-Tversky Optimization (KTO): learn from completions labelled desirable or undesirable.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
https://arxiv.org/abs/2402.01306. Each row is a prompt x, one completion y and a binary label; no
pairs are needed. With the log-ratio against a frozen reference policy and a reference point z_ref,

    r(x, y) = log pi(y|x) - log pi_ref(y|x)
    z_ref   = KL(pi(y'|x) || pi_ref(y'|x)), estimated as max(0, mean r(x, y')) over mismatched pairs
    v(x, y) = lambda_D * sigmoid(beta * (r(x, y) - z_ref))    if y is desirable
              lambda_U * sigmoid(beta * (z_ref - r(x, y)))    if y is undesirable
    loss    = E[lambda_y - v(x, y)]                                                  (section 4.1)

where log pi(y|x) sums the log-probs of the completion tokens and z_ref is not back-propagated
through. The implicit rewards are ``beta * r(x, y)``. The paper recommends weights with
``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3] (eq. 8; n_D and n_U count the desirable and
undesirable rows); the module warns at setup when the training data and the weights fall outside it.
``loss_type="apo_zero_unpaired"`` is the unpaired APO-zero loss (D'Oosterlinck et al. 2024,
https://arxiv.org/abs/2408.06266), as in TRL: desirable log-ratios up, undesirable down, no z_ref.

Departures from the paper / from TRL, numbered:
1. The mismatched pairs (x, y') that estimate z_ref are fixed once per split: the DataModule
   shuffles the rows with ``seed`` and gives each the completion of the next row in that order (a
   rotation by one, as TRL rotates completions within a batch). TRL's rotation needs sequential
   sampling; here training samples in random order, the pairs do not depend on how a step is split
   into micro-batches and processes, and the reference's log-probs of the mismatched rows can be
   precomputed. A prompt that occurs in several rows can meet one of its own completions (rare
   with shuffled partners; the paper's estimate ignores it too).
2. z_ref is the mean over every row of the optimizer step (all micro-batches and ranks), computed
   at the step's first micro-batch: `KTODataModule` hands each micro-batch the mismatched rows of
   its whole accumulation window (with your own DataLoader: each micro-batch's z_ref). TRL averages
   per-process micro-batch means. Validation estimates z_ref per batch (all ranks).
3. The loss is a mean over the rows of the whole optimizer step (from the DataModule's
   ``num_items_in_batch``), and so are the logged training metrics; ``rewards/margins`` is the mean
   desirable reward minus the mean undesirable reward of the step (the rows are unpaired).
4. The reference comes from the `ReferenceModel` callback (a frozen copy, the base model under LoRA,
   TR-DPO sync, or precomputed log-probs of the rows and of their mismatched rows).
5. ``train/entropy`` is computed only on the optimizer steps whose metrics reach a reader: those
   Lightning logs (every ``trainer.log_every_n_steps``), the run's last step (``max_steps``), and every
   step when there is no logger. It costs extra passes over every chunk's logits. Each logged value is
   that optimizer step's (TRL computes its metrics every step and logs the mean since its last log).
   Validation always computes it.

Supports: plain or conversational ``prompt``/``completion``/``label`` rows (chat template applied;
``label`` true = desirable); preference pairs ``prompt``/``chosen``/``rejected`` or conversational
``chosen``/``rejected`` with an implicit prompt, unpaired automatically (each pair gives a desirable
and an undesirable row); prompt truncation (``max_prompt_length``, keeps the end) and sequence
truncation (``max_length``, keeps the start), LoRA, DDP and FSDP2 (``ModelParallelStrategy``; the
reference is a full replica in every process), validation with the same metrics: ``loss``, ``kl``,
``rewards/chosen|rejected|margins``, ``logps/chosen|rejected``, ``entropy``, ``num_tokens`` (train);
"chosen" are the desirable rows, "rejected" the undesirable ones (TRL's names).
Assumes: a causal LM whose forward accepts ``logits_to_keep`` (transformers >= 4.50 models); a
tokenizer with an EOS token (appended to plain completions).

    lit-posttrain fit --config configs/quickstart/kto.yaml
"""

from __future__ import annotations

import typing
import warnings
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
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
from lit_posttrain.models import (
    DType,
    LoRAConfig,
    decoder_layers,
    final_hidden_states,
    load_model,
    load_tokenizer,
)
from lit_posttrain.ops import chunked_selective_log_softmax, finite_grad_norm, masked_sum, pad
from lit_posttrain.schedulers import WarmupDecayLR

LossType = Literal["kto", "apo_zero_unpaired"]
LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForUnpairedPreference:
    """Turn tokenized unpaired examples into a batch of B rows and their B mismatched rows.

    Each example has ``prompt_ids``, ``completion_ids`` and ``kl_completion_ids`` (lists of token
    ids, the completions ending with EOS / end-of-turn; ``kl_completion_ids`` is another row's
    completion, chosen by the DataModule), ``label`` (True: desirable) and optionally float columns
    (``ref_logps``, ``ref_kl_logps``, ... added by `ReferenceModel` precomputation), passed through
    as (B,) tensors.

    Truncation: the prompt keeps its last ``max_prompt_length`` tokens, then prompt + completion keeps
    its first ``max_length`` tokens. Row ``i`` is ``prompt_i + completion_i`` and mismatched row
    ``i`` is ``prompt_i + kl_completion_i``, each set right-padded with ``pad_token_id`` to its longest.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T) 1 on real tokens, ``completion_mask`` (B, T)
        1 on completion tokens; the same for the mismatched rows as ``kl_input_ids``,
        ``kl_attention_mask``, ``kl_completion_mask`` (B, T'); ``label`` (B,) bool; the float columns (B,).

    >>> collator = DataCollatorForUnpairedPreference(pad_token_id=0)
    >>> batch = collator([
    ...     {"prompt_ids": [5, 6], "completion_ids": [7, 8], "kl_completion_ids": [9], "label": True},
    ...     {"prompt_ids": [10], "completion_ids": [9], "kl_completion_ids": [7, 8], "label": False},
    ... ])
    >>> batch["input_ids"]
    tensor([[ 5,  6,  7,  8],
            [10,  9,  0,  0]])
    >>> batch["completion_mask"]
    tensor([[0, 0, 1, 1],
            [0, 1, 0, 0]])
    >>> batch["kl_input_ids"]  # each prompt with the other row's completion
    tensor([[ 5,  6,  9],
            [10,  7,  8]])
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
        for prefix, key in (("", "completion_ids"), ("kl_", "kl_completion_ids")):
            input_ids, completion_mask = [], []
            for example in examples:
                prompt = example["prompt_ids"]
                if self.max_prompt_length is not None:
                    prompt = prompt[-self.max_prompt_length :]
                ids = prompt + example[key]
                mask = [0] * len(prompt) + [1] * len(example[key])
                if self.max_length is not None:
                    ids, mask = ids[: self.max_length], mask[: self.max_length]
                input_ids.append(torch.tensor(ids, dtype=torch.long))
                completion_mask.append(torch.tensor(mask, dtype=torch.long))
            batch[f"{prefix}input_ids"] = pad(input_ids, self.pad_token_id)  # (B, T)
            batch[f"{prefix}attention_mask"] = pad([torch.ones_like(ids) for ids in input_ids], 0)  # (B, T)
            batch[f"{prefix}completion_mask"] = pad(completion_mask, 0)  # (B, T)
        batch["label"] = torch.tensor([example["label"] for example in examples], dtype=torch.bool)  # (B,)
        for key in examples[0]:
            if key not in ("prompt_ids", "completion_ids", "kl_completion_ids", "label"):
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)  # (B,)
        return batch


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
class KTODataModule(L.LightningDataModule):
    """Load, check, tokenize and batch unpaired preference data.

    Rows are ``prompt`` + ``completion`` + ``label`` (bool, true = desirable), each text a string
    ("plain") or a list of ``{"role", "content"}`` messages ("conversational": the chat template is
    applied; the completion is what the template renders after the prompt's generation prompt).
    Preference pairs (``prompt`` + ``chosen`` + ``rejected``, or conversational ``chosen`` +
    ``rejected`` whose shared leading messages are the prompt) are unpaired: each gives a desirable
    row (its chosen completion) and an undesirable row (its rejected one). Plain completions get the
    EOS token appended. Every row is checked in `setup`, before training: a malformed row raises
    `DataFormatError` naming the source, row and column.

    Each row also gets a mismatched completion for KTO's reference point: the rows of a split are
    shuffled with ``seed`` and each takes the completion of the next row in that order.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows (pairs, for paired data) held out for validation.
        batch_size: rows per micro-batch (the model also sees their batch_size mismatched rows).
        max_length: tokens per sequence (prompt + completion); longer ones keep their start.
        max_prompt_length: prompt tokens; longer prompts keep their end. None: no limit.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling, of the ``val_size`` split and of the mismatched pairs.
        dataset_split: split to read ``train_data`` from, for a hub dataset (e.g. ``train``).
        val_dataset_split: split to read ``val_data`` from (e.g. ``test``); default ``dataset_split``.
        dataset_config: hub dataset configuration name.
        columns: maps the column names KTO expects to the data's own, e.g.
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
                "KTODataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
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
        """-> [{"prompt_ids", "completion_ids", "kl_completion_ids", "label"}] (untruncated; the collator truncates)."""
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
        # the mismatched completion of each row (KTO's reference point): the next row's in a seeded shuffle
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        for position, index in enumerate(order):
            examples[index]["kl_completion_ids"] = examples[order[(position + 1) % len(order)]]["completion_ids"]
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
            window_columns=_step_kl_rows,
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


def _step_kl_rows(window: list[dict]) -> dict:
    """The mismatched rows of every micro-batch of an optimizer step, handed to each of them."""
    keys = ("kl_input_ids", "kl_attention_mask", "kl_completion_mask", "ref_kl_logps")
    return {"step_kl_rows": [{key: batch[key] for key in keys if key in batch} for batch in window]}


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_ref: the mean log-ratio of mismatched rows, clamped at 0, detached.

    Args:
        policy_kl_logps, ref_kl_logps: (N,) policy and reference log-probs of the mismatched
            completions (sums over their tokens). For the mean over a global batch spread over
            micro-batches and processes, pass that batch's means (shape (1,)): the mean of the
            differences is the difference of the means, and `KTOModule` reduces those over ranks.
    Returns:
        0-d tensor ``max(0, mean(policy_kl_logps - ref_kl_logps))`` without gradient.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: float | torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: LossType = "kto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO losses.

    Args:
        policy_logps, ref_logps: (B,) policy and reference log-probs of each completion (sum over its tokens).
        labels: (B,) bool, True where the completion is desirable.
        kl: the reference point z_ref (`kto_kl`), a detached scalar; unused by ``apo_zero_unpaired``.
        beta: inverse temperature of the implicit reward (higher: stay closer to the reference).
        desirable_weight, undesirable_weight: lambda_D and lambda_U.
        loss_type: one of `LOSS_TYPES`.
    Returns:
        ``(losses, rewards)``, each (B,) in input order: the weighted losses and the implicit rewards
        ``beta * (policy_logps - ref_logps)``, detached. The loss to minimise is ``losses.mean()``.
    """
    _check_loss_type(loss_type)
    logratios = policy_logps - ref_logps  # (B,) r(x, y)

    if loss_type == "kto":
        # KTO section 4.1: lambda_y - v(x, y), v = lambda_D s(beta (r - z_ref)) or lambda_U s(beta (z_ref - r))
        desirable_losses = 1 - torch.sigmoid(beta * (logratios - kl))
        undesirable_losses = 1 - torch.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        # APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266) eq. 7, per row: desirable up, undesirable down
        desirable_losses = 1 - torch.sigmoid(beta * logratios)
        undesirable_losses = torch.sigmoid(beta * logratios)
    losses = torch.where(labels, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses)

    rewards = beta * logratios.detach()
    return losses, rewards


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")


def _warn_if_unbalanced(
    num_desirable: int, num_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> None:
    """Warn when ``desirable_weight * num_desirable / (undesirable_weight * num_undesirable)`` is outside
    KTO's recommended [1, 4/3] (eq. 8), naming the weights that would bring it back."""
    if not num_desirable or not num_undesirable:
        rank_zero_warn(
            f"KTO: the training data has {num_desirable} desirable and {num_undesirable} undesirable rows, so "
            "the paper's eq. 8 balance cannot hold; KTO is meant for data with both kinds"
        )
        return
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return
    low = undesirable_weight * num_undesirable / num_desirable  # desirable_weight that gives ratio 1
    high = desirable_weight * num_desirable / num_undesirable  # undesirable_weight that gives ratio 1
    rank_zero_warn(
        f"KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {desirable_weight} * "
        f"{num_desirable} / ({undesirable_weight} * {num_undesirable}) = {ratio:.3f}, outside the paper's "
        f"recommended [1, 4/3] (eq. 8). Set desirable_weight in [{low:.3g}, {4 / 3 * low:.3g}] or "
        f"undesirable_weight in [{3 / 4 * high:.3g}, {high:.3g}]."
    )


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class KTOModule(L.LightningModule):
    """Kahneman-Tversky Optimization of a causal LM (full or LoRA).

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
        loss_type: one of `LOSS_TYPES`.
        desirable_weight: lambda_D, the weight of the desirable rows' losses.
        undesirable_weight: lambda_U, the weight of the undesirable rows' losses.
        disable_dropout: set every dropout probability in the model to 0 (TRL's default), so the
            policy and the reference see the same network at the start.
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback (findings about the
            run's health, docs/diagnostics.md) unless the Trainer has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
    """

    METHOD = "KTO"
    PAPER = "https://arxiv.org/abs/2402.01306"

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
        loss_type: LossType = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        disable_dropout: bool = True,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        _check_loss_type(loss_type)
        if desirable_weight <= 0 or undesirable_weight <= 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be > 0, got {desirable_weight} and {undesirable_weight}"
            )
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
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        # input tokens trained on, all ranks (checkpointed, as in SFTModule)
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.long))
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in _METRICS})
        self._step_sums: dict[str, torch.Tensor] = {}  # training metric sums of the current optimizer step
        self._step_sums_at = -1  # ... and the global step they belong to
        self._step_kl, self._step_kl_at = None, -1  # z_ref of the current optimizer step, and its global step

    def configure_callbacks(self):
        """A default `ReferenceModel` unless the Trainer has one, and a default `TrainingDiagnostics`
        unless the Trainer has one (or ``diagnostics=False``)."""
        given = [cb for cb in self.trainer.callbacks if isinstance(cb, ReferenceModel)]
        callbacks = [] if given else [ReferenceModel()]
        # training diagnostics, on by default: the user's TrainingDiagnostics callback, else one with defaults
        if self.diagnostics and not any(isinstance(c, TrainingDiagnostics) for c in self.trainer.callbacks):
            callbacks.append(TrainingDiagnostics())
        return callbacks

    def setup(self, stage: str) -> None:
        """Warn when the training rows and the weights fall outside the paper's eq. 8 range."""
        datamodule = self.trainer.datamodule
        if stage == "fit" and isinstance(datamodule, KTODataModule) and "train" in datamodule.examples:
            num_desirable = sum(example["label"] for example in datamodule.examples["train"])
            num_undesirable = len(datamodule.examples["train"]) - num_desirable
            _warn_if_unbalanced(num_desirable, num_undesirable, self.desirable_weight, self.undesirable_weight)

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard each decoder layer, then the root."""
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0):
        """(N, T or logits_to_keep, V) logits (for inference: training computes log-probs in chunks)."""
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, use_cache=False
        ).logits

    def training_step(self, batch, batch_idx):
        if "step_kl_rows" not in batch or self._step_kl_at != self.trainer.global_step:
            # z_ref of the whole optimizer step (every micro-batch, every rank), before its first
            # backward; without KTODataModule's step_kl_rows, of each micro-batch (as TRL)
            self._step_kl = self.estimate_kl(batch.get("step_kl_rows", [batch]))
            self._step_kl_at = self.trainer.global_step
        with_stats = self._metrics_read_this_step()  # the same for every micro-batch of an optimizer step
        loss, metrics = self._shared_step(batch, kl=self._step_kl, with_stats=with_stats)
        num_rows = batch["input_ids"].new_tensor(batch["input_ids"].shape[0])
        weights = _metric_weights(batch)
        num_items_in_batch = batch.get("num_items_in_batch")
        # one collective: the optimizer step's rows, tokens, weighted metric sums and their weights, all
        # ranks (a metric not computed this step counts 0 with weight 0: the collective's shape never varies)
        zero = num_rows.new_zeros(())
        metric_stats = {f"{name} sum": metrics[name] * weights[name] if name in metrics else zero for name in _METRICS}
        metric_stats.update({f"{name} weight": weights[name] if name in metrics else zero for name in _METRICS})
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
        names = _METRICS if with_stats else [n for n in _METRICS if n not in _STATS_METRICS]
        values = {name: step[f"{name} sum"] / step[f"{name} weight"].clamp(min=1) for name in names}
        values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "rewards/margins"))
        self.log("train/num_tokens", self.num_tokens.float())
        return loss

    def _metrics_read_this_step(self) -> bool:
        """Whether this optimizer step's training metrics reach a reader (departure 5): Lightning logs
        the step (every ``log_every_n_steps``, or ``fast_dev_run``), it is the run's last step
        (``max_steps``), or there is no logger (callbacks read ``trainer.callback_metrics`` after every
        batch). The same answer on every rank: nothing rank-local decides it."""
        trainer = self.trainer
        step = trainer.global_step + 1  # the optimizer step this micro-batch belongs to, counted from 1
        logged = trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0
        last = 0 < trainer.max_steps <= step
        return not trainer.loggers or logged or last or bool(trainer.fast_dev_run)

    def validation_step(self, batch, batch_idx):
        _, metrics = self._shared_step(batch, kl=self.estimate_kl([batch]))
        weights = _metric_weights(batch)
        for name in _METRICS:  # row-weighted (desirable / undesirable rows, tokens for entropy) over the set
            self.val_metrics[name].update(metrics[name], weight=weights[name])
            self.log(f"val/{name}", self.val_metrics[name], prog_bar=name == "loss")

    def on_validation_epoch_end(self) -> None:
        margins = self.val_metrics["rewards/chosen"].compute() - self.val_metrics["rewards/rejected"].compute()
        self.log("val/rewards/margins", margins, prog_bar=True)

    def _shared_step(self, batch, kl: torch.Tensor, with_stats: bool = True):
        logps, stats, mask = self.completion_logps(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"], with_stats=with_stats
        )  # (B,), TokenStats of (B, K-1) or None, (B, K-1)
        labels = batch["label"]  # (B,) True: desirable

        if "ref_logps" in batch:  # precomputed by the ReferenceModel callback
            ref_logps = batch["ref_logps"]
        else:
            with torch.no_grad():
                ref_logps, _, _ = self.completion_logps(
                    batch["input_ids"], batch["attention_mask"], batch["completion_mask"], reference=True
                )

        losses, rewards = kto_loss(
            logps,
            ref_logps,
            labels,
            kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
        )
        loss = losses.mean()

        with torch.no_grad():
            num_chosen, num_rejected = labels.sum().clamp(min=1), (~labels).sum().clamp(min=1)
            metrics = {
                "loss": loss.detach(),
                "kl": kl,
                "rewards/chosen": rewards[labels].sum() / num_chosen,
                "rewards/rejected": rewards[~labels].sum() / num_rejected,
                "logps/chosen": logps.detach()[labels].sum() / num_chosen,
                "logps/rejected": logps.detach()[~labels].sum() / num_rejected,
            }
            if with_stats:
                metrics["entropy"] = masked_sum(stats.entropy, mask) / mask.sum().clamp(min=1)
        return loss, metrics

    @torch.no_grad()
    def estimate_kl(self, kl_rows: list[dict]) -> torch.Tensor:
        """z_ref over the mismatched rows of ``kl_rows`` (a list of batches) on every rank (0-d, detached).

        The policy and the reference read each batch's ``kl_input_ids`` rows (the reference's
        log-probs come from ``ref_kl_logps`` when precomputed); one collective reduces the sums and
        the row count over ranks. ``apo_zero_unpaired`` has no reference point: 0.
        """
        if self.loss_type == "apo_zero_unpaired":
            return torch.zeros((), device=self.device)
        policy_sum, ref_sum, num_rows = torch.zeros(3, device=self.device)
        for rows in kl_rows:
            inputs = (rows["kl_input_ids"], rows["kl_attention_mask"], rows["kl_completion_mask"])
            policy_kl_logps, _, _ = self.completion_logps(*inputs)  # (B,)
            if "ref_kl_logps" in rows:  # precomputed by the ReferenceModel callback
                ref_kl_logps = rows["ref_kl_logps"]
            else:
                ref_kl_logps, _, _ = self.completion_logps(*inputs, reference=True)
            policy_sum, ref_sum = policy_sum + policy_kl_logps.sum(), ref_sum + ref_kl_logps.sum()
            num_rows = num_rows + policy_kl_logps.numel()
        stats = {"policy": policy_sum, "reference": ref_sum, "num_rows": num_rows}
        reduced = self.trainer.strategy.reduce(torch.stack([s.float() for s in stats.values()]), reduce_op="sum")
        sums = dict(zip(stats, reduced))  # name -> its sum over all ranks
        num_rows = sums["num_rows"].clamp(min=1)
        return kto_kl((sums["policy"] / num_rows)[None], (sums["reference"] / num_rows)[None])

    def completion_logps(
        self, input_ids, attention_mask, completion_mask, reference: bool = False, with_stats: bool = False
    ):
        """One forward of B rows (policy, or the reference model): their completions' log-probs.

        Only the positions from the one before the first completion token on are scored
        (``logits_to_keep``), from the final hidden states a chunk of positions at a time
        (`chunked_selective_log_softmax`): only the label tokens' log-probs are kept, and the
        (B, K-1, V) logits never exist at once.

        Returns:
            logps (B,): sums of completion-token log-probs; stats: `TokenStats` (entropy) of the
            (B, K-1) positions that predict tokens T-K+1 .. T-1 if ``with_stats`` (policy only), else
            None; mask (B, K-1): which of those tokens are completion tokens.
        """
        logits_to_keep = _logits_to_keep(completion_mask)  # K
        start = input_ids.shape[1] - (logits_to_keep - 1)  # T - (K-1)
        labels = input_ids[:, start:]  # (B, K-1): the token each scored position predicts
        mask = completion_mask[:, start:].bool()  # (B, K-1)
        if reference:
            reference_model = find_reference_model(self.trainer, self.METHOD)
            per_token_logps = reference_model.per_token_logps(
                input_ids, attention_mask, logits_to_keep=labels.shape[1]
            )  # (B, K-1)
            return masked_sum(per_token_logps, mask, dim=1), None, mask
        hidden_states = final_hidden_states(self.model, input_ids, attention_mask)
        hidden_states = hidden_states[:, start - 1 : -1]  # (B, K-1, H): position t predicts token t + 1
        per_token_logps, stats = chunked_selective_log_softmax(
            hidden_states, self.model.get_output_embeddings(), labels, with_stats=with_stats
        )  # (B, K-1), TokenStats of (B, K-1) or None
        return masked_sum(per_token_logps, mask, dim=1), stats, mask

    @torch.no_grad()
    def compute_ref_logps(self, batch) -> dict[str, torch.Tensor]:
        """Reference log-probs of each row's completion and of its mismatched completion, each (B,).

        Runs the `ReferenceModel` callback's frozen model; the callback calls this once per row when
        it precomputes them (the training and validation steps read the two separately: the
        mismatched rows of a whole optimizer step at once, in `estimate_kl`).
        """
        ref_logps, _, _ = self.completion_logps(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"], reference=True
        )
        columns = {"ref_logps": ref_logps}
        if self.loss_type == "kto":
            columns["ref_kl_logps"], _, _ = self.completion_logps(
                batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"], reference=True
            )
        return columns

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
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "entropy",
)
_STATS_METRICS = ("entropy",)  # from the chunks' statistics (departure 5)


def _metric_weights(batch) -> dict[str, torch.Tensor]:
    """What each metric is a mean over: all rows, the desirable or undesirable rows, or the completion tokens."""
    labels = batch["label"]
    num_rows = labels.new_tensor(labels.numel(), dtype=torch.long)
    num_chosen, num_rejected = labels.sum(), (~labels).sum()
    weights = {"loss": num_rows, "kl": num_rows, "entropy": batch["completion_mask"].sum()}
    weights["rewards/chosen"], weights["logps/chosen"] = num_chosen, num_chosen
    weights["rewards/rejected"], weights["logps/rejected"] = num_rejected, num_rejected
    return weights


def _logits_to_keep(completion_mask: torch.Tensor) -> int:
    """How many final positions' logits are needed: from the one before the first completion token."""
    has_completion = completion_mask.any(0)  # (T,)
    first = int(has_completion.int().argmax()) if bool(has_completion.any()) else completion_mask.shape[1] - 1
    return completion_mask.shape[1] - max(first, 1) + 1
