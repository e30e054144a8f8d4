"""Contrastive Preference Optimization (CPO), with SimPO and AlphaPO: preference pairs, no reference model.

Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
Machine Translation", https://arxiv.org/abs/2401.08417. CPO is DPO with a uniform reference
(``pi_ref`` dropped) plus a behaviour-cloning term on the preferred completion: for a prompt x, a
preferred completion y_w and a dispreferred y_l,

    L_prefer = -log sigmoid(beta * log pi(y_w|x) - beta * log pi(y_l|x))    (eq. 3)
    L_NLL = -log pi(y_w|x)
    loss = L_prefer + cpo_alpha * L_NLL, averaged over the pairs

where ``log pi(y|x)`` sums the completion's token log-probs. ``loss_type`` picks the preference
term (each branch of `cpo_loss` cites its paper); ``cpo_alpha`` weighs the NLL term for all of them:

- ``sigmoid`` (default): eq. 3 above; with ``label_smoothing`` the conservative form (cDPO).
- ``hinge``: ``relu(1 - beta * h)`` (SLiC, https://arxiv.org/abs/2305.10425), h the log-prob margin.
- ``ipo``: ``(h - 1 / (2 beta))^2`` (IPO, https://arxiv.org/abs/2310.12036, eq. 17) on average log-probs.
- ``simpo``: SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734): the reward is the average
  per-token log-prob ``beta / |y| * log pi(y|x)`` (eq. 4) and the margin must exceed ``gamma``:
  ``-log sigmoid(beta * h - simpo_gamma)`` (eq. 6). SimPO itself is ``simpo`` with ``cpo_alpha=0``;
  CPO-SimPO keeps ``cpo_alpha > 0``.
- ``alphapo``: AlphaPO (Gupta et al. 2025, https://arxiv.org/abs/2501.03884): SimPO's loss on the
  reward ``beta * (1 - p^(-alpha)) / alpha`` with ``p = exp(average log-prob)``, which tends to
  SimPO's ``beta * log p`` as alpha -> 0. The paper's AlphaPO is ``alphapo`` with ``cpo_alpha=0``.

The log-probs are SUMS over the completion tokens for ``sigmoid`` and ``hinge`` and AVERAGES per
token for ``ipo``, ``simpo`` and ``alphapo`` (as TRL's CPOTrainer); the module computes the one its
``loss_type`` needs, and logs it as ``logps/chosen|rejected``. ``alpha != 0`` applies AlphaPO's
reward shape to any loss type (as TRL); ``alpha = 0`` is the log reward. The logged rewards are
``beta * logps`` (``beta`` times the AlphaPO reward when ``alpha != 0``, the formula of TRL's
``CPOTrainer.cpo_loss``); ``rewards/accuracies`` is the fraction of pairs whose chosen reward is
strictly larger. There is no reference model, so no `ReferenceModel` callback is added or needed.

Departures from the papers / from TRL, numbered:
1. The NLL term is each pair's mean NLL per chosen completion token, averaged over the pairs like the
   preference term, so every pair weighs the same whatever its length; the CPO paper's L_NLL is
   the summed sequence log-prob, and TRL takes one token mean over the micro-batch's chosen
   completion tokens (long responses weigh more). Logged as ``nll_loss`` even when ``cpo_alpha=0``.
2. ``loss_type="alphapo"`` needs ``alpha != 0`` (ValueError otherwise; the AlphaPO paper tunes
   alpha per model and reports positive values working best; 0.25 is a reasonable start). TRL
   turns ``alphapo`` into ``simpo`` and sets ``cpo_alpha=0`` behind the user's back, leaving
   ``alpha=0`` (plain SimPO) unless it is set too; here ``loss_type`` only picks the preference
   term and ``cpo_alpha`` is what you set, as for ``simpo`` (set ``cpo_alpha: 0`` for the paper's
   AlphaPO, as the SimPO quickstart does for SimPO).
3. ``label_smoothing`` applies to ``sigmoid``, ``simpo`` and ``alphapo``; with ``hinge`` or ``ipo``
   it raises ValueError (TRL ignores it there).
4. The loss is a mean over the pairs of the whole optimizer step (all micro-batches and ranks, from
   the DataModule's ``num_items_in_batch``), and so are the logged training metrics, so gradient
   accumulation does not change it.
5. The losses and AlphaPO rewards are computed in float32 or wider. With ``alpha != 0`` and summed
   log-probs (``sigmoid``, ``hinge``) ``p^(-alpha) = exp(-alpha * logps)`` overflows float32 once
   ``-alpha * logps > 88``; prefer the averaged loss types with alpha.

Supports: plain or conversational ``prompt``/``chosen``/``rejected`` rows (chat template applied),
conversational ``chosen``/``rejected`` without ``prompt`` (the shared leading messages are the
prompt), prompt truncation (``max_prompt_length``, keeps the end) and sequence truncation
(``max_length``, keeps the start), LoRA, DDP and FSDP2 (``ModelParallelStrategy``), validation with
the same metrics: ``loss``, ``nll_loss``, ``rewards/chosen|rejected|accuracies|margins``,
``logps/chosen|rejected``, ``logits/chosen|rejected``, ``entropy``, ``num_tokens`` (train).
Assumes: a causal LM whose forward accepts ``logits_to_keep`` (transformers >= 4.50 models); a
tokenizer with an EOS token (appended to plain completions).

    lit-posttrain fit --config configs/quickstart/cpo.yaml
    lit-posttrain fit --config configs/quickstart/simpo.yaml
"""

from __future__ import annotations

import typing
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

LossType = Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"]
LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)
# the loss types whose log-probs are per-token averages (the others use sums over the completion)
AVERAGED_LOSS_TYPES: tuple[str, ...] = ("ipo", "simpo", "alphapo")


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForPreference:
    """Turn tokenized preference examples into one batch of 2B rows: chosen rows, then rejected rows.

    Each example has ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (lists of token ids, the
    completions ending with EOS / end-of-turn). Unlike DPO's copy there are no float columns to
    pass through: CPO has no reference log-probs to precompute.

    Truncation: the prompt keeps its last ``max_prompt_length`` tokens, then prompt + completion keeps
    its first ``max_length`` tokens. Row ``i`` is ``prompt_i + chosen_i`` and row ``B + i`` is
    ``prompt_i + rejected_i``, right-padded with ``pad_token_id`` to the longest of all 2B rows.

    Returns:
        ``input_ids`` (2B, T), ``attention_mask`` (2B, T) 1 on real tokens, ``completion_mask``
        (2B, T) 1 on completion tokens.

    >>> collator = DataCollatorForPreference(pad_token_id=0)
    >>> batch = collator([
    ...     {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
    ...     {"prompt_ids": [10], "chosen_ids": [11], "rejected_ids": [12, 13, 14]},
    ... ])
    >>> batch["input_ids"]  # chosen rows, then rejected rows
    tensor([[ 5,  6,  7,  8],
            [10, 11,  0,  0],
            [ 5,  6,  9,  0],
            [10, 12, 13, 14]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 1],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1]])
    >>> batch["completion_mask"]
    tensor([[0, 0, 1, 1],
            [0, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 1, 1, 1]])
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
        input_ids, completion_mask = [], []
        for key in ("chosen_ids", "rejected_ids"):
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
        return {
            "input_ids": pad(input_ids, self.pad_token_id),  # (2B, T)
            "attention_mask": pad([torch.ones_like(ids) for ids in input_ids], 0),  # (2B, T)
            "completion_mask": pad(completion_mask, 0),  # (2B, T)
        }


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
class CPODataModule(L.LightningDataModule):
    """Load, check, tokenize and batch preference data.

    Rows are ``prompt`` + ``chosen`` + ``rejected``, each a string ("plain") or a list of
    ``{"role", "content"}`` messages ("conversational": the chat template is applied; the
    completion is what the template renders after the prompt's generation prompt); or
    conversational ``chosen`` + ``rejected`` only, whose shared leading messages are the prompt.
    Plain completions get the EOS token appended. Every row is checked in `setup`, before training:
    a malformed row raises `DataFormatError` naming the source, row and column.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: preference pairs per micro-batch (the model sees 2 x batch_size sequences).
        max_length: tokens per sequence (prompt + completion); longer ones keep their start.
        max_prompt_length: prompt tokens; longer prompts keep their end. None: no limit.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the ``val_size`` split.
        dataset_split: split to read ``train_data`` from, for a hub dataset (e.g. ``train_prefs``).
        val_dataset_split: split to read ``val_data`` from (e.g. ``test_prefs``); default ``dataset_split``.
        dataset_config: hub dataset configuration name (e.g. ``"main"`` for ``openai/gsm8k``).
        columns: maps the column names CPO expects to the data's own, e.g.
            ``{prompt: question, chosen: good, rejected: bad}``; unmapped columns keep their names.
        trust_remote_code: let the tokenizer load code from its repository (off unless asked; the
            CLI sets it from the model's ``trust_remote_code``).
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
        self.collator = DataCollatorForPreference(self.tokenizer.pad_token_id, max_length, max_prompt_length)
        self.examples: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        if self.train_data is None:
            raise ValueError(
                "CPODataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
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
        if "prompt" in rows.column_names:
            check_rows(rows, required={"prompt": "text", "chosen": "text", "rejected": "text"}, source=source)
        else:  # implicit prompt: the shared leading messages of chosen and rejected
            check_rows(rows, required={"chosen": "messages", "rejected": "messages"}, source=source)

    def _tokenize(self, rows, source: str) -> list[dict]:
        """-> [{"prompt_ids", "chosen_ids", "rejected_ids"}] (untruncated; the collator truncates)."""
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        examples, no_completion = [], 0
        for i, row in enumerate(rows):
            if "prompt" in row:
                prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            else:
                prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
                if not prompt:
                    raise DataFormatError(
                        f"{source}: row {i}, column 'chosen': without a 'prompt' column, 'chosen' and 'rejected' "
                        "must share their leading (prompt) messages; these share none"
                    )
            conversational = [is_conversational(v) for v in (prompt, chosen, rejected)]
            if any(conversational) and not all(conversational):
                column = ("prompt", "chosen", "rejected")[conversational.index(not conversational[0])]
                raise DataFormatError(
                    f"{source}: row {i}, column '{column}': prompt, chosen and rejected must all be strings or all "
                    "be lists of messages; this row mixes both"
                )
            if conversational[0]:
                prompt_ids = tok.apply_chat_template(
                    prompt, tokenize=True, add_generation_prompt=True, return_dict=True
                )["input_ids"]
                completions = {}
                for column, completion in (("chosen", chosen), ("rejected", rejected)):
                    ids = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)[
                        "input_ids"
                    ]
                    if list(ids[: len(prompt_ids)]) != list(prompt_ids):
                        raise DataFormatError(
                            f"{source}: row {i}, column '{column}': the chat template renders prompt + {column} with "
                            "a different prefix than the prompt alone, so the completion mask would be misaligned"
                        )
                    completions[column] = list(ids[len(prompt_ids) :])
                example = {
                    "prompt_ids": list(prompt_ids),
                    "chosen_ids": completions["chosen"],
                    "rejected_ids": completions["rejected"],
                }
            else:
                example = {
                    "prompt_ids": tok(prompt, add_special_tokens=False)["input_ids"],
                    "chosen_ids": tok(chosen, add_special_tokens=False)["input_ids"] + [eos],
                    "rejected_ids": tok(rejected, add_special_tokens=False)["input_ids"] + [eos],
                }
            prompt_length = len(example["prompt_ids"])
            if self.max_prompt_length is not None:
                prompt_length = min(prompt_length, self.max_prompt_length)
            no_completion += self.max_length is not None and prompt_length >= self.max_length
            examples.append(example)
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
            count_items=_count_pairs,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            trainer=self.trainer,
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


def _count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0] // 2


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair CPO-family preference losses (the caller adds ``cpo_alpha`` times the NLL term).

    Args:
        chosen_logps, rejected_logps: (B,) policy log-probs of each completion: SUMS over its tokens
            for ``sigmoid`` / ``hinge``, per-token AVERAGES for ``ipo`` / ``simpo`` / ``alphapo``.
        beta: inverse temperature of the reward (``tau`` in IPO: the target margin is ``1 / (2 beta)``).
        loss_type: one of `LOSS_TYPES`.
        label_smoothing: probability that a label is flipped (``sigmoid``, ``simpo``, ``alphapo``).
        simpo_gamma: SimPO's target reward margin gamma (``simpo``, ``alphapo``).
        alpha: AlphaPO's reward shape; 0 is the log reward. Needed (non-zero) by ``alphapo``.
    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,), in float32 or wider; the rewards
        are ``beta * logps``, or ``beta * (1 - exp(logps)^(-alpha)) / alpha`` when ``alpha != 0``,
        detached. The loss to minimise is ``losses.mean()``.
    """
    _check_loss_type(loss_type, label_smoothing, alpha)
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    chosen_logps, rejected_logps = chosen_logps.to(dtype), rejected_logps.to(dtype)
    if alpha != 0.0:
        # AlphaPO's reward shape (1 - p^(-alpha)) / alpha, p = exp(logps), as TRL's CPOTrainer.cpo_loss;
        # -expm1(-alpha * logps) / alpha is the same, exact for small alpha * logps
        chosen_scores = -torch.expm1(-alpha * chosen_logps) / alpha
        rejected_scores = -torch.expm1(-alpha * rejected_logps) / alpha
    else:
        chosen_scores, rejected_scores = chosen_logps, rejected_logps
    logits = chosen_scores - rejected_scores  # (B,) h: the margin the losses act on, before beta
    eps = label_smoothing

    if loss_type == "sigmoid":
        # CPO eq. 3 (DPO eq. 7 with the reference dropped); with eps > 0 conservative (cDPO, Mitchell 2023)
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        # SLiC hinge (Zhao et al. 2023, https://arxiv.org/abs/2305.10425, eq. 1; RSO, arXiv 2309.06657)
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036) eq. 17, beta = tau; per-token log-probs
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type in ("simpo", "alphapo"):
        # SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734) eq. 6: -log sigmoid(beta h - gamma);
        # AlphaPO is the same loss on its reward shape (alpha != 0 above)
        logits = logits - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps

    chosen_rewards = beta * chosen_scores.detach()
    rejected_rewards = beta * rejected_scores.detach()
    return losses, chosen_rewards, rejected_rewards


def _check_loss_type(loss_type: str, label_smoothing: float, alpha: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    if loss_type == "alphapo" and alpha == 0.0:
        raise ValueError(
            "loss_type 'alphapo' needs alpha != 0, AlphaPO's reward shape: set a small positive value "
            "such as alpha: 0.25 (the AlphaPO paper reports positive alpha working best); alpha = 0 is "
            "SimPO's log reward, loss_type 'simpo'"
        )
    if label_smoothing != 0.0 and loss_type in ("hinge", "ipo"):
        raise ValueError(
            f"label_smoothing applies to loss_type 'sigmoid', 'simpo' and 'alphapo', not {loss_type!r}; "
            f"got label_smoothing={label_smoothing}"
        )


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class CPOModule(L.LightningModule):
    """Contrastive Preference Optimization of a causal LM (full or LoRA); SimPO and AlphaPO too.

    No reference model: the loss needs only the policy's own log-probs, so no `ReferenceModel`
    callback is added or needed. SimPO is ``loss_type="simpo", cpo_alpha=0``; AlphaPO is
    ``loss_type="alphapo", alpha=<non-zero>, cpo_alpha=0``.

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
        beta: inverse temperature of the reward (SimPO's paper uses 2 to 10 with its averaged log-probs).
        loss_type: one of `LOSS_TYPES`.
        label_smoothing: assumed label-flip probability (``sigmoid``, ``simpo``, ``alphapo``).
        cpo_alpha: weight of the NLL (behaviour cloning) term on the chosen completions; 0 for SimPO
            and AlphaPO.
        simpo_gamma: SimPO's target reward margin gamma (``simpo`` and ``alphapo``).
        alpha: AlphaPO's reward shape (any loss type; required non-zero by ``alphapo``).
        disable_dropout: set every dropout probability in the model to 0 (TRL's default).
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback (findings about the
            run's health, docs/diagnostics.md) unless the Trainer has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
    """

    METHOD = "CPO"
    PAPER = "https://arxiv.org/abs/2401.08417"

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
        loss_type: LossType = "sigmoid",
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
        disable_dropout: bool = True,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        _check_loss_type(loss_type, label_smoothing, alpha)
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
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.cpo_alpha, self.simpo_gamma, self.alpha = cpo_alpha, simpo_gamma, alpha
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        # input tokens trained on, all ranks (checkpointed, as in SFTModule)
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.long))
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in _METRICS})
        self._step_sums: dict[str, torch.Tensor] = {}  # training metric sums of the current optimizer step
        self._step_sums_at = -1  # ... and the global step they belong to

    def configure_callbacks(self):
        """A default `TrainingDiagnostics` unless the Trainer has one (or ``diagnostics=False``)."""
        callbacks = []
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
        loss, metrics = self._shared_step(batch)
        num_pairs = batch["input_ids"].new_tensor(batch["input_ids"].shape[0] // 2)
        weights = _metric_weights(batch)
        num_items_in_batch = batch.get("num_items_in_batch")
        # one collective: the optimizer step's pairs, tokens, weighted metric sums and their weights, all ranks
        metric_stats = {f"{name} sum": metrics[name] * weights[name] for name in _METRICS}
        metric_stats.update({f"{name} weight": weights[name] for name in _METRICS})
        stats = {
            "num_items_in_batch": num_items_in_batch if num_items_in_batch is not None else num_pairs,
            "num_tokens": batch["attention_mask"].sum(),
            **metric_stats,
        }
        reduced = self.trainer.strategy.reduce(torch.stack([s.float() for s in stats.values()]), reduce_op="sum")
        sums = dict(zip(stats, reduced))  # name -> its sum over all ranks
        if num_items_in_batch is not None:
            # the mean over the pairs of the whole optimizer step (all micro-batches and ranks), so
            # unequal micro-batches weigh by their pairs; Lightning divides the loss by the
            # accumulation steps and DDP averages over ranks, so undo both
            micro_batches = self.trainer.accumulate_grad_batches * self.trainer.world_size  # per step, all ranks
            loss = loss * num_pairs / (sums["num_items_in_batch"] / micro_batches)
        # the logged metrics are weighted over the optimizer step so far (all micro-batches and
        # ranks): at its last micro-batch, the one Lightning logs, they cover the whole step
        if self._step_sums_at != self.trainer.global_step:
            self._step_sums = {name: torch.zeros_like(sums[name]) for name in metric_stats}
            self._step_sums_at = self.trainer.global_step
        for name in self._step_sums:
            self._step_sums[name] += sums[name]
        step = self._step_sums
        self.num_tokens += sums["num_tokens"].long()
        for name in _METRICS:
            value = step[f"{name} sum"] / step[f"{name} weight"].clamp(min=1)
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "rewards/accuracies"))
        self.log("train/num_tokens", self.num_tokens.float())
        return loss

    def validation_step(self, batch, batch_idx):
        _, metrics = self._shared_step(batch)
        weights = _metric_weights(batch)
        for name in _METRICS:  # pair-weighted (token-weighted for logits, entropy) over the whole set
            self.val_metrics[name].update(metrics[name], weight=weights[name])
            self.log(f"val/{name}", self.val_metrics[name], prog_bar=name in ("loss", "rewards/accuracies"))

    def _shared_step(self, batch):
        logps, logits, mask = self.concatenated_forward(batch)  # (2B,), (2B, K-1, V), (2B, K-1)
        mean_logps = logps / mask.sum(1).clamp(min=1)  # (2B,) average per-token log-probs
        if self.loss_type in AVERAGED_LOSS_TYPES:  # IPO as TRL, SimPO eq. 4, AlphaPO: per-token averages
            logps = mean_logps
        chosen_logps, rejected_logps = logps.chunk(2)  # (B,) each

        losses, chosen_rewards, rejected_rewards = cpo_loss(
            chosen_logps,
            rejected_logps,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
            alpha=self.alpha,
        )
        nll_losses = -mean_logps.chunk(2)[0]  # (B,) each chosen completion's mean NLL per token
        loss = (losses + self.cpo_alpha * nll_losses).mean()  # L_prefer + cpo_alpha * L_NLL

        with torch.no_grad():
            logits = logits.detach()
            mean_logits = logits.mean(-1)  # (2B, K-1) mean over the vocabulary
            chosen_mask, rejected_mask = mask.chunk(2)
            metrics = {
                "loss": loss.detach(),
                "nll_loss": nll_losses.detach().mean(),
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen_logps.detach().mean(),
                "logps/rejected": rejected_logps.detach().mean(),
                "logits/chosen": masked_sum(mean_logits.chunk(2)[0], chosen_mask)
                / chosen_mask.sum().clamp(min=1),
                "logits/rejected": masked_sum(mean_logits.chunk(2)[1], rejected_mask)
                / rejected_mask.sum().clamp(min=1),
                "entropy": masked_sum(entropy_from_logits(logits), mask) / mask.sum().clamp(min=1),
            }
        return loss, metrics

    def concatenated_forward(self, batch):
        """One forward of the 2B chosen + rejected rows.

        Only the logits from the position before the first completion token on are computed
        (``logits_to_keep``), and only the label tokens' log-probs are gathered from them.

        Returns:
            logps (2B,): sums of completion-token log-probs (chosen rows, then rejected rows);
            logits (2B, K-1, V): the logits that predict tokens T-K+1 .. T-1; mask (2B, K-1): which
            of those tokens are completion tokens.
        """
        input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]  # (2B, T)
        logits_to_keep = _logits_to_keep(completion_mask)  # K
        logits = self.forward(input_ids, batch["attention_mask"], logits_to_keep=logits_to_keep)[
            :, :-1
        ]  # (2B, K-1, V)
        start = input_ids.shape[1] - logits.shape[1]  # T - (K-1)
        labels = input_ids[:, start:]  # (2B, K-1): the token each logit row predicts
        mask = completion_mask[:, start:].bool()  # (2B, K-1)
        per_token_logps = selective_log_softmax(logits, labels)  # (2B, K-1)
        return masked_sum(per_token_logps, mask, dim=1), logits, mask

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
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
)


def _metric_weights(batch) -> dict[str, torch.Tensor]:
    """What each metric is a mean over: the pairs, or the completion tokens for logits and entropy."""
    num_pairs = batch["input_ids"].new_tensor(batch["input_ids"].shape[0] // 2)
    num_chosen_tokens, num_rejected_tokens = batch["completion_mask"].sum(1).chunk(2)
    weights = {name: num_pairs for name in _METRICS}
    weights["logits/chosen"], weights["logits/rejected"] = num_chosen_tokens.sum(), num_rejected_tokens.sum()
    weights["entropy"] = weights["logits/chosen"] + weights["logits/rejected"]
    return weights


def _logits_to_keep(completion_mask: torch.Tensor) -> int:
    """How many final positions' logits are needed: from the one before the first completion token."""
    has_completion = completion_mask.any(0)  # (T,)
    first = int(has_completion.int().argmax()) if bool(has_completion.any()) else completion_mask.shape[1] - 1
    return completion_mask.shape[1] - max(first, 1) + 1
