"""Online DPO: DPO on pairs the policy samples during training, ranked by reward functions
(Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", https://arxiv.org/abs/2402.04792).

For each prompt x the current policy samples two completions y_1, y_2; reward functions score them
(``missing_eos_penalty`` is subtracted first from a completion that never emitted EOS), the higher
score is the chosen completion y_w, the other the rejected y_l (a tie makes y_1 the chosen, as TRL).
The policy then takes a DPO step against the frozen reference (paper §3, Algorithm 1):

    h      = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))   summed log-probs
    sigmoid: L = -log sigmoid(beta * h)                                               (DPO eq. 7)
    ipo:     L = (h - 1 / (2 beta))^2                                                 (IPO eq. 17)

averaged over the pairs of the batch (`online_dpo_loss`). The implicit rewards are
``beta * (log pi - log pi_ref)`` of each completion (``rewards/chosen|rejected``).

Numbered departures from the paper (TRL's OnlineDPOTrainer conventions unless said otherwise):
1. The annotator is a set of reward functions (callables, or a learned reward model through
   `lit_posttrain.rewards.model.RewardModelScorer`), not an LLM judge; several functions are
   combined by a weighted sum with ``None`` skipped (``nansum``). A pair with an unscorable sample
   (no function applies) takes no loss.
2. ``ipo`` uses the summed log-ratios as TRL's OnlineDPOTrainer does (DPOModule's ``ipo`` divides
   each log-ratio by its completion length): ``online_dpo_loss(..., loss_type="ipo")`` equals
   ``dpo_loss(..., loss_type="ipo", chosen_num_tokens=1, rejected_num_tokens=1)``.
3. ``beta`` may be a list: one value per epoch, the last one for every later epoch (TRL).
4. Log-probs are the policy's own (temperature 1), whatever the sampling ``temperature`` (TRL).
5. One generation batch per ``training_step`` and Lightning's automatic optimization: with
   ``trainer.accumulate_grad_batches`` each accumulated batch samples its own completions (TRL
   samples per micro-batch too); clip with ``trainer.gradient_clip_val`` (TRL's ``max_grad_norm``).
6. ``top_k`` defaults to 0 (off): TRL's docstring says 0, its dataclass field 30.
7. Validation samples one greedy completion per prompt and logs its reward (``val/reward``), as
   GRPO / RLOO here.

Training step (one generation batch):

    batch = data.batch_size prompts                               # from OnlineDPODataModule
    rollout = self.rollout.generate(self.model, prompt_ids, num_generations=2, ...)   # 2 per prompt
    rewards (- missing_eos_penalty) -> chosen / rejected per prompt
    policy log-probs (grad) and reference log-probs (no grad) of all 2B completions
    loss = online_dpo_loss(chosen, rejected, ref_chosen, ref_rejected).mean()   # Lightning steps

Rollout engines: ``self.rollout`` is `lit_posttrain.rollout.HFRollout` by default;
`lit_posttrain.callbacks.VLLMRollout` swaps in a vLLM engine (colocate or server) kept equal to the
policy after every optimizer step. The engine's log-probs are not used (no importance-sampling
correction: the DPO loss has no ratio to the sampler).

Supports: plain and conversational prompts, extra dataset columns passed to reward functions,
several weighted reward functions, LoRA (the reference is the base model with adapters disabled),
DDP and FSDP2 (``ModelParallelStrategy``), HF and vLLM rollouts.
Assumes: a tokenizer with a pad token; the reference from a `lit_posttrain.callbacks.ReferenceModel`
callback (added with defaults when the Trainer has none; ``precompute_ref_logps`` does not apply to
online samples and is refused).

    lit-posttrain fit --config configs/quickstart/online_dpo.yaml
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
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
from lit_posttrain.ops import finite_grad_norm, pad, selective_log_softmax
from lit_posttrain.rewards import TrainerState, check_reward_funcs, reward_func_name, score_completions
from lit_posttrain.rollout import HFRollout, RolloutOutput, eos_ids, sampling_rng
from lit_posttrain.schedulers import WarmupDecayLR

warn_experimental(__name__)

LossType = Literal["sigmoid", "ipo"]
LOSS_TYPES = ("sigmoid", "ipo")


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
class OnlineDPODataModule(L.LightningDataModule):
    """Load, check and tokenize prompt-only data; batch ``batch_size`` prompts per generation batch.

    Rows need a ``prompt`` (a string, or a list of messages rendered with the chat template and
    ``add_generation_prompt=True``); every other column (``answer``, ...) is passed to the reward
    functions as a keyword list.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: prompts per generation batch (each sampled twice: ``2 * batch_size``
            completions per step). The last incomplete batch of an epoch is dropped.
        max_prompt_length: prompt tokens kept; longer prompts keep their end. None: all.
        num_workers: DataLoader workers.
        seed: shuffling seed.
        dataset_split: split to read from a hub dataset.
        val_dataset_split: split to read ``val_data`` from; default ``dataset_split``.
        dataset_config: hub dataset configuration name.
        columns: maps the expected column names to the data's (``{prompt: question}``).
        system_prompt: when set, each prompt becomes a conversation that starts with this system
            message (a plain prompt becomes the user message).
        trust_remote_code: let the tokenizer load code from its repository (off unless asked; the
            CLI sets it from the model's ``trust_remote_code``).

    >>> dm = OnlineDPODataModule("examples/tiny-model", [{"prompt": "1+1=", "answer": "2"}] * 4, batch_size=2)
    >>> dm.setup("fit")
    >>> sorted(next(iter(dm.train_dataloader())))
    ['columns', 'prompt', 'prompt_ids']
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
            raise ValueError(
                "OnlineDPODataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
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
        # LookaheadLoader: stateful, so a run resumed mid-epoch skips the prompts already used
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
# Loss
# ---------------------------------------------------------------------------------------------
def online_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses of online pairs (TRL's OnlineDPOTrainer).

    Args:
        chosen_logps, rejected_logps: (B,) policy log-probs of each completion, summed over its tokens.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference.
        beta: inverse temperature of the implicit reward (``tau`` in IPO: target margin ``1 / (2 beta)``).
        loss_type: ``sigmoid`` (DPO eq. 7) or ``ipo`` (IPO eq. 17 on summed log-ratios).
    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); rewards ``beta * (logps - ref_logps)``,
        detached. The loss to minimise is ``losses.mean()``.

    >>> t = torch.tensor
    >>> losses, chosen, rejected = online_dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    >>> round(losses.item(), 4), chosen.item(), rejected.item()  # -log sigmoid(0.5 * 2) = log(1 + e^-1)
    (0.3133, 0.5, -0.5)
    """
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    logits = chosen_logratios - rejected_logratios  # (B,) h in the DPO paper
    if loss_type == "sigmoid":
        # DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) eq. 7
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036) eq. 17, beta = tau; summed log-ratios (TRL)
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class OnlineDPOModule(L.LightningModule):
    """DPO on two completions per prompt sampled by the current policy and ranked by reward functions.

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
            `lit_posttrain.rewards.model.RewardModelScorer`). Not saved in checkpoints.
        reward_weights: one weight per reward function (default: all 1).
        max_new_tokens: new tokens per completion at most (TRL's name and default).
        temperature / top_p / top_k: sampling settings (``top_k=0``: off).
        beta: the DPO beta (IPO's tau), or a list with one value per epoch (the last one for every
            later epoch), as TRL.
        loss_type: ``sigmoid`` or ``ipo``.
        missing_eos_penalty: subtracted from the score of a completion without EOS (>= 0; None: off).
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback unless the Trainer
            has one; False opts out.
        optimizer: optimizer factory (default AdamW at TRL's 5e-7, fused as TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step. A
            `lit_posttrain.schedulers.WarmupDecayLR` without ``num_training_steps`` gets the run's steps.

    Metrics (``train/``, TRL's names, means over the batch and the ranks):
        ``loss``; ``objective/scores`` (mean score of all completions, after the EOS penalty; also
        logged as ``reward``), ``objective/scores_margin`` (chosen - rejected score),
        ``objective/kl`` (k1, summed over each completion, mean over completions),
        ``objective/entropy`` (-summed log-prob), ``objective/non_score_reward`` (-beta x kl),
        ``objective/rlhf_reward`` (scores + non_score_reward); ``rewards/chosen|rejected|margins|
        accuracies`` (implicit DPO rewards), ``logps/chosen|rejected`` (summed policy log-probs);
        ``val/contain_eos_token`` (fraction of completions with EOS; TRL's name, logged under
        ``train/``); ``beta``; ``rewards/<function>/mean``, ``completions/mean_length``,
        ``completions/clipped_ratio``, ``num_tokens``; ``grad_norm`` (before clipping) and
        ``learning_rate`` at each optimizer step. Validation: ``val/reward``,
        ``val/rewards/<function>/mean``, ``val/completions/mean_length`` (greedy, one per prompt).

    >>> from lit_posttrain.rewards import PatternFractionReward
    >>> module = OnlineDPOModule("examples/tiny-model", random_init=True,
    ...                          reward_funcs=[PatternFractionReward(pattern="[0-9]")], beta=[0.1, 0.05])
    >>> module.beta  # epoch 0
    0.1
    """

    METHOD = "Online DPO"
    PAPER = "https://arxiv.org/abs/2402.04792"

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
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float | list[float] = 0.1,
        loss_type: LossType = "sigmoid",
        missing_eos_penalty: float | None = None,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=5e-7, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        # reward functions are code (a reward model would put its weights in every checkpoint)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "reward_funcs"])
        if not reward_funcs:
            raise ValueError("reward_funcs: give at least one reward function")
        check_reward_funcs(reward_funcs, columns=None)  # signatures now, columns in setup
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(
                f"reward_weights has {len(reward_weights)} values for {len(reward_funcs)} reward_funcs"
            )
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
        _check_per_epoch("beta", beta, positive=True)
        if missing_eos_penalty is not None and missing_eos_penalty < 0:
            raise ValueError(
                f"missing_eos_penalty must be >= 0 (it is subtracted), got {missing_eos_penalty}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self._beta, self.loss_type = beta, loss_type
        self.missing_eos_penalty = missing_eos_penalty
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        self.num_tokens = 0  # prompt + completion tokens trained on, all ranks (saved in checkpoints)
        self.generator: torch.Generator | None = None  # this rank's sampling RNG, created in setup
        self.val_reward = MeanMetric(nan_strategy="ignore")
        self.val_rewards_per_func = torch.nn.ModuleList(
            MeanMetric(nan_strategy="ignore") for _ in reward_funcs
        )
        self.val_completion_length = MeanMetric()

    @property
    def beta(self) -> float:
        """This epoch's beta (a list gives one value per epoch, its last one for every later epoch)."""
        return _for_epoch(self._beta, self.current_epoch)

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard each decoder layer, then the root."""
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
        """(N, C) log-probs of the last C = ``logits_to_keep`` tokens of ``input_ids`` under the policy."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep + 1,
            use_cache=False,
        ).logits[:, :-1]  # (N, C, V): position t predicts completion token t
        return selective_log_softmax(logits, input_ids[:, -logits_to_keep:])  # (N, C)

    def training_step(self, batch, batch_idx):
        prompt_ids = batch["prompt_ids"]
        B = len(prompt_ids)
        # 1. two completions per prompt from the current policy (N = 2B rows, prompt-major)
        with sampling_rng(self.generator):
            rollout = self.rollout.generate(
                self.model, prompt_ids, num_generations=2, max_completion_length=self.max_new_tokens,
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            )  # fmt: skip
        # 2. pack: (2B, P+C), (2B, P+C), (2B, C)
        input_ids, attention_mask, completion_mask = self._pack(
            [ids for ids in prompt_ids for _ in range(2)], rollout.completion_ids
        )
        # 3. score both completions of every prompt; the EOS penalty first (TRL)
        prompts, completions, columns = self._reward_inputs(batch, rollout)
        rewards_per_func = score_completions(
            self.reward_funcs,
            prompts,
            completions,
            completion_ids=rollout.completion_ids,
            columns=columns,
            trainer_state=self._trainer_state(),
        ).to(self.device)  # (2B, F) fmt: skip
        contain_eos = self._contain_eos(rollout.completion_ids)  # (2B,)
        scores = self._combine(rewards_per_func)  # (2B,) NaN where no function applies
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~contain_eos).float()
        # 4. Online DPO: the higher score is chosen, the other rejected (a tie: the first is chosen, TRL)
        pairs = scores.view(B, 2)
        first_wins = pairs[:, 0] >= pairs[:, 1]  # (B,)
        rows = torch.arange(B, device=self.device) * 2
        chosen_idx, rejected_idx = rows + (~first_wins).long(), rows + first_wins.long()  # (B,), (B,)
        scorable = ~pairs.isnan().any(dim=1)  # (B,) a pair with an unscorable sample takes no loss
        # 5. summed log-probs of every completion: policy (grad) and reference (no grad)
        C = completion_mask.size(1)
        logps = (self(input_ids, attention_mask, C) * completion_mask).sum(-1)  # (2B,)
        ref_logps = (self._ref_per_token_logps(input_ids, attention_mask, C) * completion_mask).sum(
            -1
        )  # (2B,)
        # 6. the DPO loss of the (scorable) pairs
        beta = self.beta
        losses, chosen_rewards, rejected_rewards = online_dpo_loss(
            logps[chosen_idx],
            logps[rejected_idx],
            ref_logps[chosen_idx],
            ref_logps[rejected_idx],
            beta=beta,
            loss_type=self.loss_type,
        )  # (B,) each fmt: skip
        loss = (losses * scorable).sum() / scorable.sum().clamp(min=1)
        # 7. metrics (TRL's names)
        with torch.no_grad():
            kl = logps.detach() - ref_logps  # (2B,) k1 summed over each completion
            s = scorable
            margins = chosen_rewards - rejected_rewards
            metrics = {
                "loss": loss.detach(),
                "reward": scores.nanmean(),
                "objective/scores": scores.nanmean(),
                "objective/scores_margin": _masked_mean(pairs.max(1).values - pairs.min(1).values, s),
                "objective/kl": kl.mean(),
                "objective/entropy": -logps.detach().mean(),
                "objective/non_score_reward": (-beta * kl).mean(),
                "objective/rlhf_reward": (scores - beta * kl).nanmean(),
                "rewards/chosen": _masked_mean(chosen_rewards, s),
                "rewards/rejected": _masked_mean(rejected_rewards, s),
                "rewards/margins": _masked_mean(margins, s),
                "rewards/accuracies": _masked_mean((margins > 0).float(), s),
                "logps/chosen": _masked_mean(logps.detach()[chosen_idx], s),
                "logps/rejected": _masked_mean(logps.detach()[rejected_idx], s),
                "val/contain_eos_token": contain_eos.float().mean(),
                "beta": torch.tensor(float(beta)),
                "completions/mean_length": completion_mask.sum(1).float().mean(),
                "completions/clipped_ratio": torch.tensor(rollout.truncated, dtype=torch.float).mean(),
            }
            for name, values in zip(self.reward_func_names, rewards_per_func.T):
                metrics[f"rewards/{name}/mean"] = values.nanmean()
        for name, value in metrics.items():
            self.log(f"train/{name}", value.float().to(self.device), sync_dist=True,
                     prog_bar=name in ("reward", "loss"))  # fmt: skip
        num_tokens = self.trainer.strategy.reduce(attention_mask.sum().float(), reduce_op="sum")
        self.num_tokens += int(num_tokens)
        self.log("train/num_tokens", float(self.num_tokens))
        return loss

    def validation_step(self, batch, batch_idx):
        rollout = self.rollout.generate(
            self.model, batch["prompt_ids"], num_generations=1, max_completion_length=self.max_new_tokens,
            do_sample=False,
        )  # fmt: skip
        completions = self._completions(batch["prompt"], rollout)
        rewards_per_func = score_completions(
            self.reward_funcs,
            batch["prompt"],
            completions,
            completion_ids=rollout.completion_ids,
            columns=batch["columns"],
            trainer_state=self._trainer_state(),
        )  # (N, F) fmt: skip
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

    def configure_optimizers(self):
        optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, WarmupDecayLR) and scheduler.num_training_steps is None:
            scheduler.set_num_training_steps(
                self.trainer.estimated_stepping_batches
            )  # the run's optimizer steps
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # TRL's grad_norm (before clipping) and learning_rate, once per optimizer step
        self.log("train/grad_norm", finite_grad_norm(self.parameters(), self.global_step))
        self.log("train/learning_rate", float(optimizer.param_groups[0]["lr"]))

    def setup(self, stage: str) -> None:
        # the reward functions against the dataset's columns (the DataModule has set up by now)
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, OnlineDPODataModule) and datamodule.train_examples:
            columns = [c for c in datamodule.train_examples[0] if c not in ("prompt", "prompt_ids")]
            check_reward_funcs(self.reward_funcs, columns=columns)
        if stage == "fit" and find_reference_model(self.trainer, self.METHOD).precompute_ref_logps:
            raise ValueError(
                f"{self.METHOD}: ReferenceModel(precompute_ref_logps=True) does not apply: the completions are "
                "sampled during training, so there is nothing to precompute. Set precompute_ref_logps: false."
            )
        # sampling draws from this rank's own RNG stream, seeded from the global seed and the rank, and
        # saved in checkpoints, so a resumed run samples what the uninterrupted one would
        self.generator = torch.Generator(self.trainer.strategy.root_device)
        self.generator.manual_seed(torch.initial_seed() + self.global_rank)

    def configure_callbacks(self):
        callbacks = []
        # the reference: the user's ReferenceModel callback, else one with defaults
        if not any(isinstance(c, ReferenceModel) for c in self.trainer.callbacks):
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
        if states is None or self.generator is None:  # load_from_checkpoint
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(
                f"{self.METHOD}: the checkpoint holds the sampling RNG states of {len(states)} processes, this run "
                f"has {self.trainer.world_size}: sampling restarts from the seed (not an exact continuation)"
            )
            return
        self.generator.set_state(states[self.global_rank].clone())

    # -----------------------------------------------------------------------------------------
    # Helpers, in the order training_step calls them
    # -----------------------------------------------------------------------------------------
    def _pack(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]):
        """One row per (prompt, completion): the prompt left-padded, then the completion right-padded.

        Returns ``input_ids`` (N, P+C), ``attention_mask`` (N, P+C), ``completion_mask`` (N, C).
        """
        pad_token_id = self.tokenizer.pad_token_id
        prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
        completions = [torch.tensor(ids, dtype=torch.long) for ids in completion_ids]
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompts], 0, "left")  # (N, P)
        completion_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in completions], 0)  # (N, C)
        input_ids = torch.cat([pad(prompts, pad_token_id, "left"), pad(completions, pad_token_id)], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (N, P+C)
        return input_ids.to(self.device), attention_mask.to(self.device), completion_mask.to(self.device)

    def _reward_inputs(self, batch: dict, rollout: RolloutOutput) -> tuple[list, list, dict[str, list]]:
        """What reward functions see, one of each per completion: prompts, completions, dataset columns."""
        prompts = [prompt for prompt in batch["prompt"] for _ in range(2)]  # prompt-major, as the rollout
        columns = {
            name: [value for value in values for _ in range(2)] for name, values in batch["columns"].items()
        }
        return prompts, self._completions(prompts, rollout), columns

    def _trainer_state(self) -> TrainerState:
        """The training progress reward functions see (``trainer_state=``, TRL's field names)."""
        return TrainerState(
            global_step=self.global_step, epoch=self.current_epoch, max_steps=self.trainer.max_steps
        )

    def _completions(self, prompts: list, rollout: RolloutOutput) -> list:
        """Completions as reward functions see them: strings, or an assistant message for chat prompts."""
        if is_conversational(prompts[0]):
            return [[{"role": "assistant", "content": text}] for text in rollout.completions]
        return list(rollout.completions)

    def _contain_eos(self, completion_ids: list[list[int]]) -> torch.Tensor:
        """(N,) True where a completion ends with one of the model's EOS ids."""
        eos = eos_ids(self.model, self.tokenizer)
        return torch.tensor([bool(ids) and ids[-1] in eos for ids in completion_ids], device=self.device)

    def _combine(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N,) weighted nansum; NaN where no function applies (unscorable)."""
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        return rewards.masked_fill(rewards_per_func.isnan().all(dim=1), float("nan"))

    @torch.no_grad()
    def _ref_per_token_logps(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
    ) -> torch.Tensor:
        """(N, C) log-probs of the last C tokens under the reference."""
        reference = find_reference_model(self.trainer, self.METHOD)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        logits = reference.forward(input_ids, attention_mask, position_ids, logits_to_keep=logits_to_keep + 1)
        return selective_log_softmax(logits[:, :-1], input_ids[:, -logits_to_keep:])


def _check_per_epoch(
    name: str, value: float | list[float], *, positive: bool = False, unit: bool = False
) -> None:
    """A float or a non-empty list of floats (one per epoch), each > 0 / in [0, 1] as asked."""
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        raise ValueError(f"{name}: give a number or a non-empty list (one value per epoch), got []")
    for v in values:
        if positive and not v > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        if unit and not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def _for_epoch(value: float | list[float], epoch: int) -> float:
    """``value`` itself, or its ``epoch``-th entry (the last one for every later epoch), as TRL."""
    if isinstance(value, list | tuple):
        return float(value[min(epoch, len(value) - 1)])
    return float(value)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values.nan_to_num(0.0) * mask).sum() / mask.sum().clamp(min=1)


def _unique(names: list[str]) -> list[str]:
    """Suffix repeated names (two instances of one reward class) so their metrics stay apart."""
    return [
        name if names.count(name) == 1 else f"{name}_{names[:i].count(name)}" for i, name in enumerate(names)
    ]
