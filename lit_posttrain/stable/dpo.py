"""Direct Preference Optimization (DPO): learn from preference pairs without a reward model.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model", https://arxiv.org/abs/2305.18290. For a prompt x, a preferred completion y_w and a
dispreferred y_l, with log-ratios against a frozen reference policy

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    loss = -log sigmoid(beta * h)                                           (eq. 7)

where log pi(y|x) sums the log-probs of the completion tokens. The implicit rewards are
``beta * (log pi(y|x) - log pi_ref(y|x))`` (eq. 5, without the partition function);
``rewards/accuracies`` is the fraction of pairs whose chosen reward is strictly larger (before
training every reward is 0 up to float rounding, so it starts near 0 but not exactly at 0).
`dpo_loss` also implements the family TRL's DPOTrainer offers under ``loss_type`` (each branch cites
its paper), and a list of loss types with ``loss_weights`` (RPO = sigmoid + sft, MPO = sigmoid +
bco_pair + sft).

Departures from the paper / from TRL, numbered:
1. ``sigmoid`` with ``label_smoothing > 0`` is conservative DPO (cDPO, Mitchell 2023), as in TRL
   0.x; recent TRL ignores ``label_smoothing`` for ``sigmoid``.
2. ``ipo`` and ``sigmoid_norm`` divide each log-ratio by its completion length (TRL's choice,
   confirmed with the IPO authors); the paper uses sequence sums.
3. ``bco_pair`` shifts the rewards by ``delta``, the running mean of the batch-mean rewards (TRL
   0.x's RunningMoments; recent TRL dropped it). The running mean is a registered buffer (checkpointed)
   updated in training steps only (TRL also updates it during evaluation).
4. The loss is a mean over the pairs of the whole optimizer step (all micro-batches and ranks, from
   the DataModule's ``num_items_in_batch``), and so are the logged training metrics. Exception: the
   ``sft`` term is the token-mean NLL of each micro-batch's chosen completions (as TRL), so it is
   not invariant to how a step is split into micro-batches.
5. The reference comes from the `ReferenceModel` callback (a frozen copy, the base model under LoRA,
   TR-DPO sync, or precomputed log-probs); ``reference_free=True`` uses ``log pi_ref = 0``.
6. ``train/logits/chosen``, ``train/logits/rejected`` and ``train/entropy`` are computed only on the
   optimizer steps whose metrics reach a reader: those Lightning logs (every
   ``trainer.log_every_n_steps``), the run's last step (``max_steps``), and every step when there is no
   logger. They cost extra passes over every chunk's logits (mean, entropy). Each logged value is
   that optimizer step's (TRL computes its metrics every step and logs the mean since its last log).
   Validation always computes them.

Supports: plain or conversational ``prompt``/``chosen``/``rejected`` rows (chat template applied),
conversational ``chosen``/``rejected`` without ``prompt`` (the shared leading messages are the
prompt), prompt truncation (``max_prompt_length``, keeps the end) and sequence truncation
(``max_length``, keeps the start), LoRA, DDP and FSDP2 (``ModelParallelStrategy``; the reference is
a full replica in every process), validation with the same metrics: ``loss``, ``rewards/chosen|rejected|accuracies|margins``, ``logps/chosen|rejected``,
``logits/chosen|rejected``, ``entropy``, ``num_tokens`` (train).
Assumes: a causal LM whose forward accepts ``logits_to_keep`` (transformers >= 4.50 models); a
tokenizer with an EOS token (appended to plain completions).

    lit-posttrain fit --config configs/quickstart/dpo.yaml
"""

from __future__ import annotations

import math
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

LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
]
LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForPreference:
    """Turn tokenized preference examples into one batch of 2B rows: chosen rows, then rejected rows.

    Each example has ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (lists of token ids, the
    completions ending with EOS / end-of-turn), and optionally float columns (``ref_chosen_logps``,
    ``ref_rejected_logps``, ... added by `ReferenceModel` precomputation), passed through as (B,)
    tensors.

    Truncation: the prompt keeps its last ``max_prompt_length`` tokens, then prompt + completion keeps
    its first ``max_length`` tokens. Row ``i`` is ``prompt_i + chosen_i`` and row ``B + i`` is
    ``prompt_i + rejected_i``, right-padded with ``pad_token_id`` to the longest of all 2B rows.

    Returns:
        ``input_ids`` (2B, T), ``attention_mask`` (2B, T) 1 on real tokens, ``completion_mask``
        (2B, T) 1 on completion tokens, plus the float columns (B,).

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
        batch = {
            "input_ids": pad(input_ids, self.pad_token_id),  # (2B, T)
            "attention_mask": pad([torch.ones_like(ids) for ids in input_ids], 0),  # (2B, T)
            "completion_mask": pad(completion_mask, 0),  # (2B, T)
        }
        for key in examples[0]:
            if key not in ("prompt_ids", "chosen_ids", "rejected_ids"):
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)  # (B,)
        return batch


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
class DPODataModule(L.LightningDataModule):
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
        columns: maps the column names DPO expects to the data's own, e.g.
            ``{prompt: question, chosen: good, rejected: bad}``; unmapped columns keep their names.
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
        self.collator = DataCollatorForPreference(self.tokenizer.pad_token_id, max_length, max_prompt_length)
        self.examples: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        if self.train_data is None:
            raise ValueError(
                "DPODataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
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
        examples, no_completion, same = [], 0, []
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
            kept = None if self.max_length is None else max(self.max_length - prompt_length, 0)
            if kept == 0:
                no_completion += 1
            elif example["chosen_ids"][:kept] == example["rejected_ids"][:kept]:
                same.append(i)
            examples.append(example)
        if no_completion:
            warnings.warn(
                f"{source}: {no_completion} row(s) have no completion token left after truncation to max_length="
                f"{self.max_length} (their prompts are that long); they add nothing to the loss. Raise max_length "
                "or set max_prompt_length below it."
            )
        if same:
            warnings.warn(
                f"{source}: {len(same)} row(s) have the same chosen and rejected tokens (first: row {same[0]}), "
                "after truncation to max_length; a pair with nothing to prefer adds nothing to the loss."
            )
        if examples and no_completion + len(same) == len(examples):
            raise DataFormatError(
                f"{source}: no row can train: {no_completion} have no completion token within max_length="
                f"{self.max_length} and {len(same)} have chosen identical to rejected"
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


def _count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0] // 2


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: LossType | list[LossType] = "sigmoid",
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses.

    Args:
        chosen_logps, rejected_logps: (B,) policy log-probs of each completion (sum over its tokens).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference (zeros: reference-free).
        beta: inverse temperature of the implicit reward (``tau`` in IPO / SPPO: the target margin is
            ``1 / (2 beta)``).
        loss_type: one of `LOSS_TYPES`, or a list of them combined with ``loss_weights``.
        loss_weights: one weight per loss type (default 1.0 each).
        label_smoothing: probability that a label is flipped (cDPO, robust, exo_pair, aot).
        chosen_num_tokens, rejected_num_tokens: (B,) completion lengths, needed by ``ipo``,
            ``sigmoid_norm`` and ``sft``.
        discopop_tau: temperature of the DiscoPOP mixing.
        bco_delta: reward shift for ``bco_pair`` (the running mean of rewards, kept by the caller).
    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); the rewards are
        ``beta * (logps - ref_logps)``, detached. The loss to minimise is ``losses.mean()``.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    _check_loss_types(loss_types, loss_weights, label_smoothing)
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    logits = chosen_logratios - rejected_logratios  # (B,) h in the DPO paper
    eps = label_smoothing

    losses = torch.zeros_like(logits)
    for name, weight in zip(loss_types, loss_weights):
        if name == "sigmoid":
            # DPO eq. 7; with eps > 0, conservative DPO (cDPO): labels flipped with probability eps
            per_pair = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
        elif name == "hinge":
            # SLiC hinge (Zhao et al. 2023, https://arxiv.org/abs/2305.10425, eq. 1; RSO, arXiv 2309.06657)
            per_pair = torch.relu(1 - beta * logits)
        elif name == "ipo":
            # IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036) eq. 17, beta = tau; per-token log-ratios
            chosen_per_token = chosen_logratios / _lengths(chosen_num_tokens, name)
            rejected_per_token = rejected_logratios / _lengths(rejected_num_tokens, name)
            h = chosen_per_token - rejected_per_token
            per_pair = (h - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            # EXO (Ji et al. 2024, https://arxiv.org/abs/2402.00856) eq. 16: KL(p_theta || p_eps) over the pair,
            # p_theta = softmax(beta * log-ratios), p_eps = (1 - eps, eps)
            q_chosen, q_rejected = torch.sigmoid(beta * logits), torch.sigmoid(-beta * logits)
            per_pair = q_chosen * (F.logsigmoid(beta * logits) - math.log1p(-eps)) + q_rejected * (
                F.logsigmoid(-beta * logits) - math.log(eps)
            )
        elif name == "nca_pair":
            # NCA (Chen et al. 2024, https://arxiv.org/abs/2402.05369), pairwise form of the NCA loss
            chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
            per_pair = (
                -F.logsigmoid(chosen_rewards)
                - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards)
            )
        elif name == "robust":
            # robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409): unbiased under flip rate eps
            biased = -F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps
            per_pair = biased / (1 - 2 * eps)
        elif name == "bco_pair":
            # BCO (Jung et al. 2024, https://arxiv.org/abs/2404.04656): binary classifier on rewards shifted by delta
            chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
            per_pair = -F.logsigmoid(chosen_rewards - bco_delta) - F.logsigmoid(bco_delta - rejected_rewards)
        elif name == "sppo_hard":
            # SPPO (Wu et al. 2024, https://arxiv.org/abs/2405.00675) eq. 4.7 with hard P = 1 / 0 for winner / loser
            per_pair = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif name == "aot":
            # AOT (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882), paired: sorted policy vs sorted reference margins
            h = (
                torch.sort(chosen_logps - rejected_logps, dim=0).values
                - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
            )
            per_pair = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
        elif name == "aot_unpaired":
            # AOT, unpaired: sorted chosen log-ratios vs sorted rejected log-ratios
            h = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
            per_pair = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
        elif name == "apo_zero":
            # APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266) eq. 7: chosen up, rejected down
            per_pair = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
        elif name == "apo_down":
            # APO-down, eq. 8: chosen down, rejected down more
            per_pair = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * logits))
        elif name == "discopop":
            # DiscoPOP (Lu et al. 2024, https://arxiv.org/abs/2406.08414) eq. 5: logistic/exponential blend;
            # non-convex: within ~2 tau of h = 0 its gradient points towards smaller h
            mix = torch.sigmoid(beta * logits / discopop_tau)
            per_pair = -F.logsigmoid(beta * logits) * (1 - mix) + torch.exp(-beta * logits) * mix
        elif name == "sigmoid_norm":
            # DPO eq. 7 on per-token log-ratios (the length normalisation of SimPO, arXiv 2405.14734 eq. 4)
            chosen_per_token = chosen_logratios / _lengths(chosen_num_tokens, name)
            rejected_per_token = rejected_logratios / _lengths(rejected_num_tokens, name)
            h = chosen_per_token - rejected_per_token
            per_pair = -F.logsigmoid(beta * h)
        elif name == "sft":
            # NLL of the chosen completions, token mean over the batch (RPO, Pang et al. 2024,
            # https://arxiv.org/abs/2404.19733; MPO's generation loss, arXiv 2411.10442)
            nll = -chosen_logps.sum() / _lengths(chosen_num_tokens, name).sum()
            per_pair = nll.expand_as(logits)
        losses = losses + weight * per_pair

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def _check_loss_types(loss_types: list[str], loss_weights: list[float], label_smoothing: float) -> None:
    unknown = [name for name in loss_types if name not in LOSS_TYPES]
    if unknown or not loss_types:
        raise ValueError(
            f"loss_type must be one of {list(LOSS_TYPES)} (or a list of them), got {unknown or loss_types}"
        )
    if len(loss_weights) != len(loss_types):
        raise ValueError(f"loss_weights needs one weight per loss type: {len(loss_weights)} for {loss_types}")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"loss_type 'exo_pair' needs 0 < label_smoothing < 1 (EXO suggests 1e-3), got {label_smoothing}"
        )
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type 'robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")


def _lengths(num_tokens: torch.Tensor | None, loss_type: str) -> torch.Tensor:
    if num_tokens is None:
        raise ValueError(f"loss_type {loss_type!r} needs chosen_num_tokens and rejected_num_tokens")
    return num_tokens.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class DPOModule(L.LightningModule):
    """Direct Preference Optimization of a causal LM (full or LoRA).

    The reference model comes from a `ReferenceModel` callback. If the Trainer has none,
    ``configure_callbacks`` adds a default ``ReferenceModel()`` (a frozen copy of the initial
    policy; with LoRA the base model with adapters disabled). Pass your own to the Trainer for TR-DPO
    sync or precomputed reference log-probs; with ``reference_free=True`` there is none.

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
        loss_type: one of `LOSS_TYPES` or a list of them (e.g. ``[sigmoid, sft]`` for RPO).
        loss_weights: one weight per loss type (default 1.0 each).
        label_smoothing: assumed label-flip probability (cDPO / robust / exo_pair / aot).
        discopop_tau: temperature of the DiscoPOP loss.
        reference_free: use ``log pi_ref = 0`` (no reference model).
        disable_dropout: set every dropout probability in the model to 0 (TRL's default), so the
            policy and the reference see the same network at the start.
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback (findings about the
            run's health, docs/diagnostics.md) unless the Trainer has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
    """

    METHOD = "DPO"
    PAPER = "https://arxiv.org/abs/2305.18290"

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
        loss_type: LossType | list[LossType] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        reference_free: bool = False,
        disable_dropout: bool = True,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.loss_weights = [1.0] * len(self.loss_types) if loss_weights is None else list(loss_weights)
        _check_loss_types(self.loss_types, self.loss_weights, label_smoothing)
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
        self.beta, self.label_smoothing, self.discopop_tau = beta, label_smoothing, discopop_tau
        self.reference_free = reference_free
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        # bco_pair's running mean of the batch-mean reward (TRL's RunningMoments), checkpointed
        self.register_buffer("bco_rewards_mean", torch.zeros(()))
        self.register_buffer("bco_num_updates", torch.zeros((), dtype=torch.long))
        # input tokens trained on, all ranks (checkpointed, as in SFTModule)
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.long))
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in _METRICS})
        self._step_sums: dict[str, torch.Tensor] = {}  # training metric sums of the current optimizer step
        self._step_sums_at = -1  # ... and the global step they belong to

    def configure_callbacks(self):
        """A default `ReferenceModel` unless the Trainer has one (or ``reference_free``), and a default
        `TrainingDiagnostics` unless the Trainer has one (or ``diagnostics=False``)."""
        given = [cb for cb in self.trainer.callbacks if isinstance(cb, ReferenceModel)]
        if self.reference_free and given:
            raise ValueError(
                "reference_free=True but the Trainer has a ReferenceModel callback; remove one of them"
            )
        callbacks = [] if self.reference_free or given else [ReferenceModel()]
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
        """(N, T or logits_to_keep, V) logits (for inference: training computes log-probs in chunks)."""
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, use_cache=False
        ).logits

    def training_step(self, batch, batch_idx):
        with_stats = self._metrics_read_this_step()  # the same for every micro-batch of an optimizer step
        loss, metrics = self._shared_step(batch, update_running_stats=True, with_stats=with_stats)
        num_pairs = batch["input_ids"].new_tensor(batch["input_ids"].shape[0] // 2)
        weights = _metric_weights(batch)
        num_items_in_batch = batch.get("num_items_in_batch")
        # one collective: the optimizer step's pairs, tokens, weighted metric sums and their weights, all
        # ranks (a metric not computed this step counts 0 with weight 0: the collective's shape never varies)
        zero = num_pairs.new_zeros(())
        metric_stats = {f"{name} sum": metrics[name] * weights[name] if name in metrics else zero for name in _METRICS}
        metric_stats.update({f"{name} weight": weights[name] if name in metrics else zero for name in _METRICS})
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
        for name in _METRICS if with_stats else [n for n in _METRICS if n not in _STATS_METRICS]:
            value = step[f"{name} sum"] / step[f"{name} weight"].clamp(min=1)
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "rewards/accuracies"))
        self.log("train/num_tokens", self.num_tokens.float())
        return loss

    def _metrics_read_this_step(self) -> bool:
        """Whether this optimizer step's training metrics reach a reader (departure 6): Lightning logs
        the step (every ``log_every_n_steps``, or ``fast_dev_run``), it is the run's last step
        (``max_steps``), or there is no logger (callbacks read ``trainer.callback_metrics`` after every
        batch). The same answer on every rank: nothing rank-local decides it."""
        trainer = self.trainer
        step = trainer.global_step + 1  # the optimizer step this micro-batch belongs to, counted from 1
        logged = trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0
        last = 0 < trainer.max_steps <= step
        return not trainer.loggers or logged or last or bool(trainer.fast_dev_run)

    def validation_step(self, batch, batch_idx):
        _, metrics = self._shared_step(batch, update_running_stats=False)
        weights = _metric_weights(batch)
        for name in _METRICS:  # pair-weighted (token-weighted for logits, entropy) over the whole set
            self.val_metrics[name].update(metrics[name], weight=weights[name])
            self.log(f"val/{name}", self.val_metrics[name], prog_bar=name in ("loss", "rewards/accuracies"))

    def _shared_step(self, batch, update_running_stats: bool, with_stats: bool = True):
        # (2B,), TokenStats of (2B, K-1) or None, (2B, K-1)
        logps, stats, mask = self.concatenated_forward(batch, with_stats=with_stats)
        chosen_logps, rejected_logps = logps.chunk(2)  # (B,) each
        chosen_num_tokens, rejected_num_tokens = mask.sum(1).chunk(2)

        if "ref_chosen_logps" in batch:  # precomputed by the ReferenceModel callback
            ref_chosen_logps, ref_rejected_logps = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif self.reference_free:
            ref_chosen_logps, ref_rejected_logps = (
                torch.zeros_like(chosen_logps),
                torch.zeros_like(rejected_logps),
            )
        else:
            ref = self.compute_ref_logps(batch)
            ref_chosen_logps, ref_rejected_logps = ref["ref_chosen_logps"], ref["ref_rejected_logps"]

        if "bco_pair" in self.loss_types and update_running_stats:
            rewards = (
                self.beta
                * torch.cat([chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps]).detach()
            )
            batch_mean = self.trainer.strategy.reduce(rewards.mean(), reduce_op="mean")
            self.bco_num_updates += 1
            self.bco_rewards_mean += (batch_mean - self.bco_rewards_mean) / self.bco_num_updates

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=self.beta,
            loss_type=self.loss_types,
            loss_weights=self.loss_weights,
            label_smoothing=self.label_smoothing,
            chosen_num_tokens=chosen_num_tokens,
            rejected_num_tokens=rejected_num_tokens,
            discopop_tau=self.discopop_tau,
            bco_delta=self.bco_rewards_mean,
        )
        loss = losses.mean()

        with torch.no_grad():
            metrics = {
                "loss": loss.detach(),
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen_logps.detach().mean(),
                "logps/rejected": rejected_logps.detach().mean(),
            }
            if stats is not None:  # _STATS_METRICS
                chosen_mean_logits, rejected_mean_logits = stats.mean_logit.chunk(2)  # (B, K-1) each
                chosen_mask, rejected_mask = mask.chunk(2)
                metrics.update({
                    "logits/chosen": masked_sum(chosen_mean_logits, chosen_mask) / chosen_mask.sum().clamp(min=1),
                    "logits/rejected": masked_sum(rejected_mean_logits, rejected_mask)
                    / rejected_mask.sum().clamp(min=1),
                    "entropy": masked_sum(stats.entropy, mask) / mask.sum().clamp(min=1),
                })  # fmt: skip
        return loss, metrics

    def concatenated_forward(self, batch, reference: bool = False, with_stats: bool = True):
        """One forward of the 2B chosen + rejected rows (policy, or the reference model).

        Only the positions from the one before the first completion token on are scored
        (``logits_to_keep``), from the final hidden states a chunk of positions at a time
        (`chunked_selective_log_softmax`): only the label tokens' log-probs are kept, and the
        (2B, K-1, V) logits never exist at once.

        Returns:
            logps (2B,): sums of completion-token log-probs (chosen rows, then rejected rows);
            stats: `TokenStats` (entropy, mean logit) of the (2B, K-1) positions that predict tokens
            T-K+1 .. T-1 (None for the reference or without ``with_stats``); mask (2B, K-1): which of
            those tokens are completion tokens.
        """
        input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]  # (2B, T)
        logits_to_keep = _logits_to_keep(completion_mask)  # K
        start = input_ids.shape[1] - (logits_to_keep - 1)  # T - (K-1)
        labels = input_ids[:, start:]  # (2B, K-1): the token each scored position predicts
        mask = completion_mask[:, start:].bool()  # (2B, K-1)
        if reference:
            reference_model = find_reference_model(self.trainer, self.METHOD)
            per_token_logps = reference_model.per_token_logps(
                input_ids, batch["attention_mask"], logits_to_keep=labels.shape[1]
            )  # (2B, K-1)
            return masked_sum(per_token_logps, mask, dim=1), None, mask
        hidden_states = final_hidden_states(self.model, input_ids, batch["attention_mask"])
        hidden_states = hidden_states[:, start - 1 : -1]  # (2B, K-1, H): position t predicts token t + 1
        per_token_logps, stats = chunked_selective_log_softmax(
            hidden_states, self.model.get_output_embeddings(), labels, with_stats=with_stats
        )  # (2B, K-1), TokenStats of (2B, K-1) or None
        return masked_sum(per_token_logps, mask, dim=1), stats, mask

    @torch.no_grad()
    def compute_ref_logps(self, batch) -> dict[str, torch.Tensor]:
        """Reference log-probs of the chosen and rejected completions, each (B,).

        Runs the `ReferenceModel` callback's frozen model; the callback also calls this once per
        row when it precomputes them.
        """
        ref_logps, _, _ = self.concatenated_forward(batch, reference=True)
        ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)
        return {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}

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
_STATS_METRICS = ("logits/chosen", "logits/rejected", "entropy")  # from the chunks' statistics (departure 6)


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
