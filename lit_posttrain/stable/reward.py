"""Reward modeling: a scalar reward r(x, y) trained on preference pairs (Bradley-Terry).

The model is a language model with a one-output sequence-classification head (``score``); the
reward of a sequence is the head's output at its last token. A pair's chosen and rejected
sequences go through one forward pass (concatenated along the batch), and the loss makes the
chosen one more likely to win under the Bradley-Terry model (Bradley & Terry, 1952):

    P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r))
    loss = - mean log sigmoid(r(x, y_c) - r(x, y_r) - m)                      InstructGPT eq. 1; Llama 2 eq. 2
           + center_rewards_coefficient * mean((r(x, y_c) + r(x, y_r))^2)   Eisenstein et al. eq. 2

Papers: InstructGPT, Ouyang et al. 2022, https://arxiv.org/abs/2203.02155 (eq. 1, the pairwise loss);
Llama 2, Touvron et al. 2023, https://arxiv.org/abs/2307.09288 (eq. 2, the margin m);
Eisenstein et al. 2023, "Helping or Herding?", https://arxiv.org/abs/2312.09244 (the centering term,
which pins the otherwise free offset of the rewards near 0).
Reference implementation: TRL's ``RewardTrainer``.

Departures from the papers, numbered:
1. InstructGPT puts all K-choose-2 comparisons of one prompt in a single batch element; here every
   row is one independent pair (the usual binarized datasets hold one pair per prompt).
2. Llama 2's margin is a discrete function of the annotators' preference strength; here it is any
   number per row, read from an optional ``margin`` column (0 without one).
3. Pairs whose chosen or rejected sequence is longer than ``max_length`` tokens are dropped, as TRL
   does, not truncated: truncation cuts the end of the completion, where the reward is read, so two
   different completions could become the same input. `RewardDataModule` warns with the count.
4. Plain-text sequences get an EOS token appended when they do not end with one (as TRL does), so
   the reward is read after the whole completion. Conversations are rendered by the chat template.
5. The loss is a mean over the pairs of the whole optimizer step (across gradient accumulation and
   ranks) when the DataModule supplies that count, so 4x1 and 1x4 give the same gradient.

Supports: plain and conversational data, explicit or implicit prompt (conversational implicit
prompts are split off with `lit_posttrain.data.extract_prompt`), an optional ``margin`` column,
LoRA (the ``score`` head is always trained in full: it is added to ``modules_to_save``), gradient
checkpointing, DDP and FSDP2 (``ModelParallelStrategy``). Metrics: ``loss``, ``accuracy``, ``margin``,
``mean_reward``, ``min_reward``, ``max_reward``, ``num_tokens`` (``train/`` and ``val/``).
Assumes: right padding with the tokenizer's pad token, which is written to ``config.pad_token_id``
so that the Hugging Face head finds each sequence's last non-pad token (when pad == EOS, the
appended EOS counts as padding and the reward is read at the token before it, in training and at
inference alike). The trained model loads with ``AutoModelForSequenceClassification``; use it as an
online reward with `lit_posttrain.rewards.model.RewardModelScorer`.

    lit-posttrain fit --config configs/quickstart/reward.yaml
"""

from __future__ import annotations

import dataclasses
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from torchmetrics import MaxMetric, MeanMetric, MinMetric
from transformers import PreTrainedTokenizerBase

from lit_posttrain.callbacks.diagnostics import TrainingDiagnostics
from lit_posttrain.data import (
    DataFormatError,
    DatasetSource,
    LookaheadLoader,
    check_rows,
    describe_source,
    extract_prompt,
    load_rows,
    split_rows,
    tokenize_cached,
)
from lit_posttrain.models import DType, LoRAConfig, decoder_layers, load_model, load_tokenizer
from lit_posttrain.ops import finite_grad_norm, pad
from lit_posttrain.rewards.model import tokenize_for_reward
from lit_posttrain.schedulers import WarmupDecayLR


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForReward:
    """Stack the chosen and rejected sequences of a batch of pairs into one right-padded batch.

    Each example has ``chosen_ids`` and ``rejected_ids`` (list[int]) and optionally ``margin``
    (float). Returns ``input_ids`` and ``attention_mask`` (2B, T): rows 0..B-1 are the chosen
    sequences, rows B..2B-1 the rejected ones in the same order; ``margin`` (B,) when the examples
    have one.

    >>> collator = DataCollatorForReward(pad_token_id=0)
    >>> batch = collator([
    ...     {"chosen_ids": [5, 6, 7], "rejected_ids": [5, 6, 8, 9], "margin": 0.5},
    ...     {"chosen_ids": [10, 11], "rejected_ids": [10, 12], "margin": 1.0},
    ... ])
    >>> batch["input_ids"]  # chosen rows, then rejected rows
    tensor([[ 5,  6,  7,  0],
            [10, 11,  0,  0],
            [ 5,  6,  8,  9],
            [10, 12,  0,  0]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 1],
            [1, 1, 0, 0]])
    >>> batch["margin"]
    tensor([0.5000, 1.0000])
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [torch.tensor(e["chosen_ids"], dtype=torch.long) for e in examples]
        sequences += [torch.tensor(e["rejected_ids"], dtype=torch.long) for e in examples]
        batch = {
            "input_ids": pad(sequences, self.pad_token_id),  # (2B, T)
            "attention_mask": pad([torch.ones_like(s) for s in sequences], 0),  # (2B, T)
        }
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)  # (B,)
        return batch


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
class RewardDataModule(L.LightningDataModule):
    """Load, check and tokenize preference pairs for reward modeling.

    Rows have ``chosen`` and ``rejected`` and optionally ``prompt`` and ``margin`` (a number). Text
    columns are plain strings or lists of ``{"role", "content"}`` messages, the same kind within a
    row; without a ``prompt`` column, conversations share their leading messages (implicit prompt).

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: pairs per micro-batch (the forward pass sees twice as many sequences).
        max_length: pairs with a sequence longer than this many tokens are dropped (TRL's behaviour;
            truncation would cut off the end, where the reward is read); None keeps everything.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the ``val_size`` split.
        dataset_split: split to read ``train_data`` from, for a hub dataset (e.g. ``train_prefs``).
        val_dataset_split: split to read ``val_data`` from (e.g. ``test_prefs``); default ``dataset_split``.
        dataset_config: hub dataset configuration name (e.g. ``"main"`` for ``openai/gsm8k``).
        columns: maps the column names reward modeling expects to the data's own, e.g.
            ``{chosen: good, rejected: bad, margin: strength}``; unmapped columns keep their names.
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
        self.batch_size, self.max_length = batch_size, max_length
        self.num_workers, self.seed = num_workers, seed
        self.dataset_split, self.val_dataset_split = dataset_split, val_dataset_split or dataset_split
        self.dataset_config, self.columns = dataset_config, columns
        self.collator = DataCollatorForReward(self.tokenizer.pad_token_id)
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        if self.train_data is None:
            raise ValueError("RewardDataModule: train_data is required (a path, hub id, list of dicts or Dataset)")
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
        self.train_examples = tokenize_cached(self, self._tokenize, train, source)
        self.val_examples = tokenize_cached(self, self._tokenize, val, val_source) if val is not None else None

    def _check(self, rows, source: str) -> None:
        check_rows(
            rows,
            required={"chosen": "text", "rejected": "text"},
            optional={"prompt": "text", "margin": "number"},
            source=source,
        )
        columns = [c for c in ("prompt", "chosen", "rejected") if c in rows.column_names]
        for i, row in enumerate(rows.select_columns(columns)):
            kinds = [isinstance(row[c], list) for c in columns]
            conversational = max((False, True), key=kinds.count)  # the row's majority; a tie counts as plain
            for column, kind in zip(columns, kinds):
                if kind != conversational:
                    expected = "a list of messages" if conversational else "a string"
                    raise DataFormatError(
                        f"{source}: row {i}, column '{column}': expected {expected} like the row's other text "
                        f"columns (plain and conversational text cannot be mixed in a row), got {row[column]!r:.80}"
                    )

    def _tokenize(self, rows, source: str) -> list[dict]:
        """-> [{"chosen_ids", "rejected_ids", ("margin")}], without pairs longer than ``max_length``."""
        has_prompt, has_margin = "prompt" in rows.column_names, "margin" in rows.column_names
        examples = []
        for row in rows:
            if has_prompt:
                prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            elif isinstance(row["chosen"], list):  # implicit prompt: the shared leading messages
                prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
            else:
                prompt, chosen, rejected = "", row["chosen"], row["rejected"]
            example = {
                "chosen_ids": tokenize_for_reward(self.tokenizer, prompt, chosen),
                "rejected_ids": tokenize_for_reward(self.tokenizer, prompt, rejected),
            }
            if has_margin:
                example["margin"] = float(row["margin"])
            examples.append(example)
        if self.max_length is None:
            return examples
        kept = [e for e in examples if max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= self.max_length]
        if not kept:
            raise DataFormatError(f"{source}: every pair has a sequence longer than max_length={self.max_length} tokens")
        if len(kept) < len(examples):
            warnings.warn(
                f"{source}: dropped {len(examples) - len(kept)} of {len(examples)} pairs with a sequence longer "
                f"than max_length={self.max_length} tokens (truncation would cut off the end, where the reward is read)"
            )
        return kept

    def train_dataloader(self):
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return LookaheadLoader(
            self.train_examples,
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
        if self.val_examples is None:
            return []
        return DataLoader(
            self.val_examples, batch_size=self.batch_size, collate_fn=self.collator, num_workers=self.num_workers
        )


def _count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].size(0) // 2


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss of a reward model.

        loss = sum_i -log sigmoid(r_c,i - r_r,i - m_i) / N
               + center_rewards_coefficient * sum_i (r_c,i + r_r,i)^2 / N

    The first term is InstructGPT's eq. 1 (arXiv 2203.02155) with Llama 2's margin (eq. 2,
    arXiv 2307.09288): the chosen reward must beat the rejected one by at least ``m`` before the
    loss flattens. The second is the centering term of Eisenstein et al. 2023 (arXiv 2312.09244,
    eq. 2), which fixes the rewards' free offset near 0. Reference: TRL ``RewardTrainer.compute_loss``.

    Args:
        chosen_rewards: (B,) rewards of the chosen sequences.
        rejected_rewards: (B,) rewards of the rejected sequences.
        margin: (B,) per-pair margins; None for 0.
        center_rewards_coefficient: weight of the centering term; None (or 0) leaves it out
            (Eisenstein et al. suggest 0.01).
        num_items_in_batch: pairs to average over (the whole optimizer step's); default: B.
    Returns:
        ``(loss, metrics)``; metrics (detached): ``accuracy`` (fraction with r_c > r_r), ``margin``
        (mean r_c - r_r), ``mean_reward``, ``min_reward``, ``max_reward`` (over all 2B rewards).
    """
    logits = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        logits = logits - margin
    if num_items_in_batch is None:
        num_items_in_batch = chosen_rewards.numel()
    loss = -F.logsigmoid(logits).sum() / num_items_in_batch
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).sum() / num_items_in_batch
    with torch.no_grad():
        rewards = torch.cat([chosen_rewards, rejected_rewards])  # (2B,)
        metrics = {
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(),
            "mean_reward": rewards.mean(),
            "min_reward": rewards.min(),
            "max_reward": rewards.max(),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class RewardModule(L.LightningModule):
    """Train a reward model (one-output sequence-classification head) on preference pairs.

    Args:
        model_name_or_path: hub id or local directory of the model (a causal LM checkpoint works:
            its LM head is dropped and a fresh ``score`` head is added).
        tokenizer_name_or_path: tokenizer location when it differs from the model's.
        random_init: build the model from its config with random weights (tests, quickstart).
        model_config: config fields to override (e.g. ``{"num_hidden_layers": 4}``).
        init_seed: seed of the random initialisation (``random_init`` only; the fresh ``score`` head
            of a pretrained model is drawn from the global RNG: set ``seed_everything``).
        dtype: parameter dtype at load time (Lightning's ``precision`` decides the compute dtype).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: allow model code from the hub (off unless asked).
        lora: LoRA adapter settings; None for full fine-tuning. ``score`` is always added to
            ``modules_to_save``: the head starts random, so it must be trained in full.
        quantization: QLoRA: load the base in 4-bit or 8-bit (transformers' ``BitsAndBytesConfig`` fields,
            e.g. ``{load_in_4bit: true, bnb_4bit_quant_type: nf4}``); needs ``lora``. See docs/qlora.md.
        center_rewards_coefficient: weight of the reward-centering term (TRL name; 0.01 is the
            value Eisenstein et al. suggest); None to leave it out.
        disable_dropout: set every dropout probability in the model to 0 (TRL's ``RewardConfig``
            default), so the chosen and rejected scores come from the same network.
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback (findings about the
            run's health, docs/diagnostics.md) unless the Trainer has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
            The default learning rate 1e-4 is TRL's ``RewardConfig`` default.
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
    """

    METHOD = "Reward modeling"
    PAPER = "https://arxiv.org/abs/2203.02155"

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
        center_rewards_coefficient: float | None = None,
        disable_dropout: bool = True,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path, trust_remote_code=trust_remote_code)
        if lora is not None and "score" not in (lora.modules_to_save or []):
            lora = dataclasses.replace(lora, modules_to_save=[*(lora.modules_to_save or []), "score"])
        self.model = load_model(
            model_name_or_path,
            task="sequence-classification",
            num_labels=1,
            # the head reads the reward at the last token that is not config.pad_token_id: it must be
            # the id the collator pads with
            pad_token_id=self.tokenizer.pad_token_id,
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
        self.center_rewards_coefficient = center_rewards_coefficient
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        # sequence tokens (chosen + rejected, no padding) seen in training, all ranks; a buffer so
        # that checkpoints carry it
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.long))
        self.val_loss, self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_mean_reward, self.val_min_reward, self.val_max_reward = MeanMetric(), MinMetric(), MaxMetric()
        self._step_sums: dict[str, torch.Tensor] = {}  # training metric sums of the current optimizer step
        self._step_maxima: dict[str, torch.Tensor] = {}  # ... its maxima (of max_reward and -min_reward)
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

    def forward(self, input_ids, attention_mask=None):
        """-> (N,) one reward per sequence, read at its last non-pad token."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()

    def training_step(self, batch, batch_idx):
        rewards = self(batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen_rewards, rejected_rewards = rewards.chunk(2)  # (B,), (B,)
        num_pairs = chosen_rewards.new_tensor(chosen_rewards.numel())
        # the sum of the per-pair losses (normalised by 1); divided below by the step's pairs
        loss_sum, metrics = reward_loss(
            chosen_rewards,
            rejected_rewards,
            margin=batch.get("margin"),
            center_rewards_coefficient=self.center_rewards_coefficient,
            num_items_in_batch=1,
        )
        num_items_in_batch = batch.get("num_items_in_batch")
        # one collective for the sums (the loss normaliser, pair-weighted metric sums, tokens) and
        # one for the extremes, over all ranks
        stats = {
            "num_items_in_batch": num_items_in_batch if num_items_in_batch is not None else num_pairs,
            "num_pairs": num_pairs,
            "loss": loss_sum.detach(),
            "accuracy": metrics["accuracy"] * num_pairs,
            "margin": metrics["margin"] * num_pairs,
            "mean_reward": metrics["mean_reward"] * num_pairs,
            "num_tokens": batch["attention_mask"].sum(),
        }
        reduced = self.trainer.strategy.reduce(torch.stack([s.float() for s in stats.values()]), reduce_op="sum")
        sums = dict(zip(stats, reduced))  # name -> its sum over all ranks
        extremes = {"max_reward": metrics["max_reward"], "negative_min_reward": -metrics["min_reward"]}
        reduced = self.trainer.strategy.reduce(torch.stack(list(extremes.values())), reduce_op="max")
        maxima = dict(zip(extremes, reduced))  # name -> its maximum over all ranks
        if num_items_in_batch is not None:
            # pairs of the whole optimizer step, all ranks; Lightning divides the loss by the
            # accumulation steps and DDP averages over ranks, so undo both to get sum / pairs
            micro_batches = self.trainer.accumulate_grad_batches * self.trainer.world_size  # per step, all ranks
            num_items_in_batch = sums["num_items_in_batch"] / micro_batches
        else:  # no DataModule look-ahead: this micro-batch's own pairs
            num_items_in_batch = num_pairs
        loss = loss_sum / num_items_in_batch
        # the logged metrics are pair-weighted over the optimizer step so far (all micro-batches
        # and ranks): at its last micro-batch, the one Lightning logs, they cover the whole step
        if self._step_sums_at != self.trainer.global_step:
            names = ("num_pairs", "loss", "accuracy", "margin", "mean_reward")
            self._step_sums = {name: torch.zeros_like(sums[name]) for name in names}
            self._step_maxima = {name: torch.full_like(maxima[name], -float("inf")) for name in maxima}
            self._step_sums_at = self.trainer.global_step
        for name in self._step_sums:
            self._step_sums[name] += sums[name]
        for name in self._step_maxima:
            self._step_maxima[name] = torch.maximum(self._step_maxima[name], maxima[name])
        step, n = self._step_sums, self._step_sums["num_pairs"]
        self.num_tokens += sums["num_tokens"].long()
        self.log("train/loss", step["loss"] / n, prog_bar=True)
        self.log("train/accuracy", step["accuracy"] / n, prog_bar=True)
        self.log("train/margin", step["margin"] / n)
        self.log("train/mean_reward", step["mean_reward"] / n)
        self.log("train/min_reward", -self._step_maxima["negative_min_reward"])
        self.log("train/max_reward", self._step_maxima["max_reward"])
        self.log("train/num_tokens", self.num_tokens.float())
        return loss

    def validation_step(self, batch, batch_idx):
        rewards = self(batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen_rewards, rejected_rewards = rewards.chunk(2)  # (B,), (B,)
        loss, metrics = reward_loss(
            chosen_rewards,
            rejected_rewards,
            margin=batch.get("margin"),
            center_rewards_coefficient=self.center_rewards_coefficient,
        )
        # pair-weighted over the whole validation set and all ranks
        num_pairs = chosen_rewards.numel()
        self.val_loss.update(loss, weight=num_pairs)
        self.val_accuracy.update(metrics["accuracy"], weight=num_pairs)
        self.val_margin.update(metrics["margin"], weight=num_pairs)
        self.val_mean_reward.update(metrics["mean_reward"], weight=num_pairs)
        self.val_min_reward.update(metrics["min_reward"])
        self.val_max_reward.update(metrics["max_reward"])
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)
        self.log("val/margin", self.val_margin)
        self.log("val/mean_reward", self.val_mean_reward)
        self.log("val/min_reward", self.val_min_reward)
        self.log("val/max_reward", self.val_max_reward)
        # as in TRL: the training tokens seen so far, so validation curves can be plotted against it
        self.log("val/num_tokens", self.num_tokens.float(), sync_dist=True)  # the same on every rank

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
