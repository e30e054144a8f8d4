"""PPO: Proximal Policy Optimization for RLHF (Schulman et al. 2017, https://arxiv.org/abs/1707.06347;
Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022, https://arxiv.org/abs/2203.02155).

For each prompt q the policy samples one completion o = o_1..o_T; reward functions score it (the
sequence score s). Every completion token is a step of an episode whose per-token reward is the
KL penalty to a reference policy, plus the score on the last completion token (Ziegler et al. eq. 2):

    kl_t  = log pi_old(o_t) - log pi_ref(o_t)                       kl_estimator="k1"
          = exp(log pi_ref - log pi_old) - 1 - (log pi_ref - log pi_old)   "k3" (always >= 0)
    r_t   = -kl_coef * kl_t + [t = T] * s

A value model V estimates the return from the state before each completion token. Generalised
advantage estimation (GAE, Schulman et al. 2016, https://arxiv.org/abs/1506.02438 eq. 16), with
V_{T+1} = 0:

    delta_t = r_t + gamma V_{t+1} - V_t
    A_t     = delta_t + gamma lam A_{t+1}            R_t = A_t + V_t   (the value targets)

and the advantages are whitened over the batch (`gae_advantages`). Policy and value model are
then trained together on the clipped surrogate and the clipped value loss (PPO eq. 7; `ppo_loss`):

    ratio_t = pi_theta(o_t) / pi_old(o_t)
    pg      = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - cliprange, 1 + cliprange))
    vf      = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old,t - cliprange_value, V_old,t + cliprange_value) - R_t)^2)
    loss    = pg + vf_coef vf

The value model (the documented choice, issue #11): a separate ``AutoModelForSequenceClassification``
with one output (``value_model_name_or_path``; default: the policy's checkpoint with a fresh score
head), read at every token: its score head is applied to the trunk's last hidden state at each
position, as TRL's PPO reads its value model. It can be started from a trained reward model (TRL's
default practice). Memory: a second full trunk that is trained, so its parameters, gradients and
two AdamW moments: about 4 x its parameter bytes on top of policy training (for a 0.5B policy in
float32, ~8 GB), plus the frozen reference (1 x) and a reward model if one scores. A value head on a
shared trunk would save most of it but couples the two losses (TRL does not either).

Numbered departures from TRL's experimental ``PPOTrainer`` (its option names and defaults otherwise):
1. The sequence score goes on the last completion token (the EOS when one was sampled), as the
   papers put it; TRL puts it one position past the last token (when there is one).
2. Value loss and policy loss are taken over the same completion tokens (TRL's value loss covers
   one more position, past the EOS, whose value is 0).
3. Completions are cut at the EOS by the rollout engine (TRL: ``stop_token``); ``missing_eos_penalty``
   is subtracted from the score of completions that reached ``max_completion_length`` without an EOS.
4. A completion no reward function applies to (all ``None``) is unscorable: it takes no loss and is
   left out of the whitening (TRL has one reward model that always scores); a generation batch with
   fewer than 2 scorable completion tokens gets zero advantages.
5. Whitening (advantages, and rewards with ``whiten_rewards``) uses the mean and variance over every
   rank's completion tokens, so 2 processes x b prompts train exactly like 1 process x 2b (TRL
   whitens per rank). The loss is a mean over the completion tokens of the whole optimizer step
   (all micro-batches and ranks), so ``micro_batch_size`` does not change the update (TRL: the mean
   of the micro-batches' means).
6. The learning rate scheduler and ``max_grad_norm`` clipping act at every optimizer step
   (TRL steps its scheduler once per generation batch and does not clip).
7. ``max_completion_length`` is TRL's ``response_length`` (same default, 53), named as in GRPO.
8. Log-probs are computed from logits divided by ``temperature`` (as TRL), so the ratio and the KL
   compare the distribution that was sampled from.
9. Validation samples one greedy completion per prompt and logs its reward (``val/reward``; TRL
   samples at temperature 0.01 for its sample tables).

Training loop (manual optimization; one ``training_step`` = one generation batch):

    batch = data.batch_size prompts                             # from PPODataModule
    rollout = self.rollout.generate(self.model, prompt_ids, num_generations=1, ...)   # B completions
    scores (reward functions, - missing_eos_penalty); old, reference log-probs and old values (no grad)
    per-token rewards -> GAE advantages and returns
    for epoch in range(num_ppo_epochs):
        for mini-batch in B completions split into num_mini_batches shuffled parts:
            for micro-batch of micro_batch_size completions:  # gradient accumulation
                manual_backward(ppo_loss(...))
            clip to max_grad_norm; optimizer.step(); lr_scheduler.step()    # policy and value model

So ``trainer.max_steps`` counts optimizer steps (``num_ppo_epochs * num_mini_batches`` per
generation batch) and the logged ``step`` counts generation batches. Lightning's
``accumulate_grad_batches`` and ``gradient_clip_val`` do not apply to manual optimization: use
``micro_batch_size`` and ``max_grad_norm`` (setting them raises a ValueError that says so).

Rollout engine contract (`lit_posttrain.rollout`): ``self.rollout`` is `HFRollout` by default; the
`VLLMRollout` callback swaps in a vLLM engine that samples from the policy's current weights (it
syncs ``self.model``, the policy; the value model never goes to the engine). Validation calls it
with ``num_generations=1, do_sample=False``. With an engine that reports its sampled tokens'
log-probs (vLLM) and ``vllm_importance_sampling_correction`` (on by default, a no-op with HF), the
policy-gradient term of each token is weighted by the truncated ratio pi_old / pi_sampler; because
``max(-A w r, -A w clip(r)) = w max(-A r, -A clip(r))`` for w >= 0, the weights multiply the
advantages passed to `ppo_loss`. Logged as ``sampling/logp_diff/mean|max`` and
``sampling/importance_ratio/min|mean|max``.

Checkpoints hold the policy, the value model, the optimizer state of both and every rank's
sampling RNG, so a resumed run continues exactly. `lit_posttrain.callbacks.HubExport` exports the
policy (``self.model``); `PPOModule.export_value_model` writes the value model as a plain Hugging
Face directory (``AutoModelForSequenceClassification``) on request.

Supports: plain and conversational prompts, extra dataset columns passed to reward functions,
several weighted reward functions (callables or `lit_posttrain.rewards.model.RewardModelScorer`),
LoRA on the policy (the reference is the base with adapters disabled; the value model is trained in
full), DDP and FSDP2 (policy and value model sharded).
Assumes: a tokenizer with a pad token; a value checkpoint whose architecture has a ``score`` head and
a ``base_model_prefix`` trunk (every transformers ``*ForSequenceClassification`` decoder).

    lit-posttrain fit --config configs/quickstart/ppo.yaml
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import fully_shard
from torchmetrics import MeanMetric
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
from lit_posttrain.experimental import warn_experimental
from lit_posttrain.models import DType, LoRAConfig, decoder_layers, load_model, load_tokenizer
from lit_posttrain.ops import entropy_from_logits, finite_grad_norm, masked_mean, pad, selective_log_softmax
from lit_posttrain.rewards import TrainerState, check_reward_funcs, reward_func_name, score_completions
from lit_posttrain.rollout import HFRollout, RolloutOutput, sampling_rng
from lit_posttrain.schedulers import WarmupDecayLR

warn_experimental(__name__)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForPrompts:
    """Batch tokenized prompts without padding: the rollout engine pads them itself.

    >>> collator = DataCollatorForPrompts()
    >>> batch = collator([
    ...     {"prompt_ids": [5, 6, 7], "prompt": "2+2=", "answer": "4"},
    ...     {"prompt_ids": [8], "prompt": "3+3=", "answer": "6"},
    ... ])
    >>> batch["prompt_ids"], batch["prompt"], batch["columns"]
    ([[5, 6, 7], [8]], ['2+2=', '3+3='], {'answer': ['4', '6']})
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
class PPODataModule(L.LightningDataModule):
    """Load, check and tokenize prompt-only data; batch ``batch_size`` prompts per generation batch.

    Rows need a ``prompt`` (a string, or a list of messages rendered with the chat template and
    ``add_generation_prompt=True``); every other column is passed to the reward functions.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: prompts per generation batch, one completion each (TRL's
            ``per_device_train_batch_size * gradient_accumulation_steps``). The last incomplete batch
            of an epoch is dropped.
        max_prompt_length: prompt tokens kept; longer prompts keep their end. None: all.
        dataset_split: split to read from a hub dataset.
        val_dataset_split: split to read ``val_data`` from; default ``dataset_split``.
        dataset_config: hub dataset configuration name.
        columns: maps the expected column names to the data's (``{prompt: question}``).
        system_prompt: when set, each prompt becomes a conversation that starts with this system message.
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
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"] if not isinstance(tokenizer, str) else None)
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
            raise ValueError("PPODataModule: train_data is required (a path, hub id, list of dicts or Dataset)")
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
            self.val_examples, batch_size=self.batch_size, collate_fn=self.collator, num_workers=self.num_workers
        )


# ---------------------------------------------------------------------------------------------
# Advantages and loss
# ---------------------------------------------------------------------------------------------
def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` with the masked mean and Bessel-corrected masked variance
    (TRL's ``masked_whiten``); ``shift_mean=False`` adds the mean back (scale only). ``mean`` / ``var``
    override the statistics (the module passes ones taken over every rank).

    >>> masked_whiten(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1, 1, 0]]))  # mean 2, var 2
    tensor([[-0.7071,  0.7071,  4.9497]])
    """
    mask = mask.to(values.dtype)
    if mean is None or var is None:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"masked_whiten: needs at least 2 unmasked values, got {int(count)}")
        mean = (values * mask).sum() / count
        var = (((values - mean) * mask) ** 2).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438 eq. 16).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` is 0 past the last token),
    ``A_t = delta_t + gamma lam A_{t+1}``, returns ``R_t = A_t + V_t`` (before whitening).

    Args:
        rewards: (B, T) per-token rewards (KL penalty, plus the score on the last token).
        values: (B, T) the value model's estimate at the state before each token (old, detached).
        mask: (B, T) 1 on completion tokens; rewards and values are taken as 0 elsewhere, so each
            row's episode ends at its last completion token.
        whiten: normalise the advantages to masked mean 0 and variance 1 (`masked_whiten`).
    Returns:
        ``(advantages, returns)``, both (B, T) and 0 outside ``mask``.

    >>> adv, ret = gae_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]),
    ...                           torch.ones(1, 2), gamma=1.0, lam=1.0, whiten=False)
    >>> adv, ret  # lam = gamma = 1: A_t = (sum of future rewards) - V_t
    (tensor([[0.5000, 0.5000]]), tensor([[1., 1.]]))
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.size(1)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # (B, T)
    returns = advantages + values
    if whiten:
        advantages = masked_whiten(advantages, mask) * mask
    return advantages, returns


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate plus the clipped value loss (PPO eq. 7 and 9; TRL's PPO).

        pg   = masked_mean(max(-A r, -A clip(r, 1 - cliprange, 1 + cliprange)))      r = exp(logps - old_logps)
        vf   = 0.5 masked_mean(max((V - R)^2, (clip(V, V_old - cliprange_value, V_old + cliprange_value) - R)^2))
        loss = pg + vf_coef vf

    Args:
        logps / old_logps: (B, T) completion-token log-probs under the policy being trained / the one
            that sampled them (detached).
        advantages: (B, T) per-token advantages (`gae_advantages`).
        values / old_values: (B, T) the value model's estimates now (with grad) / at generation.
        returns: (B, T) value targets.
        mask: (B, T) 1 on the tokens that take the loss.
    Returns:
        ``(loss, metrics)`` with TRL's names, detached: ``loss/policy_avg`` (pg), ``loss/value_avg`` (vf),
        ``policy/clipfrac_avg`` (tokens whose policy term is clipped), ``val/clipfrac_avg`` (tokens
        whose clipped value loss is the larger), ``policy/approxkl_avg`` (0.5 mean (log r)^2),
        ``val/ratio`` (mean r).
    """
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps  # (B, T)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    loss = pg_loss + vf_coef * vf_loss
    with torch.no_grad():
        metrics = {
            "loss/policy_avg": pg_loss.detach(),
            "loss/value_avg": vf_loss.detach(),
            "policy/clipfrac_avg": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "val/clipfrac_avg": masked_mean((vf_losses_clipped > vf_losses).float(), mask),
            "policy/approxkl_avg": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
            "val/ratio": masked_mean(ratio.detach(), mask),
        }
    return loss, metrics


def kl_penalty(
    old_per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, kl_estimator: Literal["k1", "k3"]
) -> torch.Tensor:
    """Per-token KL(pi_old || pi_ref) estimates (http://joschu.net/blog/kl-approx.html), (B, T).

    >>> old, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.0]]) + torch.tensor(2.0).log()  # pi_ref / pi_old = 2
    >>> kl_penalty(old, ref, "k1")  # log pi_old - log pi_ref = -ln 2
    tensor([[-0.6931]])
    >>> kl_penalty(old, ref, "k3")  # 2 - 1 - ln 2
    tensor([[0.3069]])
    """
    log_ratio = ref_per_token_logps - old_per_token_logps
    if kl_estimator == "k1":
        return -log_ratio
    if kl_estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimator must be one of ['k1', 'k3'], got {kl_estimator!r}")


def vllm_importance_sampling_ratio(
    old_per_token_logps: torch.Tensor,
    sampler_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    level: Literal["token", "sequence"] = "token",
    mode: Literal["truncate", "mask"] = "truncate",
    cap: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights pi_old / pi_sampler for an engine (vLLM) that samples from slightly
    different numbers than the trainer (a copy of GRPO's, same names and behaviour).

    Returns ``(weights, metrics)``: weights (B, T) or (B, 1), detached; ``sampling/logp_diff/mean|max``
    and ``sampling/importance_ratio/min|mean|max``.
    """
    mask = completion_mask.bool()
    log_diff = (old_per_token_logps - sampler_per_token_logps).masked_fill(~mask, 0.0)  # (B, T)
    if level == "token":
        log_weights, kept = log_diff, mask  # (B, T)
    elif level == "sequence":  # the whole completion's probability ratio
        log_weights, kept = log_diff.sum(-1, keepdim=True), mask.any(-1, keepdim=True)  # (B, 1)
    else:
        raise ValueError(f"vllm_importance_sampling_level must be one of ['token', 'sequence'], got {level!r}")
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
class PPOModule(L.LightningModule):
    """PPO with a learned value model, GAE, and a KL penalty to a reference folded into the reward.

    Args:
        model_name_or_path: hub id or local directory of the policy.
        value_model_name_or_path: checkpoint of the value model, loaded as an
            ``AutoModelForSequenceClassification`` with one output (a reward model export is a good
            start); default: ``model_name_or_path`` (its trunk, with a freshly initialised head).
        value_init_seed: seed of the value model's random initialisation (its head, or all of it
            with ``random_init``); default ``init_seed``.
        tokenizer_name_or_path: tokenizer location when it differs from the model's.
        random_init: build the policy (and the value model, unless ``value_model_name_or_path`` is
            given: that checkpoint is loaded) from its config with random weights.
        model_config: config fields to override (policy and value model).
        init_seed: seed of the policy's random initialisation.
        dtype / attn_implementation / gradient_checkpointing / trust_remote_code: as in GRPO, for
            both models.
        lora: LoRA adapter settings of the policy; None for full fine-tuning. The value model is
            always trained in full.
        quantization: QLoRA for the policy: load its base in 4-bit or 8-bit (transformers'
            ``BitsAndBytesConfig`` fields); needs ``lora``. The value model stays unquantized. See docs/qlora.md.
        reward_funcs: reward functions ``(prompts, completions, **columns) -> list[float | None]``
            (YAML: import paths, or ``class_path`` + ``init_args``, e.g.
            `lit_posttrain.rewards.model.RewardModelScorer`); their weighted sum is the score.
        reward_weights: one weight per reward function (default: all 1).
        max_completion_length: new tokens per completion at most (TRL's ``response_length``).
        temperature / top_p / top_k: sampling settings (TRL's PPO default temperature 0.7).
        num_ppo_epochs: passes of updates over each generation batch.
        num_mini_batches: optimizer steps per pass (shuffled mini-batches).
        micro_batch_size: completions per forward/backward (gradient accumulation); None: the whole
            mini-batch.
        kl_coef: coefficient of the per-token KL penalty in the reward (0: no reference model).
        kl_estimator: ``"k1"`` (log pi_old - log pi_ref) or ``"k3"``.
        cliprange: policy ratio clip range.
        cliprange_value: value clip range around the old values.
        vf_coef: weight of the value loss.
        gamma / lam: GAE discount and lambda.
        whiten_rewards: whiten the per-token rewards (scale only) before GAE.
        missing_eos_penalty: subtracted from the score of completions without an EOS.
        vllm_importance_sampling_correction / _level / _mode / _cap: the rollout mismatch correction
            (TRL's GRPO names; see the module docstring).
        max_grad_norm: clip the gradient norm (policy and value together) at each optimizer step.
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback unless there is one.
        optimizer: optimizer factory, over the policy's and the value model's trainable parameters
            (default AdamW at 3e-6, fused as TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.

    Metrics (``train/``, one row per generation batch, over every rank's samples): at generation,
    TRL's ``objective/kl`` (the KL estimate summed over a completion, mean over completions),
    ``objective/entropy`` (the sampled tokens' -log pi_old summed over a completion),
    ``objective/non_score_reward`` (-kl_coef x objective/kl), ``objective/scores`` (the mean score,
    after ``missing_eos_penalty``), ``objective/rlhf_reward`` (scores + non-score reward),
    ``val/num_eos_tokens``; as GRPO, ``reward`` (the weighted reward before the penalty),
    ``rewards/<function>/mean|std``, ``completions/mean_length|min_length|max_length|clipped_ratio``,
    ``num_tokens``. Over the updates (token-weighted means): ``loss/policy_avg``, ``loss/value_avg``,
    ``policy/clipfrac_avg``, ``val/clipfrac_avg``, ``policy/approxkl_avg``, ``val/ratio``,
    ``policy/entropy_avg``, ``loss``; ``grad_norm`` and ``learning_rate`` of the last optimizer step.
    Validation: ``val/reward``, ``val/rewards/<function>/mean``, ``val/completions/mean_length``.
    """

    METHOD = "PPO"
    PAPER = "https://arxiv.org/abs/1707.06347"

    def __init__(
        self,
        model_name_or_path: str,
        *,
        value_model_name_or_path: str | None = None,
        value_init_seed: int | None = None,
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
        max_completion_length: int = 53,
        temperature: float = 0.7,
        top_p: float = 1.0,
        top_k: int = 0,
        num_ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        micro_batch_size: int | None = None,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_rewards: bool = False,
        missing_eos_penalty: float | None = None,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_level: Literal["token", "sequence"] = "token",
        vllm_importance_sampling_mode: Literal["truncate", "mask"] = "truncate",
        vllm_importance_sampling_cap: float = 3.0,
        max_grad_norm: float | None = 1.0,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=3e-6, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        # reward functions are code (a reward model would put its weights in every checkpoint)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "reward_funcs"])
        if not reward_funcs:
            raise ValueError("reward_funcs: give at least one reward function")
        check_reward_funcs(reward_funcs, columns=None)  # signatures now; dataset columns in setup
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(f"reward_weights has {len(reward_weights)} values for {len(reward_funcs)} reward_funcs")
        if kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be one of ['k1', 'k3'], got {kl_estimator!r}")
        for name, value in [("num_ppo_epochs", num_ppo_epochs), ("num_mini_batches", num_mini_batches)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in [("cliprange", cliprange), ("cliprange_value", cliprange_value), ("kl_coef", kl_coef)]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
        if missing_eos_penalty is not None and missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {missing_eos_penalty}")
        if vllm_importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                "vllm_importance_sampling_level must be one of ['token', 'sequence'], "
                f"got {vllm_importance_sampling_level!r}"
            )
        if vllm_importance_sampling_mode not in ("truncate", "mask"):
            raise ValueError(
                f"vllm_importance_sampling_mode must be one of ['truncate', 'mask'], got {vllm_importance_sampling_mode!r}"
            )
        if vllm_importance_sampling_cap < 1.0:
            raise ValueError(f"vllm_importance_sampling_cap must be >= 1, got {vllm_importance_sampling_cap}")
        # TRL's PPO disables dropout in every model: log-probs and values are reproducible
        self.model = load_model(
            model_name_or_path, random_init=random_init, model_config=model_config, init_seed=init_seed,
            dtype=dtype, attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code, lora=lora, quantization=quantization, disable_dropout=True,
        )  # fmt: skip
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path, trust_remote_code=trust_remote_code)
        self.value_model = load_model(
            value_model_name_or_path or model_name_or_path, task="sequence-classification", num_labels=1,
            random_init=random_init and value_model_name_or_path is None,  # a given value checkpoint is loaded
            model_config=model_config, init_seed=init_seed if value_init_seed is None else value_init_seed,
            dtype=dtype, attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code, pad_token_id=self.tokenizer.pad_token_id, disable_dropout=True,
        )  # fmt: skip
        self.rollout = HFRollout(self.tokenizer)
        self.reward_funcs = list(reward_funcs)
        self.reward_func_names = _unique([reward_func_name(f) for f in self.reward_funcs])
        self.hparams["reward_func_names"] = self.reward_func_names
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)
        self.max_completion_length = max_completion_length
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.num_ppo_epochs, self.num_mini_batches = num_ppo_epochs, num_mini_batches
        self.micro_batch_size = micro_batch_size
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.gamma, self.lam = gamma, lam
        self.whiten_rewards, self.missing_eos_penalty = whiten_rewards, missing_eos_penalty
        self.vllm_importance_sampling_correction = vllm_importance_sampling_correction
        self.vllm_importance_sampling_level = vllm_importance_sampling_level
        self.vllm_importance_sampling_mode = vllm_importance_sampling_mode
        self.vllm_importance_sampling_cap = vllm_importance_sampling_cap
        self.max_grad_norm = max_grad_norm
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        self.automatic_optimization = False  # generation, then num_ppo_epochs x num_mini_batches steps
        self.num_tokens = 0  # prompt + completion tokens trained on, all ranks (saved in checkpoints)
        self.generator: torch.Generator | None = None  # this rank's sampling RNG, created in setup
        self.val_reward = MeanMetric(nan_strategy="ignore")
        self.val_rewards_per_func = torch.nn.ModuleList(MeanMetric(nan_strategy="ignore") for _ in reward_funcs)
        self.val_completion_length = MeanMetric()

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard each decoder layer, then the root, of both models."""
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for model in (self.model, self.value_model):
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)

    def forward(self, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool = False):
        """(N, C) log-probs of the last C = ``logits_to_keep`` tokens of ``input_ids`` under the
        temperature-scaled policy, and their (N, C) entropies (no grad) if ``compute_entropy``, else None."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep + 1,
            use_cache=False,
        ).logits[:, :-1]  # (N, C, V): position t predicts completion token t
        logits = logits / self.temperature
        per_token_logps = selective_log_softmax(logits, input_ids[:, -logits_to_keep:])  # (N, C)
        entropies = None
        if compute_entropy:
            with torch.no_grad():
                entropies = entropy_from_logits(logits)  # (N, C)
        return per_token_logps, entropies

    def values(self, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
        """(N, C) value estimates at the state before each of the last C tokens (TRL's ``get_reward``:
        the score head applied to the trunk's last hidden state at every position)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        trunk = getattr(self.value_model, self.value_model.base_model_prefix)
        hidden = trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, -(logits_to_keep + 1) : -1]  # (N, C, H): the state before token t
        return self.value_model.score(hidden).squeeze(-1).float()  # (N, C)

    def training_step(self, batch, batch_idx):
        mini_batch_size, micro_batch_size = self._split_sizes(len(batch["prompt_ids"]))
        # 1. generate one completion per prompt with the current policy (N = B)
        with sampling_rng(self.generator):
            rollout = self.rollout.generate(
                self.model, batch["prompt_ids"], num_generations=1,
                max_completion_length=self.max_completion_length, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k,
            )  # fmt: skip
        # 2. pack the samples into tensors: (N, P+C), (N, P+C), (N, C)
        input_ids, attention_mask, completion_mask = self._pack(batch["prompt_ids"], rollout)
        # 3. score every completion with every reward function, NaN where one does not apply
        prompts, completions, columns = batch["prompt"], self._completions(batch["prompt"], rollout), batch["columns"]
        rewards_per_func = score_completions(
            self.reward_funcs, prompts, completions, completion_ids=rollout.completion_ids, columns=columns,
            trainer_state=self._trainer_state(),
        ).to(self.device)  # (N, F) fmt: skip
        # 4. the score: weighted sum over the functions, minus missing_eos_penalty; unscorable rows take no loss
        rewards = self._combine(rewards_per_func)  # (N,), NaN where no function applies
        truncated = torch.tensor(rollout.truncated, device=self.device)  # (N,) no EOS sampled
        scores = rewards.nan_to_num(nan=0.0)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * truncated.float()
        completion_mask = completion_mask * (~rewards.isnan()).unsqueeze(1).long()
        # 5. old log-probs, reference log-probs and old values (no grad)
        C = completion_mask.size(1)
        old_per_token_logps, old_values = self._old_logps_and_values(input_ids, attention_mask, C, micro_batch_size)
        kl = torch.zeros_like(old_per_token_logps)  # (N, C)
        if self.kl_coef != 0.0:
            ref_per_token_logps = self._ref_per_token_logps(input_ids, attention_mask, C, micro_batch_size)
            kl = kl_penalty(old_per_token_logps, ref_per_token_logps, self.kl_estimator) * completion_mask
        # 6. per-token rewards: -kl_coef x KL, plus the score on the last completion token
        non_score_rewards = -self.kl_coef * kl  # (N, C)
        per_token_rewards = non_score_rewards.clone()
        last = (completion_mask.sum(1) - 1).clamp(min=0)  # (N,) index of the last completion token
        per_token_rewards[torch.arange(len(last), device=self.device), last] += scores * completion_mask.any(1)
        if self.whiten_rewards:
            per_token_rewards = self._whiten(per_token_rewards, completion_mask, shift_mean=False) * completion_mask
        # 7. GAE advantages and returns, advantages whitened over every rank's completion tokens
        advantages, returns = gae_advantages(
            per_token_rewards, old_values, completion_mask, gamma=self.gamma, lam=self.lam, whiten=False
        )  # (N, C), (N, C)
        advantages = self._whiten(advantages, completion_mask) * completion_mask
        # 8. importance-sampling correction (vLLM): the weights multiply the advantages (see the docstring)
        sampling_metrics = {}
        if self.vllm_importance_sampling_correction and rollout.logps is not None:
            importance_sampling_ratio, sampling_metrics = self._importance_sampling_correction(
                old_per_token_logps, rollout, completion_mask
            )
            advantages = advantages * importance_sampling_ratio
        # 9. num_ppo_epochs passes of num_mini_batches optimizer steps over the samples
        samples = {
            "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "advantages": advantages, "returns": returns, "old_per_token_logps": old_per_token_logps,
            "old_values": old_values,
        }  # fmt: skip
        losses, weighted_metrics = self._policy_updates(samples, mini_batch_size, micro_batch_size)
        # 10. metrics: the generation batch's over every rank's samples
        lengths = torch.tensor([len(ids) for ids in rollout.completion_ids])  # (N,)
        all_rewards_per_func, all_lengths, all_truncated, all_num_tokens, all_objectives = self._all_gather_samples(
            rewards_per_func, lengths, truncated, attention_mask.sum(1),
            torch.stack([
                kl.sum(1), (-old_per_token_logps * completion_mask).sum(1), non_score_rewards.sum(1), scores,
                self._num_eos_tokens(rollout),
            ], dim=1),
        )  # (M, F), (M,), (M,), (M,), (M, 5) with M = world_size * N fmt: skip
        self.num_tokens += int(all_num_tokens.sum())  # prompt + completion tokens, all ranks
        metrics = self._generation_metrics(all_rewards_per_func, all_lengths, all_truncated)
        all_kl, all_entropy, all_non_score, all_scores, all_eos = all_objectives.T
        metrics |= {
            "objective/kl": all_kl.mean(),
            "objective/entropy": all_entropy.mean(),
            "objective/non_score_reward": all_non_score.mean(),
            "objective/rlhf_reward": all_non_score.mean() + all_scores.mean(),
            "objective/scores": all_scores.mean(),
            "val/num_eos_tokens": all_eos.sum(),
        }
        metrics |= sampling_metrics | self._mean_over_micro_batches(weighted_metrics)
        metrics["loss"] = torch.stack(losses).mean()  # each step's loss is already its global token mean
        for name, value in metrics.items():
            self.log(f"train/{name}", value, prog_bar=name in ("reward", "loss"))
        self.log("train/num_tokens", float(self.num_tokens))

    def validation_step(self, batch, batch_idx):
        rollout = self.rollout.generate(
            self.model,
            batch["prompt_ids"],
            num_generations=1,
            max_completion_length=self.max_completion_length,
            do_sample=False,
        )
        completions = self._completions(batch["prompt"], rollout)
        rewards_per_func = score_completions(
            self.reward_funcs,
            batch["prompt"],
            completions,
            completion_ids=rollout.completion_ids,
            columns=batch["columns"],
            trainer_state=self._trainer_state(),
        )  # (N, F)
        self.val_reward.update(self._combine(rewards_per_func))
        for metric, values in zip(self.val_rewards_per_func, rewards_per_func.T):
            metric.update(values)
        self.val_completion_length.update(torch.tensor([len(ids) for ids in rollout.completion_ids], dtype=torch.float))
        self.log("val/reward", self.val_reward, prog_bar=True)
        for name, metric in zip(self.reward_func_names, self.val_rewards_per_func):
            self.log(f"val/rewards/{name}/mean", metric)
        self.log("val/completions/mean_length", self.val_completion_length)

    def configure_optimizers(self):
        # one optimizer over the policy and the value model (TRL's PolicyAndValueWrapper)
        optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, WarmupDecayLR) and scheduler.num_training_steps is None:
            # estimated_stepping_batches counts generation batches (capped at max_steps, which counts
            # optimizer steps); each makes num_ppo_epochs x num_mini_batches optimizer steps
            num_steps = self.trainer.estimated_stepping_batches * self._steps_per_batch()
            if self.trainer.max_steps != -1:
                num_steps = min(num_steps, self.trainer.max_steps)
            scheduler.set_num_training_steps(num_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, PPODataModule) and datamodule.train_examples:
            columns = [c for c in datamodule.train_examples[0] if c not in ("prompt", "prompt_ids")]
            check_reward_funcs(self.reward_funcs, columns=columns)
        # this rank's sampling RNG (generation, mini-batch shuffling), seeded from the global seed and
        # the rank, saved in checkpoints: a resumed run samples what the uninterrupted one would
        self.generator = torch.Generator(self.trainer.strategy.root_device)
        self.generator.manual_seed(torch.initial_seed() + self.global_rank)

    def configure_callbacks(self):
        # Lightning rejects these options under manual optimization with a generic error: name ours
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
        # kl_coef > 0 needs a reference: the user's ReferenceModel callback, else one with defaults
        if self.kl_coef != 0.0 and not any(isinstance(c, ReferenceModel) for c in self.trainer.callbacks):
            callbacks.append(ReferenceModel())
        if self.diagnostics and not any(isinstance(c, TrainingDiagnostics) for c in self.trainer.callbacks):
            callbacks.append(TrainingDiagnostics())
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["num_tokens"] = self.num_tokens
        # every rank's sampling RNG state (this hook runs on every rank; the strategy writes rank 0's dict)
        state = self.generator.get_state().to(self.device)
        checkpoint["generator_states"] = self.trainer.strategy.all_gather(state).view(self.trainer.world_size, -1).cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.num_tokens = checkpoint.get("num_tokens", 0)
        states = checkpoint.get("generator_states")
        if states is None or self.generator is None:  # load_from_checkpoint
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(
                f"{self.METHOD}: the checkpoint holds the sampling RNG states of {len(states)} processes, this run "
                f"has {self.trainer.world_size}: sampling restarts from the seed (not an exact continuation)"
            )
            return
        self.generator.set_state(states[self.global_rank].clone())

    def export_value_model(self, dirpath: str | Path) -> Path:
        """Write the value model as a plain Hugging Face directory (``AutoModelForSequenceClassification``,
        one output, plus the tokenizer); the policy is what `HubExport` exports. Single process or DDP
        (every rank may call it; rank 0 writes). Returns ``dirpath``."""
        dirpath = Path(dirpath)
        if self.trainer is None or self.trainer.is_global_zero:
            self.value_model.save_pretrained(dirpath)
            self.tokenizer.save_pretrained(dirpath)
        return dirpath

    # -----------------------------------------------------------------------------------------
    # Helpers, in the order training_step calls them
    # -----------------------------------------------------------------------------------------
    def _split_sizes(self, num_prompts: int) -> tuple[int, int]:
        """(mini-batch, micro-batch) sizes in completions; raises naming the options to change."""
        steps = self.num_mini_batches
        micro = self.micro_batch_size or num_prompts // max(steps, 1)
        if num_prompts % steps or micro < 1 or (num_prompts // steps) % micro:
            raise ValueError(
                f"{self.METHOD}: a generation batch of data.batch_size ({num_prompts}) completions must split into "
                f"model.num_mini_batches ({steps}) optimizer steps of whole micro-batches of model.micro_batch_size "
                f"({self.micro_batch_size}) completions, i.e. be divisible by {steps * max(micro, 1)}. Change "
                "data.batch_size, model.num_mini_batches or model.micro_batch_size."
            )
        return num_prompts // steps, micro

    def _pack(self, prompt_ids: list[list[int]], rollout: RolloutOutput):
        """Each prompt left-padded, then its completion right-padded: (N, P+C), (N, P+C) and the (N, C)
        completion mask."""
        prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
        completions = [torch.tensor(ids, dtype=torch.long) for ids in rollout.completion_ids]
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompts], 0, "left")  # (N, P)
        completion_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in completions], 0)  # (N, C)
        pad_token_id = self.tokenizer.pad_token_id
        input_ids = torch.cat([pad(prompts, pad_token_id, "left"), pad(completions, pad_token_id)], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (N, P+C)
        return input_ids.to(self.device), attention_mask.to(self.device), completion_mask.to(self.device)

    def _completions(self, prompts: list, rollout: RolloutOutput) -> list:
        """Completions as reward functions see them: strings, or an assistant message for chat prompts."""
        if is_conversational(prompts[0]):
            return [[{"role": "assistant", "content": text}] for text in rollout.completions]
        return list(rollout.completions)

    def _trainer_state(self) -> TrainerState:
        return TrainerState(global_step=self.global_step, epoch=self.current_epoch, max_steps=self.trainer.max_steps)

    def _steps_per_batch(self) -> int:
        """Optimizer steps per generation batch."""
        return self.num_ppo_epochs * self.num_mini_batches

    def _combine(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N,) weighted nansum; NaN where no function applies (unscorable)."""
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        return rewards.masked_fill(rewards_per_func.isnan().all(dim=1), float("nan"))

    @torch.no_grad()
    def _old_logps_and_values(self, input_ids, attention_mask, logits_to_keep: int, micro_batch_size: int):
        """(N, C) log-probs under the policy before any update and (N, C) values, by micro-batches."""
        logps, values = [], []
        for ids, mask in zip(input_ids.split(micro_batch_size), attention_mask.split(micro_batch_size)):
            logps.append(self(ids, mask, logits_to_keep)[0])
            values.append(self.values(ids, mask, logits_to_keep))
        return torch.cat(logps), torch.cat(values)

    @torch.no_grad()
    def _ref_per_token_logps(self, input_ids, attention_mask, logits_to_keep: int, micro_batch_size: int):
        """(N, C) log-probs of the last C tokens under the temperature-scaled reference, by micro-batches."""
        reference = find_reference_model(self.trainer, self.METHOD)
        per_token_logps = []
        for ids, mask in zip(input_ids.split(micro_batch_size), attention_mask.split(micro_batch_size)):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = reference.forward(ids, mask, position_ids, logits_to_keep=logits_to_keep + 1)[:, :-1]
            per_token_logps.append(selective_log_softmax(logits / self.temperature, ids[:, -logits_to_keep:]))
        return torch.cat(per_token_logps)

    def _whiten(self, values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """`masked_whiten` with the mean and Bessel-corrected variance over every rank's masked values."""
        mask = mask.to(values.dtype)
        reduce = self.trainer.strategy.reduce
        total, count = reduce(torch.stack([(values * mask).sum(), mask.sum()]), reduce_op="sum")
        if count < 2:  # nothing (or one token) to learn from, e.g. every completion unscorable: no signal
            return torch.zeros_like(values)
        mean = total / count
        var = reduce((((values - mean) * mask) ** 2).sum(), reduce_op="sum") / (count - 1)
        return masked_whiten(values, mask, shift_mean=shift_mean, mean=mean, var=var)

    def _importance_sampling_correction(self, old_per_token_logps, rollout: RolloutOutput, completion_mask):
        """Truncated pi_old / pi_sampler weights (N, C) or (N, 1) and their ``sampling/*`` metrics over ranks."""
        sampler_per_token_logps = pad([torch.tensor(lp) for lp in rollout.logps], 0.0)  # (N, C)
        weights, metrics = vllm_importance_sampling_ratio(
            old_per_token_logps,
            sampler_per_token_logps.to(self.device),
            completion_mask,
            level=self.vllm_importance_sampling_level,
            mode=self.vllm_importance_sampling_mode,
            cap=self.vllm_importance_sampling_cap,
        )
        for name, value in metrics.items():  # this rank's samples: min / max / mean over ranks
            reduce_op = "min" if name.endswith("/min") else "max" if name.endswith("/max") else "mean"
            metrics[name] = self.trainer.strategy.reduce(value, reduce_op=reduce_op)
        return weights, metrics

    def _policy_updates(self, samples: dict, mini_batch_size: int, micro_batch_size: int):
        """``num_ppo_epochs`` passes of ``num_mini_batches`` optimizer steps over the samples (shuffled
        each pass, from the sampling RNG, as TRL). Returns each step's loss and each micro-batch's
        weighted metrics."""
        optimizer, lr_scheduler = self.optimizers(), self.lr_schedulers()
        num_samples = samples["advantages"].size(0)
        losses, weighted_metrics = [], []
        for _ in range(self.num_ppo_epochs):
            order = torch.randperm(num_samples, generator=self.generator, device=self.generator.device)
            for mini_batch in order.split(mini_batch_size):
                step_loss, step_metrics = self._accumulate_gradients(samples, mini_batch.to(self.device), micro_batch_size)
                losses.append(step_loss)
                weighted_metrics += step_metrics
                self._optimizer_step(optimizer, lr_scheduler)
        return losses, weighted_metrics

    def _accumulate_gradients(self, samples: dict, mini_batch: torch.Tensor, micro_batch_size: int):
        """Forward and backward over one optimizer step's samples in micro-batches. The loss of each
        micro-batch (a mean over its tokens) is weighted into a mean over the step's tokens on every rank."""
        # DDP averages gradients over ranks: dividing each rank's token sum by the ranks' mean token
        # count makes the average the sum over all ranks / all tokens
        num_items_in_batch = self.trainer.strategy.reduce(
            samples["completion_mask"][mini_batch].sum().float(), reduce_op="mean"
        ).clamp(min=1)
        step_loss, weighted_metrics = 0.0, []
        for micro_batch in mini_batch.split(micro_batch_size):
            micro_samples = {k: v[micro_batch] for k, v in samples.items()}
            loss, metrics = self._compute_loss(micro_samples)
            scale = micro_samples["completion_mask"].sum() / num_items_in_batch
            self.manual_backward(loss * scale)
            step_loss += loss.detach() * scale
            weighted_metrics.append(self._weigh(metrics, micro_samples["completion_mask"]))
        return self.trainer.strategy.reduce(step_loss, reduce_op="mean"), weighted_metrics

    def _compute_loss(self, samples: dict):
        """`ppo_loss` of one micro-batch under the current policy and value model, plus ``policy/entropy_avg``."""
        completion_mask = samples["completion_mask"]  # (n, C)
        C = completion_mask.size(1)
        per_token_logps, entropies = self(samples["input_ids"], samples["attention_mask"], C, compute_entropy=True)
        values = self.values(samples["input_ids"], samples["attention_mask"], C)  # (n, C)
        loss, metrics = ppo_loss(
            per_token_logps,
            samples["old_per_token_logps"],
            samples["advantages"],
            values,
            samples["old_values"],
            samples["returns"],
            completion_mask,
            cliprange=self.cliprange,
            cliprange_value=self.cliprange_value,
            vf_coef=self.vf_coef,
        )
        metrics["policy/entropy_avg"] = masked_mean(entropies, completion_mask)
        return loss, metrics

    def _weigh(self, metrics: dict[str, torch.Tensor], completion_mask: torch.Tensor) -> dict:
        """Each micro-batch metric (a mean over its completion tokens) as (2,) ``[value * count, count]``."""
        count = completion_mask.sum()
        return {
            name: torch.stack([value * count, torch.as_tensor(count, dtype=value.dtype, device=value.device)])
            for name, value in metrics.items()
        }

    def _optimizer_step(self, optimizer, lr_scheduler) -> None:
        """Clip the gradient norm to ``max_grad_norm``, step the optimizer, zero the grads, step the LR."""
        self.log("train/grad_norm", finite_grad_norm(self.parameters(), self.global_step))  # before clipping, as TRL logs it
        self.log("train/learning_rate", float(optimizer.param_groups[0]["lr"]))
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad()
        if lr_scheduler is not None:
            lr_scheduler.step()

    def _num_eos_tokens(self, rollout: RolloutOutput) -> torch.Tensor:
        """(N,) 1 where a completion ended with an EOS (TRL's ``val/num_eos_tokens`` sums them)."""
        return torch.tensor([0.0 if t or not ids else 1.0 for ids, t in zip(rollout.completion_ids, rollout.truncated)])

    def _all_gather_samples(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's per-sample values, as float, in one collective: (N,) or (N, k) each ->
        (world_size * N,) or (world_size * N, k), rank by rank."""
        widths = [1 if value.dim() == 1 else value.size(1) for value in values]
        per_sample = torch.cat([v.to(self.device, torch.float).reshape(v.size(0), -1) for v in values], 1)
        per_sample = self.all_gather(per_sample).reshape(-1, per_sample.size(1))  # (world_size * N, K)
        columns = per_sample.split(widths, dim=1)
        return [column.squeeze(1) if value.dim() == 1 else column for column, value in zip(columns, values)]

    def _generation_metrics(self, all_rewards_per_func, all_lengths, all_truncated) -> dict[str, torch.Tensor]:
        """Rewards and completion lengths of every rank's samples: (M, F), (M,), (M,)."""
        metrics = {
            "reward": self._combine(all_rewards_per_func).nanmean(),
            "completions/mean_length": all_lengths.mean(),
            "completions/min_length": all_lengths.min(),
            "completions/max_length": all_lengths.max(),
            "completions/clipped_ratio": all_truncated.mean(),
        }
        for name, values in zip(self.reward_func_names, all_rewards_per_func.T):
            metrics[f"rewards/{name}/mean"] = values.nanmean()
            metrics[f"rewards/{name}/std"] = _nanstd(values)
        return metrics

    def _mean_over_micro_batches(self, weighted_metrics: list[dict]) -> dict[str, torch.Tensor]:
        """Each metric's mean weighted over all micro-batches and ranks, in one collective."""
        names = list(weighted_metrics[0])
        sums = [torch.stack([weighted[name] for weighted in weighted_metrics]).sum(0) for name in names]
        totals = self.trainer.strategy.reduce(torch.stack(sums), reduce_op="sum")  # (metrics, 2)
        return {name: value_sum / weight.clamp(min=1) for name, (value_sum, weight) in zip(names, totals)}


def _nanstd(values: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN with fewer than two values)."""
    kept = values[~values.isnan()]
    return kept.std() if kept.numel() > 1 else values.new_tensor(float("nan"))


def _unique(names: list[str]) -> list[str]:
    """Suffix repeated names (two instances of one reward class) so their metrics stay apart."""
    return [name if names.count(name) == 1 else f"{name}_{names[:i].count(name)}" for i, name in enumerate(names)]
