"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).

For each prompt q the policy samples G completions o_1..o_G; reward functions score them, and the
KL to a reference policy is folded into each completion's reward (paper §3, eq. 1 with k1 summed
over the completion):

    R_i = r_i - beta * sum_t (log pi_old(o_i,t | q, o_i,<t) - log pi_ref(o_i,t | q, o_i,<t))

Every completion's baseline is the mean reward of the other G - 1 completions of its prompt
(leave-one-out, paper §3.3, eq. 4):

    A_i = R_i - 1/(G-1) sum_{j != i} R_j

and the policy maximises a clipped surrogate with one importance ratio per completion (TRL's RLOO):

    ratio_i = pi_theta(o_i | q) / pi_old(o_i | q) = exp(sum_t log-ratio_i,t)
    L_i     = -min(ratio_i A_i, clip(ratio_i, 1 - epsilon, 1 + epsilon_high) A_i)

averaged over completions (`rloo_loss`). With ``num_iterations=1`` and one optimizer step per
generation batch the ratio is 1 and this is the paper's REINFORCE estimator.

Numbered departures from the paper (TRL's defaults and conventions unless said otherwise):
1. The paper's plain REINFORCE step is generalised to PPO-style clipped updates so that
   ``num_iterations > 1`` / ``steps_per_generation > 1`` reuse samples safely (TRL).
2. Rewards are the weighted sum over reward functions with ``None`` skipped (``nansum``). A sample
   where no function applies is unscorable: it is left out of the other samples' baselines and
   gets advantage 0.
3. Log-probs are computed from logits divided by ``temperature``, so the ratio and the KL compare
   the distribution that was sampled from.
4. Groups never span ranks: each rank samples its own prompts' G completions, so baselines need
   no communication.
5. Validation samples one greedy completion per prompt by default and logs its reward (``val/reward``);
   ``val_do_sample=True`` samples as TRL's evaluation does, from a generator reseeded at every validation.
6. ``train/entropy`` is computed only on the generation batches whose metrics reach a reader: those
   Lightning logs (every ``trainer.log_every_n_steps`` batches), the one that holds the run's last
   optimizer step (``max_steps``), and every batch when there is no logger; it costs extra passes over
   every chunk's logits. Each logged value is that batch's (TRL logs the mean since its last log).

Training loop (manual optimization; one ``training_step`` = one generation batch):

    batch = data.batch_size prompts                             # from RLOODataModule
    rollout = self.rollout.generate(self.model, prompt_ids, num_generations=G, ...)   # B*G completions
    rewards; old and reference log-probs (no grad); rewards - beta * KL -> leave-one-out advantages
    for iteration in range(num_iterations):
        for mini-batch in B*G completions split into steps_per_generation parts (shuffled if > 1):
            for micro-batch of micro_batch_size completions:  # gradient accumulation
                manual_backward(rloo_loss(...))
            clip to max_grad_norm; optimizer.step(); lr_scheduler.step()

So ``trainer.max_steps`` counts optimizer steps (``num_iterations * steps_per_generation`` per
generation batch) and the logged ``step`` counts generation batches. Lightning's
``accumulate_grad_batches`` and ``gradient_clip_val`` do not apply to manual optimization: use
``micro_batch_size`` and ``max_grad_norm`` (setting them raises a ValueError that says so).
With ``num_iterations=1`` and ``steps_per_generation=1`` the ratio uses the detached current
log-probs (exactly 1), and so does the sampler correction below when ``beta=0``; the old log-probs
are computed once after generation when the KL or a later step needs them.

Rollout engine contract (`lit_posttrain.rollout`): ``self.rollout`` is `HFRollout` by default. An
engine that replaces it (the vLLM callback) is called once at the start of every
``training_step`` and must sample from the current policy weights, i.e. those after the previous
``training_step``'s last optimizer step (`VLLMRollout` syncs lazily inside ``generate`` when the
policy version changed); validation calls it with ``num_generations=1, do_sample=False``.

Rollout/trainer mismatch: an engine that reports its sampled tokens' log-probs
(``RolloutOutput.logps``, `VLLMRollout`) samples from slightly different numbers than the
trainer computes. With ``vllm_importance_sampling_correction`` (on by default, a no-op with the HF
engine, which reports none) the policy-gradient term is weighted by the truncated importance
ratio pi_old / pi_sampler (`vllm_importance_sampling_ratio`; TRL's option names); logged as
``sampling/logp_diff/mean|max`` and ``sampling/importance_ratio/min|mean|max``.

Supports: plain and conversational prompts (chat template with ``add_generation_prompt``), extra
dataset columns passed to reward functions, several weighted reward functions (callables or a
`lit_posttrain.rewards.model.RewardModelScorer`), LoRA (the reference is the base model with the
adapters disabled), ``mask_truncated_completions``, DDP and FSDP2.
Assumes: a tokenizer with a pad token. Reward functions are called with keywords as TRL calls them
(``prompts=, completions=, completion_ids=, trainer_state=`` and every dataset column, see
`lit_posttrain.rewards.score_completions`); `check_reward_funcs` checks their signatures in
``__init__`` (before the model loads) and again in ``setup`` against the DataModule's columns.

    lit-posttrain fit --config configs/quickstart/rloo.yaml
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import fully_shard
from torchmetrics import MeanMetric, SumMetric
from transformers import PreTrainedTokenizerBase

from lit_posttrain.callbacks.diagnostics import TrainingDiagnostics
from lit_posttrain.callbacks.reference_model import ReferenceModel, find_reference_model
from lit_posttrain.data import (
    DatasetSource,
    LookaheadLoader,
    check_rows,
    describe_source,
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
from lit_posttrain.ops import chunked_selective_log_softmax, finite_grad_norm, masked_mean, pad
from lit_posttrain.rewards import TrainerState, check_reward_funcs, reward_func_name, score_completions
from lit_posttrain.rollout import HFRollout, RolloutOutput, ToolRollout, sampling_rng
from lit_posttrain.schedulers import WarmupDecayLR


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForPrompts:
    """Batch tokenized prompts without padding: the rollout engine pads them itself.

    Each example has ``prompt_ids`` (list[int]), ``prompt`` (the prompt as in the dataset, a string
    or messages) and any other dataset columns. The batch is ``{"prompt_ids": list[list[int]],
    "prompt": list, "columns": {column: list}}``.

    >>> collator = DataCollatorForPrompts()
    >>> batch = collator([
    ...     {"prompt_ids": [5, 6, 7], "prompt": "2+2=", "answer": "4"},
    ...     {"prompt_ids": [8], "prompt": "3+3=", "answer": "6"},
    ... ])
    >>> batch["prompt_ids"]  # unpadded
    [[5, 6, 7], [8]]
    >>> batch["prompt"]
    ['2+2=', '3+3=']
    >>> batch["columns"]  # every other column, for the reward functions
    {'answer': ['4', '6']}
    """

    def __call__(self, examples: list[dict]) -> dict:
        return {
            "prompt_ids": [example["prompt_ids"] for example in examples],
            "prompt": [example["prompt"] for example in examples],
            "columns": {
                column: [example[column] for example in examples]
                for column in examples[0]
                if column not in ("prompt_ids", "prompt")
            },
        }


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
class RLOODataModule(L.LightningDataModule):
    """Load, check and tokenize prompt-only data; batch ``batch_size`` prompts per generation batch.

    Rows need a ``prompt`` (a string, or a list of messages rendered with the chat template and
    ``add_generation_prompt=True``); every other column (``answer``, ``solution``, ...) is passed to
    the reward functions as a keyword list.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: prompts per generation batch (each is sampled ``num_generations`` times, so a
            training step works on ``batch_size * num_generations`` completions). The last
            incomplete batch of an epoch is dropped.
        max_prompt_length: prompt tokens kept (TRL's name); longer prompts keep their end. None: all.
        dataset_split: split to read from a hub dataset.
        val_dataset_split: split to read ``val_data`` from (e.g. ``test``); default ``dataset_split``.
        dataset_config: hub dataset configuration name (e.g. ``"main"`` for ``openai/gsm8k``).
        columns: maps the expected column names to the data's (``{prompt: question}``: the data's
            ``question`` column is the prompt).
        system_prompt: when set, each prompt becomes a conversation that starts with this system
            message (a plain prompt becomes the user message).
        max_length: deprecated alias of ``max_prompt_length`` (removed in 0.3). ``max_length: null``
            now means "not given": keep whole prompts with ``max_prompt_length: null``.
        prompt_column: deprecated (removed in 0.3): ``columns: {prompt: <prompt_column>}``.
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
        max_prompt_length: int | None = 512,
        num_workers: int = 0,
        seed: int = 0,
        dataset_split: str = "train",
        val_dataset_split: str | None = None,
        dataset_config: str | None = None,
        columns: dict[str, str] | None = None,
        system_prompt: str | None = None,
        max_length: int | None = None,
        prompt_column: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"] if not isinstance(tokenizer, str) else None)
        if max_length is not None:  # deprecated: here it counted prompt tokens, elsewhere whole sequences
            if max_prompt_length != 512:
                raise ValueError(
                    f"RLOODataModule: give max_prompt_length ({max_prompt_length}) or its deprecated alias "
                    f"max_length ({max_length}), not both"
                )
            warnings.warn(
                "RLOODataModule: max_length is deprecated and will be removed in 0.3: use "
                "max_prompt_length (the prompt tokens kept; max_length means the whole sequence in SFT, "
                "DPO and reward modeling)",
                FutureWarning,
                stacklevel=2,
            )
            max_prompt_length = max_length
        if prompt_column is not None:  # deprecated in 0.2 for the columns mapping every DataModule takes
            if columns is not None and "prompt" in columns:
                raise ValueError(
                    f"RLOODataModule: give columns ({columns}) or the deprecated prompt_column "
                    f"({prompt_column!r}), not both"
                )
            warnings.warn(
                "RLOODataModule: prompt_column is deprecated and will be removed in 0.3: use "
                f"columns: {{prompt: {prompt_column}}}",
                FutureWarning,
                stacklevel=2,
            )
            columns = {**(columns or {}), "prompt": prompt_column}
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.train_data, self.val_data, self.val_size = train_data, val_data, val_size
        self.batch_size, self.max_prompt_length = batch_size, max_prompt_length
        self.num_workers, self.seed = num_workers, seed
        self.dataset_split, self.val_dataset_split = dataset_split, val_dataset_split or dataset_split
        self.dataset_config, self.columns, self.system_prompt = dataset_config, columns, system_prompt
        self.collator = DataCollatorForPrompts()
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        if self.train_data is None:
            raise ValueError(
                "RLOODataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
            )
        train = self._load(self.train_data, self.dataset_split)
        val = None
        if self.val_data is not None:
            val = self._load(self.val_data, self.val_dataset_split)
        elif self.val_size:
            train, val = split_rows(train, self.val_size, seed=self.seed)
        self.train_examples = tokenize_cached(self, self._tokenize, train)
        self.val_examples = tokenize_cached(self, self._tokenize, val) if val is not None else None

    def _load(self, data: DatasetSource, split: str):
        """Rows of ``data`` (its ``split``), renamed as ``columns`` says; each checked to have a prompt."""
        rows = load_rows(data, split=split, name=self.dataset_config, columns=self.columns)
        check_rows(rows, required={"prompt": "text"}, source=describe_source(data))
        return rows

    def _tokenize(self, rows) -> list[dict]:
        """-> [{"prompt_ids", "prompt", **other columns}]; a prompt keeps its last ``max_prompt_length``."""
        tok = self.tokenizer
        examples = []
        for row in rows:
            prompt = row["prompt"]
            if self.system_prompt is not None:
                messages = prompt if is_conversational(prompt) else [{"role": "user", "content": prompt}]
                if messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": self.system_prompt}] + messages
                prompt = messages
            if is_conversational(prompt):
                text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            if self.max_prompt_length is not None:
                prompt_ids = prompt_ids[-self.max_prompt_length :]
            examples.append({**row, "prompt": prompt, "prompt_ids": prompt_ids})
        return examples

    def train_dataloader(self):
        # LookaheadLoader, not a DataLoader: it is stateful, so a run resumed mid-epoch skips the
        # prompts already used (Lightning restarts a plain DataLoader's epoch from the beginning)
        return LookaheadLoader(
            self.train_examples,
            batch_size=self.batch_size,
            collate_fn=self.collator,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
            num_workers=self.num_workers,
            trainer=self.trainer,
        )

    def val_dataloader(self):
        if self.val_examples is None:
            return []
        return torch.utils.data.DataLoader(
            self.val_examples,
            batch_size=self.batch_size,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )


# ---------------------------------------------------------------------------------------------
# Advantages and loss
# ---------------------------------------------------------------------------------------------
def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Leave-one-out advantages (RLOO, arXiv 2402.14740 eq. 4).

    ``A_i = r_i - mean_{j != i} r_j``, i.e. ``G / (G - 1) * (r_i - mean(group))``.

    Args:
        rewards: (N,) rewards grouped by prompt (rows ``i*G .. i*G+G-1`` share a prompt), NaN where
            no reward function applies.
        num_generations: G, the group size.
    Returns:
        (N,) advantages; 0 for NaN rewards, which are also left out of the other samples'
        baselines, and 0 for a sample with no scorable neighbour.
    """
    if rewards.numel() % num_generations:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}"
        )
    grouped = rewards.view(-1, num_generations)  # (B, G)
    scorable = ~grouped.isnan()
    # RLOO: baseline = mean of the other scorable rewards of the group
    others_sum = grouped.nansum(dim=1, keepdim=True) - grouped.nan_to_num(nan=0.0)  # (B, G)
    others_count = scorable.sum(dim=1, keepdim=True) - scorable.long()  # (B, G)
    advantages = grouped - others_sum / others_count
    return advantages.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).view(-1)  # unscorable / alone -> 0


def _nanstd(values: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN with fewer than two values)."""
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    deviations = (values - values.nanmean(dim=dim, keepdim=True)).nan_to_num(nan=0.0)
    variance = (deviations**2).sum(dim=dim, keepdim=True) / (count - 1)
    variance = variance.where(count > 1, torch.full_like(variance, float("nan")))
    return variance.sqrt() if keepdim else variance.sqrt().squeeze(dim)


def rloo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate with one importance ratio per completion, averaged over completions.

    RLOO: no ``loss_type``, no KL term (the KL is part of the reward), sequence-level ratios
    ``exp(sum_t (log pi_theta - log pi_old))`` (TRL's RLOO).

    Args:
        per_token_logps: (B, T) log-probs of the completion tokens under the policy being trained.
        old_per_token_logps: (B, T) the same under the policy that sampled them (detached).
        advantages: (B,) one advantage per completion.
        completion_mask: (B, T) 1 on completion tokens that take the loss.
        epsilon / epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]``; ``epsilon_high``
            defaults to ``epsilon``.
        importance_sampling_ratio: (B,) or (B, 1) rollout-correction weights, one per completion
            (`vllm_importance_sampling_ratio` with ``level="sequence"``).
    Returns:
        ``(loss, metrics)``: metrics ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` (fractions of completions), detached.
    """
    epsilon_low, epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(per_token_logps.dtype)
    log_ratio = per_token_logps - old_per_token_logps  # (B, T)
    # RLOO: one ratio per completion, of the whole sequence's probabilities (sum, not GSPO's mean)
    log_importance_weights = (log_ratio * mask).sum(-1)  # (B,)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)  # (B,)
    if importance_sampling_ratio is not None:  # the samples came from the engine, not pi_old
        per_sequence_loss = per_sequence_loss * importance_sampling_ratio.view(-1)
    loss = per_sequence_loss.mean()  # a completion without loss tokens has ratio 1 and no gradient

    with torch.no_grad():
        is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        metrics = {
            "clip_ratio/low_mean": is_low_clipped.float().mean(),
            "clip_ratio/high_mean": is_high_clipped.float().mean(),
            "clip_ratio/region_mean": (is_low_clipped | is_high_clipped).float().mean(),
        }
    return loss, metrics


def vllm_importance_sampling_ratio(
    old_per_token_logps: torch.Tensor,
    sampler_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    level: Literal["sequence"] = "sequence",
    mode: Literal["truncate", "mask"] = "truncate",
    cap: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights correcting for a rollout engine (vLLM) whose sampling distribution differs
    slightly from the trainer's: truncated importance sampling (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"; TRL's ``vllm_importance_sampling_*``).

        w_t = pi_old(o_t | q, o_<t) / pi_sampler(o_t | q, o_<t)
        w   = prod_t w_t                                           level="sequence": (B, 1)
        truncate: min(w, cap)        mask: w where w <= cap, else 0

    RLOO: ``level="sequence"`` only: the loss has one term per completion, so one weight per completion.

    Args:
        old_per_token_logps: (B, T) the trainer's log-probs of the sampled tokens under the policy
            that sampled them (the weights the engine was synced to).
        sampler_per_token_logps: (B, T) the engine's log-probs of the same tokens.
        completion_mask: (B, T) 1 on completion tokens.
    Returns:
        ``(weights, metrics)``: weights (B, 1), detached; metrics (detached)
        ``sampling/logp_diff/mean|max`` (``|old - sampler|`` over completion tokens) and
        ``sampling/importance_ratio/min|mean|max`` (the weights over completions).
    """
    mask = completion_mask.bool()
    log_diff = (old_per_token_logps - sampler_per_token_logps).masked_fill(~mask, 0.0)  # (B, T)
    if level == "sequence":  # the whole completion's probability ratio
        log_weights, kept = log_diff.sum(-1, keepdim=True), mask.any(-1, keepdim=True)  # (B, 1)
    else:  # RLOO: no per-token loss term to weight
        raise ValueError(f"vllm_importance_sampling_level must be one of ['sequence'], got {level!r}")
    weights = torch.exp(log_weights).detach()
    if mode == "truncate":  # TIS: bounded variance, slightly biased
        weights = weights.clamp(max=cap)
    elif mode == "mask":  # drop the samples the engine over-represented beyond the cap
        weights = weights.masked_fill(weights > cap, 0.0)
    else:
        raise ValueError(f"vllm_importance_sampling_mode must be one of ['truncate', 'mask'], got {mode!r}")
    with torch.no_grad():
        diffs = log_diff.abs()[mask] if mask.any() else log_diff.new_zeros(1)
        ratios = weights[kept] if kept.any() else weights.new_ones(1)
        metrics = {
            "sampling/logp_diff/mean": diffs.mean(),
            "sampling/logp_diff/max": diffs.max(),
            "sampling/importance_ratio/min": ratios.min(),
            "sampling/importance_ratio/mean": ratios.mean(),
            "sampling/importance_ratio/max": ratios.max(),
        }
    return weights, metrics


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class RLOOModule(L.LightningModule):
    """Online RL with leave-one-out baselines and the KL to a reference folded into the reward.

    Args:
        model_name_or_path: hub id or local directory of the policy.
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
        reward_funcs: reward functions ``(prompts, completions, **columns) -> list[float | None]``
            (YAML: import paths, or ``class_path`` + ``init_args`` for callable classes such as
            `lit_posttrain.rewards.model.RewardModelScorer`). Not saved in checkpoints (their names
            are, as ``reward_func_names``): pass them again to ``load_from_checkpoint``.
        reward_weights: one weight per reward function (default: all 1).
        num_generations: G, completions sampled per prompt (>= 2; RLOO's default is 2).
        max_completion_length: new tokens per completion at most.
        temperature / top_p / top_k: sampling settings (``top_k=0``: off).
        num_iterations: mu, passes of policy updates over each generation batch.
        steps_per_generation: optimizer steps per pass (the generation batch is split into this many
            shuffled mini-batches).
        micro_batch_size: completions per forward/backward (gradient accumulation inside an
            optimizer step); None for the whole mini-batch at once.
        beta: coefficient of the KL penalty subtracted from the reward (0: no reference model).
            The reference comes from a `lit_posttrain.callbacks.ReferenceModel` callback, added
            with defaults when none is given.
        epsilon / epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high``
            defaults to ``epsilon``).
        mask_truncated_completions: no loss on completions cut at ``max_completion_length``.
        vllm_importance_sampling_correction: weight the loss by pi_old / pi_sampler when the
            rollout engine reports log-probs (vLLM); see `vllm_importance_sampling_ratio`.
        vllm_importance_sampling_level: one weight per ``sequence``. RLOO: ``sequence`` only (one loss
            term per completion); the option exists so that configs shared with GRPO parse.
        vllm_importance_sampling_mode: ``truncate`` weights at the cap, or ``mask`` (zero) above it.
        vllm_importance_sampling_cap: the cap C of the weights (TRL's default 3.0).
        max_grad_norm: clip the gradient norm at each optimizer step (None: no clipping).
        log_completions: log a table of sampled completions every ``trainer.log_every_n_steps``
            generation batches (TRL's option): one row per completion with ``step`` (optimizer steps
            so far), ``prompt``, ``completion``, each reward function's value (None where it does not
            apply) and ``advantage``. Written to ``<trainer.log_dir>/completions.jsonl``, and to the
            logger as a ``wandb.Table`` (`WandbLogger`, key ``completions``) or as text
            (`TensorBoardLogger`, tag ``completions``). Rank 0's samples, from rank 0.
        num_completions_to_print: rows per table (the first ones of the generation batch); None: all.
        val_do_sample: validation samples ``num_generations_eval`` completions per prompt at the
            training ``temperature`` / ``top_p`` / ``top_k`` (TRL's evaluation) instead of one greedy
            completion. The samples come from a generator seeded anew at every validation (from the
            run's seed, the batch and the rank): validations compare the same draws, and training's
            sampling RNG is untouched.
        num_generations_eval: completions per prompt when ``val_do_sample`` (TRL's name); None:
            ``num_generations``.
        tools: callables the model may call (typed, with a docstring; YAML: import paths, e.g.
            ``[my_tools.add]``): rollouts become multi-turn (`lit_posttrain.rollout.ToolRollout`, docs/tools.md):
            generation stops at a tool call, the tool runs, its result is inserted (no loss on it) and
            generation continues. Reward functions also get ``trajectory=`` (each sample's messages).
        environment_factory: instead of ``tools``, builds one environment per sample (``reset`` /
            ``step``, see docs/tools.md) that answers the calls: a class or a function, or its import
            path (YAML: ``my_envs.Game``).
        max_tool_calling_iterations: model turns per sample at most (TRL's name).
        tool_call_format: ``hermes`` (``<tool_call>{json}</tool_call>``, Qwen2.5) or ``tiny`` (``<add 1 2>``).
        tool_timeout: seconds a turn's tool calls may run; later they become an error message.
        max_tool_response_tokens: a tool result is cut to this many tokens.
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback (findings about the
            run's health, docs/diagnostics.md) unless the Trainer has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step. A
            `lit_posttrain.schedulers.WarmupDecayLR` without ``num_training_steps`` gets the run's
            optimizer steps.

    Metrics (``train/``, one row per generation batch, over every rank's samples):
        ``reward`` (RLOO: before the KL penalty), ``reward_std`` (the mean of the groups' std),
        ``frac_reward_zero_std``, ``rewards/<function>/mean|std``,
        ``completions/mean_length|min_length|max_length|clipped_ratio`` and ``num_tokens`` (prompt +
        completion tokens so far), measured at generation; ``loss``, ``entropy`` and
        ``clip_ratio/low_mean|high_mean|region_mean`` (RLOO: fractions of completions) over the policy
        updates; with ``beta > 0``, ``kl`` (RLOO): the k1 estimate log pi_old - log pi_ref summed over
        each completion (the reward's penalty), per completion token (all completions' sums / their
        tokens), measured at generation (pi_old: the policy that sampled); with an engine that reports
        log-probs (vLLM), ``sampling/logp_diff/mean|max`` and ``sampling/importance_ratio/min|mean|max``;
        ``grad_norm`` (before clipping, as TRL logs it) and ``learning_rate`` of the generation batch's
        last optimizer step. Validation: ``val/reward``, ``val/rewards/<function>/mean``,
        ``val/completions/mean_length`` (greedy, one per prompt;
        ``val_do_sample``: sampled), and with tools ``val/tools/*`` and ``val/episodes/*`` as in training.
    """

    METHOD = "RLOO"
    PAPER = "https://arxiv.org/abs/2402.14740"

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
        reward_funcs: list[Callable],
        reward_weights: list[float] | None = None,
        num_generations: int = 2,  # RLOO: the paper's k=2
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_iterations: int = 1,
        steps_per_generation: int = 1,
        micro_batch_size: int | None = None,
        beta: float = 0.05,  # RLOO: KL in the reward, on by default
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        mask_truncated_completions: bool = False,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_level: Literal["sequence"] = "sequence",  # RLOO: see below
        vllm_importance_sampling_mode: Literal["truncate", "mask"] = "truncate",
        vllm_importance_sampling_cap: float = 3.0,
        max_grad_norm: float | None = 1.0,
        log_completions: bool = False,
        num_completions_to_print: int | None = None,
        val_do_sample: bool = False,
        num_generations_eval: int | None = None,
        tools: list[Callable] | None = None,
        environment_factory: Callable | str | None = None,
        max_tool_calling_iterations: int = 4,
        tool_call_format: Literal["hermes", "tiny"] = "hermes",
        tool_timeout: float = 10.0,
        max_tool_response_tokens: int = 128,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        # reward functions are code (a reward model would put its weights in every checkpoint)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "reward_funcs", "tools", "environment_factory"])
        if not reward_funcs:
            raise ValueError("reward_funcs: give at least one reward function")
        # signatures now, before the model loads; the dataset columns are checked in setup
        check_reward_funcs(reward_funcs, columns=None)
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(
                f"reward_weights has {len(reward_weights)} values for {len(reward_funcs)} reward_funcs"
            )
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (group statistics), got {num_generations}")
        if vllm_importance_sampling_level not in ("sequence",):  # RLOO: no per-token loss term to weight
            raise ValueError(
                "vllm_importance_sampling_level must be one of ['sequence'] (RLOO's loss has one term per "
                f"completion), got {vllm_importance_sampling_level!r}"
            )
        if vllm_importance_sampling_mode not in ("truncate", "mask"):
            raise ValueError(
                "vllm_importance_sampling_mode must be one of ['truncate', 'mask'], "
                f"got {vllm_importance_sampling_mode!r}"
            )
        if vllm_importance_sampling_cap < 1.0:
            raise ValueError(f"vllm_importance_sampling_cap must be >= 1, got {vllm_importance_sampling_cap}")
        if num_completions_to_print is not None and num_completions_to_print < 1:
            raise ValueError(f"num_completions_to_print must be >= 1 or None, got {num_completions_to_print}")
        for name, value in [
            ("num_iterations", num_iterations),
            ("steps_per_generation", steps_per_generation),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
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
        )
        self.tokenizer = load_tokenizer(
            tokenizer_name_or_path or model_name_or_path, trust_remote_code=trust_remote_code
        )
        self.rollout = HFRollout(self.tokenizer)
        self.reward_funcs = list(reward_funcs)
        self.reward_func_names = _unique([reward_func_name(f) for f in self.reward_funcs])
        self.hparams["reward_func_names"] = self.reward_func_names
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)
        self.num_generations, self.max_completion_length = num_generations, max_completion_length
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.num_iterations, self.steps_per_generation = num_iterations, steps_per_generation
        self.micro_batch_size = micro_batch_size
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.mask_truncated_completions = mask_truncated_completions
        self.vllm_importance_sampling_correction = vllm_importance_sampling_correction
        self.vllm_importance_sampling_level = vllm_importance_sampling_level
        self.vllm_importance_sampling_mode = vllm_importance_sampling_mode
        self.vllm_importance_sampling_cap = vllm_importance_sampling_cap
        self.max_grad_norm = max_grad_norm
        self.log_completions, self.num_completions_to_print = log_completions, num_completions_to_print
        self.tool_options = None  # ToolRollout's settings, when the model has tools or an environment
        if tools or environment_factory is not None:
            self.tool_options = dict(
                tools=list(tools) if tools else None, env_factory=environment_factory,
                max_turns=max_tool_calling_iterations, max_tool_response_tokens=max_tool_response_tokens,
                tool_timeout=tool_timeout, call_format=tool_call_format,
            )  # fmt: skip
            ToolRollout(self.rollout, self.tokenizer, **self.tool_options)  # check the options now
        self._tool_rollout: ToolRollout | None = None
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        self.automatic_optimization = False  # generation, then num_iterations x steps_per_generation steps
        self.num_tokens = 0  # prompt + completion tokens trained on, all ranks (saved in checkpoints)
        self.generator: torch.Generator | None = None  # this rank's sampling RNG, created in setup
        self.val_reward = MeanMetric(nan_strategy="ignore")
        self.val_rewards_per_func = torch.nn.ModuleList(
            MeanMetric(nan_strategy="ignore") for _ in reward_funcs
        )
        self.val_completion_length = MeanMetric()
        if num_generations_eval is not None and num_generations_eval < 1:
            raise ValueError(f"num_generations_eval must be at least 1, got {num_generations_eval}")
        self.val_do_sample, self.num_generations_eval = val_do_sample, num_generations_eval
        self.val_seed = 0  # the run's seed, set in setup: validation's samples are drawn from it
        # held-out tools/* and episodes/* (tool rollouts): per-episode means, calls and their outcomes summed
        self.val_tools = torch.nn.ModuleDict(
            {name: MeanMetric() for name in ("calls_per_episode", "turns_mean", "truncated_ratio")}
            | {name: SumMetric() for name in ("calls", "successes", "errors", "timeouts")}
        )

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard each decoder layer, then the root."""
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool = False):
        """(N, C) log-probs of the last C = ``logits_to_keep`` tokens of ``input_ids`` under the
        temperature-scaled policy, and their (N, C) entropies (no grad) if ``compute_entropy``, else None.
        The logits are computed from the final hidden states a chunk of positions at a time
        (`chunked_selective_log_softmax`): the (N, C, V) logits never exist at once."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        hidden_states = final_hidden_states(self.model, input_ids, attention_mask, position_ids)
        hidden_states = hidden_states[:, -logits_to_keep - 1 : -1]  # (N, C, H): t predicts completion token t
        per_token_logps, stats = chunked_selective_log_softmax(
            hidden_states,
            self.model.get_output_embeddings(),
            input_ids[:, -logits_to_keep:],
            temperature=self.temperature,
            with_stats=compute_entropy,
        )  # (N, C), TokenStats of (N, C) or None
        entropies = stats.entropy if compute_entropy else None  # (N, C)
        return per_token_logps, entropies

    def training_step(self, batch, batch_idx):
        mini_batch_size, micro_batch_size = self._split_sizes(len(batch["prompt_ids"]))
        # 1. generate num_generations completions per prompt with the current policy (N = B * G, prompt-major)
        with sampling_rng(self.generator):
            rollout = self._engine().generate(
                self.model, batch["prompt_ids"], num_generations=self.num_generations,
                max_completion_length=self.max_completion_length, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k,
            )  # fmt: skip
        # 2. pack the samples into tensors: (N, P+C), (N, P+C), (N, C)
        input_ids, attention_mask, completion_mask = self._pack(batch["prompt_ids"], rollout)
        # 3. score every completion with every reward function, NaN where one does not apply
        prompts, completions, columns = self._reward_inputs(batch, rollout)
        rewards_per_func = score_completions(
            self.reward_funcs, prompts, completions, completion_ids=rollout.completion_ids, columns=columns,
            trainer_state=self._trainer_state(),
        ).to(self.device)  # (N, F) fmt: skip
        # 4. combine: the weighted sum over the functions, NaN where none applies
        rewards = self._combine(rewards_per_func)  # (N,)
        # 5. old and reference log-probs (no grad); on policy (one optimizer step per generation batch) old
        # = the detached current ones (ratio exactly 1), from the update's own forward in step 8
        on_policy = self.num_iterations == 1 and self.steps_per_generation == 1
        C, old_per_token_logps, ref_per_token_logps = completion_mask.size(1), None, None
        if not on_policy or self.beta != 0.0:  # RLOO: + the KL in the reward
            old_per_token_logps = self._old_per_token_logps(input_ids, attention_mask, C, micro_batch_size)
        if self.beta != 0.0:
            ref_per_token_logps = self._ref_per_token_logps(input_ids, attention_mask, C, micro_batch_size)
        # 6. importance-sampling correction: the engine sampled from its own numbers (vLLM); without old
        # log-probs each micro-batch weighs its samples with its own forward's as pi_old (_compute_loss)
        importance_sampling_ratio, sampler_per_token_logps = None, None  # (N, 1) weights; (N, C)
        if self.vllm_importance_sampling_correction and rollout.logps is not None:
            sampler_per_token_logps = pad([torch.tensor(lp) for lp in rollout.logps], 0.0).to(self.device)
            if old_per_token_logps is not None:
                importance_sampling_ratio, _ = self._importance_sampling_ratio(
                    old_per_token_logps, sampler_per_token_logps, completion_mask
                )
        # 7. advantages. RLOO: the KL to the reference (k1, summed over the completion) is part of the reward
        kl = torch.zeros_like(rewards)  # (N,)
        if self.beta != 0.0:
            kl = ((old_per_token_logps - ref_per_token_logps) * completion_mask).sum(-1)  # (N,)
        advantages = rloo_advantages(rewards - self.beta * kl, self.num_generations)  # (N,) leave-one-out
        # 8. num_iterations passes of steps_per_generation optimizer steps over the samples
        samples = {
            "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "advantages": advantages, "old_per_token_logps": old_per_token_logps,
            "importance_sampling_ratio": importance_sampling_ratio,
            "sampler_per_token_logps": sampler_per_token_logps if old_per_token_logps is None else None,
        }  # fmt: skip
        losses, weighted_metrics, first_per_token_logps = self._policy_updates(samples, mini_batch_size, micro_batch_size)
        sampling_metrics = {}  # the correction's weights over every sample, as the loss used them
        if sampler_per_token_logps is not None:
            pi_old = first_per_token_logps if old_per_token_logps is None else old_per_token_logps
            sampling_metrics = self._importance_sampling_ratio(pi_old, sampler_per_token_logps, completion_mask)[1]
        # 9. metrics: the generation batch's over every rank's samples (ranks hold equally many whole groups)
        lengths = torch.tensor([len(ids) for ids in rollout.completion_ids])  # (N,)
        all_rewards_per_func, all_lengths, all_truncated, all_num_tokens = self._all_gather_samples(
            rewards_per_func, lengths, torch.tensor(rollout.truncated), attention_mask.sum(1)
        )  # (M, F), (M,), (M,), (M,) with M = world_size * N
        self.num_tokens += int(all_num_tokens.sum())  # prompt + completion tokens, all ranks
        metrics = self._generation_metrics(all_rewards_per_func, all_lengths, all_truncated)
        if self.beta != 0.0:  # RLOO: mean per-token KL (k1) of every rank's samples, measured at generation
            all_kl, all_num_completion_tokens = self._all_gather_samples(kl, completion_mask.sum(1))
            metrics["kl"] = all_kl.sum() / all_num_completion_tokens.sum().clamp(min=1)
        metrics |= sampling_metrics | self._mean_over_micro_batches(weighted_metrics)
        if rollout.tool_stats is not None:
            metrics |= self._tool_metrics(rollout)
        metrics["loss"] = self.trainer.strategy.reduce(torch.stack(losses).mean(), reduce_op="mean")
        for name, value in metrics.items():
            self.log(f"train/{name}", value, prog_bar=name in ("reward", "loss"))
        self.log("train/num_tokens", float(self.num_tokens))
        # 10. every log_every_n_steps generation batches, a table of sampled completions (log_completions)
        num_batches = self.global_step // self._steps_per_batch()  # generation batches, this one included
        if self.log_completions and num_batches % self.trainer.log_every_n_steps == 0:
            self._log_completion_table(prompts, completions, rewards_per_func, advantages)

    def validation_step(self, batch, batch_idx):
        G, sampling = 1, {"do_sample": False}  # one greedy completion per prompt
        if self.val_do_sample:
            G = self.num_generations_eval or self.num_generations
            sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        generator = torch.Generator(self.device).manual_seed(
            self.val_seed + 1_000_003 * batch_idx + 7919 * self.global_rank
        )  # the same draws at every validation
        with sampling_rng(generator):
            rollout = self._engine().generate(
                self.model,
                batch["prompt_ids"],
                num_generations=G,
                max_completion_length=self.max_completion_length,
                **sampling,
            )
        prompts, completions, columns = self._reward_inputs(batch, rollout, G)
        rewards_per_func = score_completions(
            self.reward_funcs,
            prompts,
            completions,
            completion_ids=rollout.completion_ids,
            columns=columns,
            trainer_state=self._trainer_state(),
        )  # (N * G, F)
        self.val_reward.update(self._combine(rewards_per_func))
        for metric, values in zip(self.val_rewards_per_func, rewards_per_func.T):
            metric.update(values)
        self.val_completion_length.update(
            torch.tensor([len(ids) for ids in rollout.completion_ids], dtype=torch.float)
        )
        self.log("val/reward", self.val_reward, prog_bar=True)
        for name, metric in zip(self.reward_func_names, self.val_rewards_per_func):
            self.log(f"val/rewards/{name}/mean", metric)
        self.log("val/completions/mean_length", self.val_completion_length)
        if rollout.tool_stats is not None:
            self._log_val_tools(rollout)

    def _log_val_tools(self, rollout: RolloutOutput) -> None:
        """Held-out ``val/tools/*`` and ``val/episodes/*``, accumulated over the validation's batches and ranks."""
        stats, metrics = rollout.tool_stats, self.val_tools
        metrics["calls_per_episode"].update(torch.tensor([float(s["calls"]) for s in stats], device=self.device))
        metrics["turns_mean"].update(torch.tensor([float(s["turns"]) for s in stats], device=self.device))
        metrics["truncated_ratio"].update(torch.tensor([float(t) for t in rollout.truncated], device=self.device))
        for name in ("calls", "successes", "errors", "timeouts"):
            metrics[name].update(torch.tensor([float(s[name]) for s in stats], device=self.device))
        self.log("val/tools/calls_per_episode", metrics["calls_per_episode"])
        self.log("val/tools/errors", metrics["errors"])
        self.log("val/tools/timeouts", metrics["timeouts"])
        self.log("val/episodes/turns_mean", metrics["turns_mean"])
        self.log("val/episodes/truncated_ratio", metrics["truncated_ratio"])

    def on_validation_epoch_end(self) -> None:
        if self.tool_options is not None and self.val_tools["calls"].update_count:
            calls, successes = self.val_tools["calls"].compute(), self.val_tools["successes"].compute()
            self.log("val/tools/success_rate", successes / calls.clamp(min=1))  # calls that returned, over calls
            self.val_tools["calls"].reset()
            self.val_tools["successes"].reset()

    def configure_optimizers(self):
        optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, WarmupDecayLR) and scheduler.num_training_steps is None:
            # estimated_stepping_batches counts generation batches (training_step calls), capped at
            # max_steps, which counts optimizer steps; each generation batch makes num_iterations x
            # steps_per_generation optimizer steps: scale the count, then cap it at max_steps again
            num_steps = self.trainer.estimated_stepping_batches * self._steps_per_batch()
            if self.trainer.max_steps != -1:
                num_steps = min(num_steps, self.trainer.max_steps)
            scheduler.set_num_training_steps(num_steps)  # the run's optimizer steps
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        # the reward functions against the dataset's columns (the DataModule has set up by now)
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, RLOODataModule) and datamodule.train_examples:
            columns = [c for c in datamodule.train_examples[0] if c not in ("prompt", "prompt_ids")]
            columns += ["trajectory"] if self.tool_options is not None else []
            check_reward_funcs(self.reward_funcs, columns=columns)
        # sampling (generation, mini-batch shuffling) draws from this rank's own RNG stream, seeded
        # from the global seed (seed_everything) and the rank; it is saved in checkpoints (Lightning
        # does not save the global RNG), so a resumed run samples what the uninterrupted one would
        self.generator = torch.Generator(self.trainer.strategy.root_device)
        self.generator.manual_seed(torch.initial_seed() + self.global_rank)
        self.val_seed = torch.initial_seed()

    def configure_callbacks(self):
        # Lightning rejects these options under manual optimization with a generic error, and checks
        # them after this hook but before setup: name our options here, the last hook before its check
        if self.trainer.state.fn == "fit" and self.trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{self.METHOD}: trainer.accumulate_grad_batches ({self.trainer.accumulate_grad_batches}) "
                "does not apply (manual optimization): accumulate gradients over micro-batches with "
                "model.init_args.micro_batch_size (completions per forward/backward) instead"
            )
        if self.trainer.state.fn == "fit" and self.trainer.gradient_clip_val:
            raise ValueError(
                f"{self.METHOD}: trainer.gradient_clip_val ({self.trainer.gradient_clip_val}) does not apply "
                "(manual optimization): clip with model.init_args.max_grad_norm instead"
            )
        callbacks = []
        # beta > 0 needs a reference: the user's ReferenceModel callback, else one with defaults
        if self.beta != 0.0 and not any(isinstance(c, ReferenceModel) for c in self.trainer.callbacks):
            callbacks.append(ReferenceModel())
        # training diagnostics, on by default: the user's TrainingDiagnostics callback, else one with defaults
        if self.diagnostics and not any(isinstance(c, TrainingDiagnostics) for c in self.trainer.callbacks):
            callbacks.append(TrainingDiagnostics())
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["num_tokens"] = self.num_tokens
        # every rank's sampling RNG state (this hook runs on every rank; the strategy writes rank 0's dict)
        state = self.generator.get_state().to(self.device)
        checkpoint["generator_states"] = (
            self.trainer.strategy.all_gather(state).view(self.trainer.world_size, -1).cpu()
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.num_tokens = checkpoint.get("num_tokens", 0)
        states = checkpoint.get("generator_states")
        if states is None or self.generator is None:  # an older checkpoint, or load_from_checkpoint
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(
                f"{self.METHOD}: the checkpoint holds the sampling RNG states of {len(states)} processes, this run "
                f"has {self.trainer.world_size}: sampling restarts from the seed (not an exact continuation)"
            )
            return
        self.generator.set_state(states[self.global_rank].clone())  # a copy: set_state rejects a row view


    # -----------------------------------------------------------------------------------------
    # Helpers, in the order training_step calls them
    # -----------------------------------------------------------------------------------------
    def _split_sizes(self, num_prompts: int) -> tuple[int, int]:
        """(mini-batch, micro-batch) sizes in completions; raises naming the options to change."""
        num_samples = num_prompts * self.num_generations
        steps = self.steps_per_generation
        micro = self.micro_batch_size or num_samples // max(steps, 1)
        if num_samples % steps or (num_samples // steps) % micro or micro < 1:
            fits = [
                b
                for b in range(num_prompts, num_prompts + steps * micro + 1)
                if (b * self.num_generations) % (steps * micro) == 0
            ]
            hint = f"e.g. data.batch_size: {fits[0]}" if fits else "e.g. a larger data.batch_size"
            raise ValueError(
                f"{self.METHOD}: a generation batch of data.batch_size ({num_prompts}) x model.num_generations "
                f"({self.num_generations}) = {num_samples} completions must split into model.steps_per_generation "
                f"({steps}) optimizer steps of whole micro-batches of model.micro_batch_size ({micro}) completions, "
                f"i.e. be divisible by {steps * micro}. Change data.batch_size, model.num_generations, "
                f"model.steps_per_generation or model.micro_batch_size ({hint})."
            )
        return num_samples // steps, micro

    def _pack(self, prompt_ids: list[list[int]], rollout: RolloutOutput):
        """Each prompt G times (prompt-major, as the rollout), left-padded, then its completion, right-padded.

        Returns:
            ``input_ids`` (N, P+C), ``attention_mask`` (N, P+C) and ``completion_mask`` (N, C): 1 on
            completion tokens, 0 on padding and, with ``mask_truncated_completions``, on the completions
            cut at ``max_completion_length``.
        """
        device, pad_token_id = self.device, self.tokenizer.pad_token_id
        G = self.num_generations
        prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids for _ in range(G)]
        completions = [torch.tensor(ids, dtype=torch.long) for ids in rollout.completion_ids]
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompts], 0, "left")  # (N, P)
        completion_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in completions], 0)  # (N, C)
        input_ids = torch.cat([pad(prompts, pad_token_id, "left"), pad(completions, pad_token_id)], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (N, P+C)
        completion_mask = completion_mask.to(device)
        if rollout.completion_mask is not None:  # tool rollouts: no loss on the tool results the loop inserted
            model_tokens = pad([torch.tensor(m, dtype=torch.long) for m in rollout.completion_mask], 0)  # (N, C)
            completion_mask = completion_mask * model_tokens.to(device)
        if self.mask_truncated_completions:  # no loss on completions cut at max_completion_length
            is_truncated = torch.tensor(rollout.truncated, device=device)  # (N,)
            completion_mask = completion_mask * (~is_truncated).unsqueeze(1).long()
        return input_ids.to(device), attention_mask.to(device), completion_mask

    def _reward_inputs(
        self, batch: dict, rollout: RolloutOutput, G: int | None = None
    ) -> tuple[list, list, dict[str, list]]:
        """What reward functions see, one of each per completion (``G`` per prompt, default
        ``num_generations``): prompts, completions, dataset columns."""
        G = G or self.num_generations
        prompts = [prompt for prompt in batch["prompt"] for _ in range(G)]  # prompt-major, as the rollout
        columns = {
            name: [value for value in values for _ in range(G)] for name, values in batch["columns"].items()
        }
        if rollout.messages is not None:  # tool rollouts: the whole trajectory, as chat messages
            columns = {**columns, "trajectory": rollout.messages}
        return prompts, self._completions(prompts, rollout), columns

    def _trainer_state(self) -> TrainerState:
        """The training progress reward functions see (``trainer_state=``, TRL's field names)."""
        return TrainerState(
            global_step=self.global_step, epoch=self.current_epoch, max_steps=self.trainer.max_steps
        )

    def _steps_per_batch(self) -> int:
        """Optimizer steps per generation batch."""
        return self.num_iterations * self.steps_per_generation

    def _metrics_read_this_batch(self) -> bool:
        """Whether this generation batch's training metrics reach a reader (departure 6): Lightning logs
        the batch (every ``log_every_n_steps`` generation batches, or ``fast_dev_run``), it holds the run's
        last optimizer step (``max_steps``), or there is no logger (callbacks read
        ``trainer.callback_metrics`` after every batch). Constant during the batch's updates (its optimizer
        steps end at the next multiple of `_steps_per_batch`), and the same on every rank. Outside a
        Trainer (a direct call of `_compute_loss`): True."""
        if self._trainer is None:
            return True
        trainer, steps_per_batch = self.trainer, self._steps_per_batch()
        batch = self.global_step // steps_per_batch + 1  # this generation batch, counted from 1
        logged = trainer.log_every_n_steps > 0 and batch % trainer.log_every_n_steps == 0
        last = 0 < trainer.max_steps <= batch * steps_per_batch
        return not trainer.loggers or logged or last or bool(trainer.fast_dev_run)

    def _engine(self):
        """This step's rollout engine: ``self.rollout`` (which a callback may have swapped for vLLM), inside a
        `ToolRollout` when the model has tools."""
        if self.tool_options is None:
            return self.rollout
        if self._tool_rollout is None or self._tool_rollout.engine is not self.rollout:
            self._tool_rollout = ToolRollout(self.rollout, self.tokenizer, **self.tool_options)
        return self._tool_rollout

    def _tool_metrics(self, rollout: RolloutOutput) -> dict[str, torch.Tensor]:
        """``tools/*`` and ``episodes/*`` over every rank's samples."""
        counts = torch.tensor(
            [[s["turns"], s["calls"], s["successes"], s["errors"], s["timeouts"], t] for s, t in zip(rollout.tool_stats, rollout.truncated)],
            dtype=torch.float, device=self.device,
        )  # (N, 6)  fmt: skip
        (all_counts,) = self._all_gather_samples(counts)  # (M, 6)
        turns, calls, successes, errors, timeouts, truncated = all_counts.T
        return {
            "tools/calls_per_episode": calls.mean(), "tools/success_rate": successes.sum() / calls.sum().clamp(min=1),
            "tools/errors": errors.sum(), "tools/timeouts": timeouts.sum(),
            "episodes/turns_mean": turns.mean(), "episodes/truncated_ratio": truncated.mean(),
        }  # fmt: skip

    def _completions(self, prompts: list, rollout: RolloutOutput) -> list:
        """Completions as reward functions see them: strings, or an assistant message for chat prompts."""
        if is_conversational(prompts[0]):
            return [[{"role": "assistant", "content": text}] for text in rollout.completions]
        return list(rollout.completions)

    def _combine(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N,) weighted nansum; NaN where no function applies (unscorable)."""
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        return rewards.masked_fill(rewards_per_func.isnan().all(dim=1), float("nan"))

    @torch.no_grad()
    def _old_per_token_logps(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, micro_batch_size
    ) -> torch.Tensor:
        """(N, C) log-probs of the last C tokens under the policy before any update, by micro-batches."""
        chunks = zip(input_ids.split(micro_batch_size), attention_mask.split(micro_batch_size))
        return torch.cat([self(ids, mask, logits_to_keep)[0] for ids, mask in chunks])

    @torch.no_grad()
    def _ref_per_token_logps(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, micro_batch_size
    ) -> torch.Tensor:
        """(N, C) log-probs of the last C tokens under the temperature-scaled reference, by micro-batches."""
        reference = find_reference_model(self.trainer, self.METHOD)
        per_token_logps = []
        for ids, mask in zip(input_ids.split(micro_batch_size), attention_mask.split(micro_batch_size)):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
            per_token_logps.append(
                reference.per_token_logps(
                    ids, mask, position_ids, logits_to_keep=logits_to_keep, temperature=self.temperature
                )
            )  # (n, C)
        return torch.cat(per_token_logps)

    def _importance_sampling_ratio(
        self, old_per_token_logps: torch.Tensor, sampler_per_token_logps: torch.Tensor, completion_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Truncated pi_old / pi_sampler weights of the engine's samples, (n, 1), and their ``sampling/*``
        metrics over every rank's samples (min / max / mean as the name says; a collective: call it on
        every rank)."""
        importance_sampling_ratio, metrics = vllm_importance_sampling_ratio(
            old_per_token_logps,
            sampler_per_token_logps,
            completion_mask,
            level=self.vllm_importance_sampling_level,
            mode=self.vllm_importance_sampling_mode,
            cap=self.vllm_importance_sampling_cap,
        )
        for name, value in metrics.items():  # this rank's samples: min / max / mean over ranks
            reduce_op = "min" if name.endswith("/min") else "max" if name.endswith("/max") else "mean"
            metrics[name] = self.trainer.strategy.reduce(value, reduce_op=reduce_op)
        return importance_sampling_ratio, metrics

    def _policy_updates(self, samples: dict, mini_batch_size: int, micro_batch_size: int):
        """``num_iterations`` passes of ``steps_per_generation`` optimizer steps over the samples.

        Returns each optimizer step's loss, each micro-batch's weighted metrics (`_weigh`) and the
        first pass's detached log-probs (N, C), in sample order (on policy: pi_old). RLOO: each
        rank's loss is a mean over its equally many completions: the mean over ranks is the global one.
        """
        optimizer, lr_scheduler = self.optimizers(), self.lr_schedulers()
        num_samples = samples["advantages"].size(0)
        losses, weighted_metrics = [], []
        first_per_token_logps = torch.zeros(samples["completion_mask"].shape, dtype=torch.float32, device=self.device)
        for iteration in range(self.num_iterations):
            if self.steps_per_generation > 1:  # shuffled mini-batches, drawn from the sampling RNG
                order = torch.randperm(num_samples, generator=self.generator, device=self.generator.device)
            else:
                order = torch.arange(num_samples)
            for mini_batch in order.split(mini_batch_size):
                step_loss, step_metrics, per_token_logps = self._accumulate_gradients(
                    samples, mini_batch, micro_batch_size
                )
                losses.append(step_loss)
                weighted_metrics += step_metrics
                if iteration == 0:
                    first_per_token_logps[mini_batch.to(self.device)] = per_token_logps
                self._optimizer_step(optimizer, lr_scheduler)
        return losses, weighted_metrics, first_per_token_logps

    def _accumulate_gradients(self, samples: dict, mini_batch: torch.Tensor, micro_batch_size: int):
        """Forward and backward over one optimizer step's samples (indices ``mini_batch``) in micro-batches.

        Returns the step's loss (a 0-d tensor), each micro-batch's weighted metrics (`_weigh`) and
        the samples' detached log-probs (n, C), in ``mini_batch`` order.
        """
        step_loss, weighted_metrics, per_token_logps = 0.0, [], []
        for micro_batch in mini_batch.split(micro_batch_size):
            micro_samples = {k: v[micro_batch] for k, v in samples.items() if v is not None}
            loss, metrics, micro_per_token_logps = self._compute_loss(micro_samples)
            per_token_logps.append(micro_per_token_logps)
            # RLOO: a mean over the micro-batch's completions, weighted into one over the mini-batch
            scale = len(micro_batch) / len(mini_batch)
            self.manual_backward(loss * scale)
            step_loss += loss.detach() * scale
            weighted_metrics.append(self._weigh(metrics, micro_samples["completion_mask"]))
        return step_loss, weighted_metrics, torch.cat(per_token_logps)

    def _compute_loss(self, samples: dict):  # RLOO: a per-completion mean, no token count needed
        """`rloo_loss` of one micro-batch under the current policy, its metrics plus ``entropy`` (on the
        batches whose metrics are read, departure 6), and its detached log-probs (n, C)."""
        completion_mask = samples["completion_mask"]  # (n, C)
        entropy_read = self._metrics_read_this_batch()
        per_token_logps, entropies = self(
            samples["input_ids"], samples["attention_mask"], completion_mask.size(1), compute_entropy=entropy_read
        )  # (n, C), (n, C) or None
        # the ratio is exactly 1 only when no optimizer step happened since generation
        on_policy = self.num_iterations == 1 and self.steps_per_generation == 1
        old_per_token_logps = per_token_logps.detach() if on_policy else samples["old_per_token_logps"]
        importance_sampling_ratio = samples.get("importance_sampling_ratio")
        if "sampler_per_token_logps" in samples:  # on policy, beta 0: this forward's log-probs are pi_old
            importance_sampling_ratio = vllm_importance_sampling_ratio(
                old_per_token_logps, samples["sampler_per_token_logps"], completion_mask,
                level=self.vllm_importance_sampling_level, mode=self.vllm_importance_sampling_mode,
                cap=self.vllm_importance_sampling_cap,
            )[0]  # fmt: skip
        loss, metrics = rloo_loss(
            per_token_logps,
            old_per_token_logps,
            samples["advantages"],
            completion_mask,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            importance_sampling_ratio=importance_sampling_ratio,
        )
        if entropy_read:
            metrics["entropy"] = masked_mean(entropies, completion_mask)
        return loss, metrics, per_token_logps.detach()

    def _weigh(self, metrics: dict[str, torch.Tensor], completion_mask: torch.Tensor) -> dict:
        """Each micro-batch metric as (2,) ``[value * count, count]``, count being what it is a mean over:
        RLOO: the micro-batch's completions for the clip ratios, its completion tokens for the entropy."""
        weighted = {}
        for name, value in metrics.items():
            count = completion_mask.size(0) if name.startswith("clip_ratio") else completion_mask.sum()
            weight = torch.as_tensor(count, dtype=value.dtype, device=value.device)
            weighted[name] = torch.stack([value * weight, weight])
        return weighted

    def _optimizer_step(self, optimizer, lr_scheduler) -> None:
        """Clip the gradient norm to ``max_grad_norm``, step the optimizer, zero the grads, step the LR."""
        # TRL's grad_norm (before clipping: Lightning calls on_before_optimizer_step inside
        # optimizer.step(), after it) and learning_rate; a collective under FSDP2, so on every rank
        self.log("train/grad_norm", finite_grad_norm(self.parameters(), self.global_step))
        self.log("train/learning_rate", float(optimizer.param_groups[0]["lr"]))
        if self.max_grad_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        optimizer.zero_grad()
        if lr_scheduler is not None:
            lr_scheduler.step()

    def _all_gather_samples(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's per-sample values, as float, in one collective: (N,) or (N, k) each ->
        (world_size * N,) or (world_size * N, k), rank by rank."""
        widths = [1 if value.dim() == 1 else value.size(1) for value in values]  # K = sum(widths) columns
        per_sample = torch.cat([v.to(self.device, torch.float).reshape(v.size(0), -1) for v in values], 1)
        per_sample = self.all_gather(per_sample).reshape(-1, per_sample.size(1))  # (world_size * N, K)
        columns = per_sample.split(widths, dim=1)
        return [column.squeeze(1) if value.dim() == 1 else column for column, value in zip(columns, values)]

    def _generation_metrics(
        self, all_rewards_per_func: torch.Tensor, all_lengths: torch.Tensor, all_truncated: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Rewards and completion lengths of every rank's samples: (M, F), (M,), (M,), M = world_size * N."""
        all_rewards = self._combine(all_rewards_per_func)  # (M,)
        group_std = _nanstd(all_rewards.view(-1, self.num_generations), dim=1).nan_to_num(nan=0.0)  # (M / G,)
        metrics = {
            "reward": all_rewards.nanmean(),
            "reward_std": group_std.mean(),
            "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean(),
            "completions/mean_length": all_lengths.mean(),
            "completions/min_length": all_lengths.min(),
            "completions/max_length": all_lengths.max(),
            "completions/clipped_ratio": all_truncated.mean(),
        }
        for name, values in zip(self.reward_func_names, all_rewards_per_func.T):
            metrics[f"rewards/{name}/mean"] = values.nanmean()
            metrics[f"rewards/{name}/std"] = _nanstd(values, dim=0)
        return metrics

    def _mean_over_micro_batches(self, weighted_metrics: list[dict]) -> dict[str, torch.Tensor]:
        """Each metric's mean weighted over all micro-batches and ranks, in one collective."""
        names = list(weighted_metrics[0])
        sums = [torch.stack([weighted[name] for weighted in weighted_metrics]).sum(0) for name in names]
        totals = self.trainer.strategy.reduce(torch.stack(sums), reduce_op="sum")  # (metrics, 2)
        return {name: value_sum / weight.clamp(min=1) for name, (value_sum, weight) in zip(names, totals)}

    def _log_completion_table(
        self, prompts: list, completions: list, rewards_per_func: torch.Tensor, advantages: torch.Tensor
    ) -> None:
        """Rank 0's samples as rows (step, prompt, completion, each reward function, advantage): appended
        to ``<log_dir>/completions.jsonl``, and to the logger as a wandb.Table or TensorBoard text."""
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a broadcast: on every rank
        if not self.trainer.is_global_zero:
            return
        num_rows = self.num_completions_to_print or len(completions)
        rewards = rewards_per_func.cpu().tolist()  # (N, F), NaN where a function does not apply
        rows = [
            {
                "step": self.global_step,
                "prompt": prompts[i],
                "completion": completions[i],
                **{name: None if math.isnan(r) else r for name, r in zip(self.reward_func_names, rewards[i])},
                "advantage": float(advantages[i]),
            }
            for i in range(min(num_rows, len(completions)))
        ]
        path = Path(log_dir) / "completions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        columns = list(rows[0])
        # chat prompts and completions are lists of messages: a table cell shows them as JSON
        cells = [[v if isinstance(v, str | int | float | None) else json.dumps(v) for v in row.values()]
                 for row in rows]  # fmt: skip
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="completions", columns=columns, data=cells)
            elif isinstance(logger, TensorBoardLogger):  # a markdown table
                lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
                for row in cells:
                    texts = [str(v).replace("|", "\\|").replace("\n", " ") for v in row]
                    lines.append("| " + " | ".join(texts) + " |")
                logger.experiment.add_text("completions", "\n".join(lines), global_step=self.global_step)


def _unique(names: list[str]) -> list[str]:
    """Suffix repeated names (two instances of one reward class) so their metrics stay apart."""
    return [
        name if names.count(name) == 1 else f"{name}_{names[:i].count(name)}" for i, name in enumerate(names)
    ]
