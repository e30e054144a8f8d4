"""Nash-MD: Nash learning from human feedback by mirror descent (Munos et al. 2023,
https://arxiv.org/abs/2312.00886), in the form of TRL's NashMDTrainer.

For each prompt x the current policy samples a completion y, and an opponent y' is sampled from the
geometric mixture of the policy and the frozen reference (paper §7, eq. 11; ``mixture_coef`` = beta
in the paper's notation):

    pi_mix(. | x, y'_<t) = softmax(mixture_coef * ref_logits + (1 - mixture_coef) * policy_logits)

Reward functions score both (``missing_eos_penalty`` first) and the preference of y over y' is
``probability = sigmoid(score(y) - score(y'))``. The policy follows the REINFORCE gradient of
``probability`` with 0.5 as control variate, regularised by the KL to the reference (its
REINFORCE form with a stopped-gradient log-ratio):

    L = mean over prompts of  beta * sum_t sg(log pi(y_t) - log pi_ref(y_t)) * log pi(y_t)
                              - (probability - 0.5) * sum_t log pi(y_t)

(`nash_md_loss`). A preference of exactly 0.5 (a tie) leaves only the KL term.

Numbered departures from the paper (TRL's NashMDTrainer conventions unless said otherwise):
1. The preference model is ``sigmoid`` of a score difference, the score being reward functions
   (callables, or `lit_posttrain.rewards.model.RewardModelScorer`) combined by a weighted sum with
   ``None`` skipped (TRL: one reward model). A pair with an unscorable sample takes no loss.
2. The mirror-descent step is a plain gradient step on the loss above (TRL), not the paper's
   exact regularised policy update.
3. ``beta`` and ``mixture_coef`` may be lists: one value per epoch, the last one for every later
   epoch (TRL).
4. Log-probs are the policy's own (temperature 1); the mixture is formed from raw logits, then the
   sampling ``temperature`` / ``top_p`` / ``top_k`` apply to it (TRL's GeometricMixtureWrapper).
5. The opponent is sampled with HF ``generate`` on the policy, the reference's logits mixed in by a
   logits processor (`GeometricMixtureLogitsProcessor`) that runs the reference over the whole
   sequence at every step (no KV cache for the reference: simple, quadratic in the completion
   length). vLLM cannot sample from a mixture of two models' logits, so
   `lit_posttrain.callbacks.VLLMRollout` is refused before training starts (``configure_callbacks``).
6. Metrics keep TRL's names; ``rewards/chosen|rejected`` are the scores of the policy's sample and
   of the opponent (TRL), ``rewards/margins`` their difference and ``rewards/accuracies`` the
   fraction of prompts where the policy's sample scored higher (TRL: the log-ratio to the reference).
7. One generation batch per ``training_step`` and Lightning's automatic optimization; clip with
   ``trainer.gradient_clip_val``. ``top_k`` defaults to 0 (off).
8. Validation samples one greedy completion per prompt and logs its reward (``val/reward``).

Training step (one generation batch):

    batch = data.batch_size prompts                               # from NashMDDataModule
    rollout = self.rollout.generate(self.model, prompt_ids, num_generations=1, ...)   # the policy's
    mixture = geometric_mixture_generate(self.model, reference.forward, prompt_ids, mixture_coef, ...)
    probability = sigmoid(score(y) - score(y'))
    policy log-probs (grad) and reference log-probs (no grad) of the policy's samples
    loss = nash_md_loss(...)                                        # Lightning steps

Supports: plain and conversational prompts, extra dataset columns passed to reward functions,
several weighted reward functions, LoRA (the reference is the base model with adapters disabled),
DDP, the HF rollout. Not supported: vLLM rollouts (departure 5); FSDP2 is untested (the reference
forward inside ``generate`` would have to follow ``synced_gpus``).
Assumes: a tokenizer with a pad token; the reference from a `lit_posttrain.callbacks.ReferenceModel`
callback (added with defaults when the Trainer has none; ``precompute_ref_logps`` is refused).

    lit-posttrain fit --config configs/quickstart/nash_md.yaml
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import fully_shard
from torchmetrics import MeanMetric
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from lit_posttrain.callbacks.diagnostics import TrainingDiagnostics
from lit_posttrain.callbacks.reference_model import ReferenceModel, find_reference_model
from lit_posttrain.callbacks.vllm_rollout import VLLMRollout
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
from lit_posttrain.rollout.hf import sampling_processors
from lit_posttrain.schedulers import WarmupDecayLR

warn_experimental(__name__)


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
class NashMDDataModule(L.LightningDataModule):
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

    >>> dm = NashMDDataModule("examples/tiny-model", [{"prompt": "1+1=", "answer": "2"}] * 4, batch_size=2)
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
                "NashMDDataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
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
def nash_md_loss(
    model_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    probability: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE on the preference over the mixture's sample, with a 0.5 control variate, plus the KL.

    ``loss = mean(beta * sum_t sg(log pi - log pi_ref) log pi - (probability - 0.5) sum_t log pi)``

    Args:
        model_token_logps: (B, T) log-probs of the policy's samples under the policy (with grad).
        ref_token_logps: (B, T) the same under the reference.
        mask: (B, T) 1 on completion tokens.
        probability: (B,) preference of the policy's sample over the mixture's, ``sigmoid(score diff)``.
        beta: weight of the KL regularisation.
    Returns:
        ``(loss, metrics)``; metrics (detached): ``loss/kl`` (mean summed log-ratio, k1),
        ``loss/score`` (mean ``(probability - 0.5) * sum_t log pi``), ``rewards/probabilities``,
        ``logps/chosen`` (policy) and ``logps/rejected`` (reference) summed log-probs of the
        policy's samples, ``objective/entropy`` (-summed log-prob).

    >>> t = torch.tensor
    >>> loss, metrics = nash_md_loss(t([[-1.0, -2.0]]), t([[-1.5, -1.0]]), t([[1, 1]]), t([0.5]), beta=0.1)
    >>> round(loss.item(), 4)  # 0.1 * (0.5 * -1 + -1 * -2) = 0.15; (0.5 - 0.5) x ... = 0
    0.15
    >>> metrics["loss/score"].item()
    0.0
    """
    mask = mask.to(model_token_logps.dtype)
    model_logps = (model_token_logps * mask).sum(1)  # (B,)
    # the REINFORCE score with 0.5 as control variate (TRL's NashMDTrainer)
    score = (probability - 0.5) * model_logps  # (B,)
    # the KL to the reference, by REINFORCE: the log-ratio is a (stopped) reward on log pi
    log_ratio = ((model_token_logps - ref_token_logps) * mask).detach()  # (B, T)
    kl_loss = (log_ratio * model_token_logps * mask).sum(1)  # (B,)
    loss = (beta * kl_loss - score).mean()

    with torch.no_grad():
        metrics = {
            "loss/kl": log_ratio.sum(1).mean(),
            "loss/score": score.detach().mean(),
            "rewards/probabilities": probability.mean(),
            "logps/chosen": model_logps.detach().mean(),
            "logps/rejected": (ref_token_logps * mask).sum(1).mean(),
            "objective/entropy": -model_logps.detach().mean(),
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# The opponent: sampling from the geometric mixture of policy and reference
# ---------------------------------------------------------------------------------------------
class GeometricMixtureLogitsProcessor(LogitsProcessor):
    """Replace the policy's next-token logits by ``mixture_coef * ref + (1 - mixture_coef) * policy``.

    ``reference_logits(input_ids, attention_mask, position_ids, logits_to_keep)`` returns the
    reference's logits (`ReferenceModel.forward`); it runs over the whole sequence so far at every
    step (no cache). Placed before ``generate``'s temperature / top-k / top-p warpers (transformers
    applies a user's processors first), so those shape the mixture, as TRL's GeometricMixtureWrapper.

    Args:
        reference_logits: the reference's forward.
        prompt_attention_mask: (N, P) the left-padded prompts' mask.
        mixture_coef: weight of the reference's logits (0: the policy, 1: the reference).
    """

    def __init__(self, reference_logits: Callable, prompt_attention_mask: torch.Tensor, mixture_coef: float):
        self.reference_logits, self.prompt_attention_mask = reference_logits, prompt_attention_mask
        self.mixture_coef = mixture_coef

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        num_new = input_ids.size(1) - self.prompt_attention_mask.size(1)
        new = self.prompt_attention_mask.new_ones(input_ids.size(0), num_new)
        attention_mask = torch.cat([self.prompt_attention_mask, new], dim=1)  # (N, P + t)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        ref_logits = self.reference_logits(input_ids, attention_mask, position_ids, logits_to_keep=1)[:, -1]
        # Nash-MD (arXiv 2312.00886) eq. 11: log pi_mix = c log pi_ref + (1 - c) log pi + const
        return self.mixture_coef * ref_logits.to(scores.dtype) + (1 - self.mixture_coef) * scores


@torch.no_grad()
def geometric_mixture_generate(
    model,
    reference_logits: Callable,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    mixture_coef: float = 0.5,
    max_completion_length: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
) -> RolloutOutput:
    """One completion per prompt from the geometric mixture of ``model`` and the reference (HF ``generate``).

    Returns a `lit_posttrain.rollout.RolloutOutput` as `HFRollout` does (completions cut after the
    first EOS, ``truncated`` where ``max_completion_length`` was reached without one).
    """
    eos_token_ids = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
    device = next(model.parameters()).device
    input_ids = pad(prompts, pad_id, padding_side="left").to(device)  # (N, P)
    attention_mask = pad([torch.ones_like(ids) for ids in prompts], 0, padding_side="left").to(device)
    processor = GeometricMixtureLogitsProcessor(reference_logits, attention_mask, mixture_coef)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_completion_length,
            # the mixture, then the sampling processors (`HFRollout`'s inverse-CDF sampler): greedy step
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            min_p=None,
            repetition_penalty=1.0,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList(
                [processor, *(sampling_processors(temperature, top_k, top_p) if do_sample else [])]
            ),
            use_cache=True,
        )  # (N, P + C)
    finally:
        model.train(was_training)
    completion_ids = [_cut_at_eos(row, eos_token_ids) for row in out[:, input_ids.size(1) :].tolist()]
    truncated = [len(ids) >= max_completion_length and ids[-1] not in eos_token_ids for ids in completion_ids]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return RolloutOutput(completion_ids=completion_ids, completions=completions, truncated=truncated)


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class NashMDModule(L.LightningModule):
    """Nash-MD: the policy's sample against an opponent from the policy / reference geometric mixture.

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
        beta: weight of the KL to the reference, or a list with one value per epoch (the last one for
            every later epoch), as TRL.
        mixture_coef: weight of the reference's logits in the opponent's mixture (0: the policy itself,
            1: the reference), or a list with one value per epoch (TRL's default 0.5).
        missing_eos_penalty: subtracted from the score of a completion without EOS (>= 0; None: off).
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback unless the Trainer
            has one; False opts out.
        optimizer: optimizer factory (default AdamW at TRL's 5e-7, fused as TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step. A
            `lit_posttrain.schedulers.WarmupDecayLR` without ``num_training_steps`` gets the run's steps.

    Metrics (``train/``, TRL's names, means over the batch and the ranks):
        ``loss``, ``loss/kl``, ``loss/score``, ``objective/entropy``, ``rewards/probabilities``,
        ``logps/chosen|rejected`` (see `nash_md_loss`); ``rewards/chosen`` (the policy's samples'
        scores, after the EOS penalty; also logged as ``reward``), ``rewards/rejected`` (the
        opponents'), ``rewards/margins`` (their difference), ``rewards/accuracies`` (fraction where the
        policy's sample scored higher); ``val/model_contain_eos_token``, ``val/ref_contain_eos_token``
        (fractions of the policy's / opponent's samples with EOS; TRL's names, logged under
        ``train/``); ``beta``, ``mixture_coef``; ``rewards/<function>/mean`` (policy samples),
        ``completions/mean_length``, ``completions/clipped_ratio``, ``num_tokens``; ``grad_norm``
        (before clipping) and ``learning_rate`` at each optimizer step. Validation: ``val/reward``,
        ``val/rewards/<function>/mean``, ``val/completions/mean_length`` (greedy, one per prompt).

    >>> from lit_posttrain.rewards import PatternFractionReward
    >>> module = NashMDModule("examples/tiny-model", random_init=True,
    ...                          reward_funcs=[PatternFractionReward(pattern="[0-9]")], mixture_coef=[0.5, 0.25])
    >>> module.mixture_coef  # epoch 0
    0.5
    """

    METHOD = "Nash-MD"
    PAPER = "https://arxiv.org/abs/2312.00886"

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
        mixture_coef: float | list[float] = 0.5,
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
        _check_per_epoch("beta", beta, positive=True)
        _check_per_epoch("mixture_coef", mixture_coef, unit=True)
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
        self._beta, self._mixture_coef = beta, mixture_coef
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

    @property
    def mixture_coef(self) -> float:
        """This epoch's mixture_coef (a list gives one value per epoch, its last one for every later epoch)."""
        return _for_epoch(self._mixture_coef, self.current_epoch)

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
        sampling = {"max_completion_length": self.max_new_tokens, "temperature": self.temperature,
                    "top_p": self.top_p, "top_k": self.top_k}  # fmt: skip
        mixture_coef = self.mixture_coef
        # 1. one completion per prompt from the current policy, one opponent from the geometric mixture
        reference = find_reference_model(self.trainer, self.METHOD)
        with sampling_rng(self.generator):
            rollout = self.rollout.generate(self.model, prompt_ids, num_generations=1, **sampling)
            mixture_rollout = geometric_mixture_generate(
                self.model,
                reference.forward,
                self.tokenizer,
                prompt_ids,
                mixture_coef=mixture_coef,
                **sampling,
            )
        # 2. pack both: rows 0..B-1 the policy's samples, B..2B-1 the opponents: (2B, P+C), (2B, C)
        completion_ids = rollout.completion_ids + mixture_rollout.completion_ids
        input_ids, attention_mask, completion_mask = self._pack(prompt_ids + prompt_ids, completion_ids)
        # 3. score both samples; the EOS penalty first (TRL)
        prompts, completions, columns = self._reward_inputs(batch, rollout, mixture_rollout)
        rewards_per_func = score_completions(
            self.reward_funcs,
            prompts,
            completions,
            completion_ids=completion_ids,
            columns=columns,
            trainer_state=self._trainer_state(),
        ).to(self.device)  # (2B, F) fmt: skip
        contain_eos = self._contain_eos(completion_ids)  # (2B,)
        scores = self._combine(rewards_per_func)  # (2B,) NaN where no function applies
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~contain_eos).float()
        model_scores, mixture_scores = scores[:B], scores[B:]  # (B,), (B,)
        # 4. Nash-MD: the preference of the policy's sample over the opponent's
        probability = torch.sigmoid(model_scores - mixture_scores)  # (B,)
        scorable = ~probability.isnan()  # (B,) a pair with an unscorable sample takes no loss
        keep = scorable.nonzero().squeeze(1)  # (B',)
        # 5. per-token log-probs of the policy's samples only: policy (grad) and reference (no grad)
        ids, mask, completion_mask = input_ids[:B][keep], attention_mask[:B][keep], completion_mask[:B][keep]
        C = completion_mask.size(1)
        per_token_logps = self(ids, mask, C)  # (B', C)
        ref_per_token_logps = self._ref_per_token_logps(ids, mask, C)  # (B', C)
        # 6. the Nash-MD loss
        beta = self.beta
        loss, loss_metrics = nash_md_loss(
            per_token_logps, ref_per_token_logps, completion_mask, probability[keep], beta=beta
        )
        if keep.numel() == 0:  # no scorable pair: a zero loss that keeps the graph (DDP needs a backward)
            loss, loss_metrics = per_token_logps.sum() * 0.0, {}
        # 7. metrics (TRL's names)
        with torch.no_grad():
            s = scorable
            margins = model_scores - mixture_scores
            metrics = {
                "loss": loss.detach(),
                **loss_metrics,
                "reward": model_scores.nanmean(),
                "rewards/chosen": model_scores.nanmean(),
                "rewards/rejected": mixture_scores.nanmean(),
                "rewards/margins": _masked_mean(margins, s),
                "rewards/accuracies": _masked_mean((margins > 0).float(), s),
                "val/model_contain_eos_token": contain_eos[:B].float().mean(),
                "val/ref_contain_eos_token": contain_eos[B:].float().mean(),
                "beta": torch.tensor(float(beta)),
                "mixture_coef": torch.tensor(float(mixture_coef)),
                "completions/mean_length": torch.tensor([len(c) for c in rollout.completion_ids])
                .float()
                .mean(),
                "completions/clipped_ratio": torch.tensor(rollout.truncated, dtype=torch.float).mean(),
            }
            for name, values in zip(self.reward_func_names, rewards_per_func[:B].T):
                metrics[f"rewards/{name}/mean"] = values.nanmean()
        for name, value in metrics.items():
            self.log(f"train/{name}", value.float().to(self.device), sync_dist=True,
                     prog_bar=name in ("reward", "loss"))  # fmt: skip
        num_tokens = self.trainer.strategy.reduce(attention_mask[:B].sum().float(), reduce_op="sum")
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
        if isinstance(datamodule, NashMDDataModule) and datamodule.train_examples:
            columns = [c for c in datamodule.train_examples[0] if c not in ("prompt", "prompt_ids")]
            check_reward_funcs(self.reward_funcs, columns=columns)
        if stage == "fit" and find_reference_model(self.trainer, self.METHOD).precompute_ref_logps:
            raise ValueError(
                f"{self.METHOD}: ReferenceModel(precompute_ref_logps=True) does not apply: the reference samples a "
                "opponent for every prompt during training, so it must stay loaded. Set precompute_ref_logps: false."
            )
        # sampling draws from this rank's own RNG stream, seeded from the global seed and the rank, and
        # saved in checkpoints, so a resumed run samples what the uninterrupted one would
        self.generator = torch.Generator(self.trainer.strategy.root_device)
        self.generator.manual_seed(torch.initial_seed() + self.global_rank)

    def configure_callbacks(self):
        # before any callback's setup (VLLMRollout would build its engine there): refuse vLLM rollouts
        if any(isinstance(c, VLLMRollout) for c in self.trainer.callbacks):
            raise ValueError(
                f"{self.METHOD} does not support lit_posttrain.callbacks.VLLMRollout: its opponent is sampled from "
                "the geometric mixture of the policy's and the reference's logits at every token, which one vLLM "
                "engine (holding only the policy) cannot compute. Remove VLLMRollout from trainer.callbacks: "
                "Nash-MD samples with HF generate."
            )
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

    def _reward_inputs(
        self, batch: dict, rollout: RolloutOutput, mixture_rollout: RolloutOutput
    ) -> tuple[list, list, dict[str, list]]:
        """What reward functions see, one of each per sample (the policy's B, then the opponents' B)."""
        prompts = list(batch["prompt"]) * 2
        columns = {name: list(values) * 2 for name, values in batch["columns"].items()}
        completions = self._completions(prompts[: len(batch["prompt"])], rollout) + self._completions(
            prompts[: len(batch["prompt"])], mixture_rollout
        )
        return prompts, completions, columns

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


def _cut_at_eos(row: list[int], eos_token_ids: list[int]) -> list[int]:
    """Keep tokens up to and including the first EOS (the rest is padding)."""
    for i, token in enumerate(row):
        if token in eos_token_ids:
            return row[: i + 1]
    return row


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values.nan_to_num(0.0) * mask).sum() / mask.sum().clamp(min=1)


def _unique(names: list[str]) -> list[str]:
    """Suffix repeated names (two instances of one reward class) so their metrics stay apart."""
    return [
        name if names.count(name) == 1 else f"{name}_{names[:i].count(name)}" for i, name in enumerate(names)
    ]
