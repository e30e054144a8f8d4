"""On-policy distillation: the student samples, a frozen teacher grades every token (Agarwal et al. 2024,
https://arxiv.org/abs/2306.13649 with lambda = 1; the "on-policy distillation" recipe of Thinking Machines,
https://thinkingmachines.ai/blog/on-policy-distillation/, and Qwen3; TRL's ``DistillationTrainer``).

Prompt-only data. For each prompt x the student pi_theta samples completions y
(``self.rollout.generate``: HF ``generate`` or `lit_posttrain.callbacks.VLLMRollout`), and the loss
is the per-token divergence from a frozen teacher pi_T (a
`lit_posttrain.callbacks.reference_model.TeacherModel`) on the student's own tokens:

    y ~ pi_theta(. | x)
    S_t = pi_theta(. | x, y_<t),   T_t = pi_T(. | x, y_<t)       (both at ``temperature``)
    loss = sum_t D_beta(S_t, T_t) / (completion tokens)

with ``D_beta`` the generalized Jensen-Shannon divergence over the full vocabulary (``beta``, TRL's
convention: 0 forward KL(T || S), 1 reverse KL(S || T) -- the default and the recipe's objective --
otherwise ``beta KL(T || M) + (1 - beta) KL(S || M)`` with ``M = (1 - beta) S + beta T``).

The reverse KL is mode seeking: the student is pushed off every token the teacher finds unlikely,
on the states the student itself reaches (no exposure bias), with a dense per-token signal.

Numbered departures from TRL's ``DistillationTrainer`` / the Thinking Machines recipe:
1. The per-token reverse KL is the loss, minimised by gradient descent on the exact full-vocabulary
   divergence (``sum_v S(v) (log S(v) - log T(v))`` at each position), not a per-token advantage
   ``-(log S(y_t) - log T(y_t))`` in an importance-sampled policy gradient (the recipe): the same
   objective and fixed point, with the sampling variance over the vocabulary removed; it costs one
   (N, C, V) teacher logit tensor per batch.
2. Always on-policy (TRL's ``lmbda=1``, its default): the data is prompt-only, so there are no
   dataset completions to mix in (GKDModule does that, with SFT-shaped data).
3. Full vocabulary: TRL restricts the divergence to ``loss_top_k`` tokens (default 1, the sampled
   token plus one tail bucket); there is no ``loss_top_k`` here.
4. The loss is normalised by the completion tokens of the step's batch over all ranks; under
   ``trainer.accumulate_grad_batches`` each micro-batch is normalised by its own tokens and the
   micro-batches weigh equally.
5. The teacher is local (a `TeacherModel` callback, sharded like the student under FSDP2); there is
   no teacher server (TRL's ``use_teacher_server``).
6. No importance-sampling correction of the vLLM sampler's numeric mismatch: the loss does not
   weigh tokens by their sampling probability (it is an expectation over the vocabulary at each
   visited state), so the mismatch only shifts which states are visited.

Data: ``prompt`` (a string, or a list of messages rendered with the chat template and
``add_generation_prompt``); other columns are ignored.

    {"prompt": "23+19="}

The teacher: ``teacher_model_name_or_path`` (the module adds ``TeacherModel(teacher_model_name_or_path)``
unless the Trainer already has a `TeacherModel` callback). It must share the student's vocabulary
(checked at setup); it may be larger or smaller.

Metrics (``train/`` and ``val/``): ``loss``; ``kl`` the full-vocabulary reverse KL(S || T) per
completion token (equal to ``loss`` with ``beta=1``); ``teacher_entropy`` and ``student_entropy``
(nats per completion token); ``completions/mean_length|min_length|max_length|clipped_ratio``;
``num_tokens`` (train: prompt and completion tokens so far); ``grad_norm`` and ``learning_rate``.
Validation samples one greedy completion per prompt and measures the same quantities on it.

Supports: plain and conversational prompts, LoRA student, DDP and FSDP2 (``ModelParallelStrategy``),
`lit_posttrain.callbacks.VLLMRollout`, exact resume (the sampling RNG is checkpointed). Assumes a
tokenizer with a pad token, shared by student and teacher.

    lit-posttrain fit --config configs/quickstart/distill.yaml
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import fully_shard
from transformers import PreTrainedTokenizerBase

from lit_posttrain.callbacks.diagnostics import TrainingDiagnostics
from lit_posttrain.callbacks.reference_model import TeacherModel, find_teacher_model
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
from lit_posttrain.ops import finite_grad_norm, masked_mean, pad
from lit_posttrain.rollout import HFRollout, RolloutOutput, sampling_rng
from lit_posttrain.schedulers import WarmupDecayLR

warn_experimental(__name__)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForPrompts:
    """Batch tokenized prompts without padding: the rollout engine pads them itself.

    >>> collator = DataCollatorForPrompts()
    >>> batch = collator([{"prompt_ids": [5, 6, 7], "prompt": "2+2="}, {"prompt_ids": [8], "prompt": "3+3="}])
    >>> batch["prompt_ids"]  # unpadded
    [[5, 6, 7], [8]]
    >>> batch["prompt"]
    ['2+2=', '3+3=']
    """

    def __call__(self, examples: list[dict]) -> dict:
        return {
            "prompt_ids": [example["prompt_ids"] for example in examples],
            "prompt": [example["prompt"] for example in examples],
        }


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
class DistillationDataModule(L.LightningDataModule):
    """Load, check and tokenize prompt-only data; batch ``batch_size`` prompts per training step.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: prompts per training step (each sampled ``num_generations`` times). The last
            incomplete batch of an epoch is dropped.
        max_prompt_length: prompt tokens kept (their end). None: all.
        dataset_split / val_dataset_split / dataset_config: hub dataset split and configuration.
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
            raise ValueError(
                "DistillationDataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
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
        """-> [{"prompt_ids", "prompt"}]; a prompt keeps its last ``max_prompt_length`` tokens."""
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
            examples.append({"prompt": prompt, "prompt_ids": prompt_ids})
        return examples

    def train_dataloader(self):
        # stateful: a run resumed mid-epoch skips the prompts already used
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
def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token generalized JSD between student and teacher over the full vocabulary, on completion tokens.

    ``beta=1`` (default): reverse KL(S || T) = sum_v S(v) (log S(v) - log T(v)); ``beta=0``: forward
    KL(T || S); otherwise ``beta KL(T || M) + (1 - beta) KL(S || M)``, ``M = (1 - beta) S + beta T``.

    Args:
        student_logits: (B, C, V) the student's logits predicting each completion token (with grad).
        teacher_logits: (B, C, V) the teacher's at the same positions (no grad).
        completion_mask: (B, C) 1 on completion tokens that take the loss.
        beta: the divergence's interpolation coefficient (TRL's name and convention).
        num_items_in_batch: the normaliser (completion tokens of the whole batch, averaged over ranks
            under DDP); default: this batch's completion tokens.
    Returns:
        ``(loss, metrics)``: metrics (detached, means over completion tokens) ``kl`` (reverse KL(S || T)),
        ``student_entropy``, ``teacher_entropy``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (student and teacher must share a vocabulary)"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 or wider
    mask = completion_mask.to(dtype)
    student_logps = F.log_softmax(student_logits.to(dtype), dim=-1)  # (B, C, V)
    teacher_logps = F.log_softmax(teacher_logits.to(dtype), dim=-1)  # (B, C, V)
    student_probs = student_logps.exp()
    reverse_kl = (student_probs * (student_logps - teacher_logps)).sum(-1)  # (B, C)
    if beta == 1.0:  # KL(S || T): the recipe's objective
        per_token_loss = reverse_kl
    elif beta == 0.0:  # KL(T || S)
        per_token_loss = (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
    else:  # generalized JSD, the mixture in probability space
        log_mixture = torch.logsumexp(
            torch.stack([student_logps + math.log(1 - beta), teacher_logps + math.log(beta)]), dim=0
        )
        kl_teacher = (teacher_logps.exp() * (teacher_logps - log_mixture)).sum(-1)
        kl_student = (student_probs * (student_logps - log_mixture)).sum(-1)
        per_token_loss = beta * kl_teacher + (1 - beta) * kl_student
    normalizer = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = (per_token_loss * mask).sum() / torch.as_tensor(normalizer, dtype=mask.dtype).clamp(min=1)
    with torch.no_grad():
        metrics = {
            "kl": masked_mean(reverse_kl, mask),
            "student_entropy": masked_mean(-(student_probs * student_logps).sum(-1), mask),
            "teacher_entropy": masked_mean(-(teacher_logps.exp() * teacher_logps).sum(-1), mask),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class DistillationModule(L.LightningModule):
    """On-policy distillation: minimise the per-token reverse KL to a frozen teacher on the student's samples.

    Args:
        model_name_or_path: hub id or local directory of the student.
        teacher_model_name_or_path: the teacher (TRL's option): the module adds
            ``TeacherModel(teacher_model_name_or_path)`` unless the Trainer has a `TeacherModel`
            callback (give one to set the teacher's dtype, attention or tokenizer). Required unless
            the Trainer has one.
        tokenizer_name_or_path: tokenizer location when it differs from the student's.
        random_init: build the student from its config with random weights (a fresh smaller student).
        model_config: config fields to override (e.g. ``num_hidden_layers: 1``).
        init_seed: seed of the random initialisation.
        dtype: parameter dtype at load time (Lightning's ``precision`` decides the compute dtype).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: allow model code from the hub (off unless asked).
        lora: LoRA adapter settings; None for full fine-tuning.
        quantization: QLoRA: load the base in 4-bit or 8-bit (transformers' ``BitsAndBytesConfig`` fields,
            e.g. ``{load_in_4bit: true, bnb_4bit_quant_type: nf4}``); needs ``lora``. See docs/qlora.md.
        beta: divergence: 1 reverse KL (default, the recipe), 0 forward KL, between: generalized JSD.
        num_generations: completions sampled per prompt (TRL's default 1).
        max_completion_length: new tokens per completion at most (TRL's default 512).
        temperature / top_p / top_k: sampling settings (TRL's defaults 1.0, 0.95, 0: off); the loss
            is computed on temperature-scaled logits of student and teacher (TRL).
        disable_dropout: set the student's dropout to 0 (TRL's default).
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback unless the Trainer
            has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step; a
            `lit_posttrain.schedulers.WarmupDecayLR` without ``num_training_steps`` gets the run's.
    """

    METHOD = "Distillation"
    PAPER = "https://arxiv.org/abs/2306.13649"

    def __init__(
        self,
        model_name_or_path: str,
        *,
        teacher_model_name_or_path: str | None = None,
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
        beta: float = 1.0,
        num_generations: int = 1,
        max_completion_length: int = 512,
        temperature: float = 1.0,
        top_p: float = 0.95,
        top_k: int = 0,
        disable_dropout: bool = True,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {beta}")
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
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
        self.rollout = HFRollout(self.tokenizer)
        self.teacher_model_name_or_path = teacher_model_name_or_path
        self.beta = beta
        self.num_generations, self.max_completion_length = num_generations, max_completion_length
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        self.num_tokens = 0  # prompt + completion tokens trained on, all ranks (saved in checkpoints)
        self.generator: torch.Generator | None = None  # this rank's sampling RNG, created in setup

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard each decoder layer, then the root."""
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
        """(N, C, V) temperature-scaled logits predicting the last C = ``logits_to_keep`` tokens."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep + 1,
            use_cache=False,
        ).logits[:, :-1]  # (N, C, V): position t predicts completion token t
        return logits / self.temperature

    def training_step(self, batch, batch_idx):
        # 1. sample num_generations completions per prompt from the student (N = B * G, prompt-major)
        with sampling_rng(self.generator):
            rollout = self.rollout.generate(
                self.model, batch["prompt_ids"], num_generations=self.num_generations,
                max_completion_length=self.max_completion_length, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k,
            )  # fmt: skip
        # 2. the teacher grades every token the student sampled: the loss and its metrics
        loss, metrics, num_tokens = self._shared_step(batch, rollout)
        # 3. metrics over every rank's samples
        metrics |= self._completion_metrics(rollout)
        self.num_tokens += int(self.trainer.strategy.reduce(num_tokens.float(), reduce_op="sum"))
        for name, value in metrics.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "kl"))
        self.log("train/num_tokens", float(self.num_tokens))
        return loss

    def validation_step(self, batch, batch_idx):
        rollout = self.rollout.generate(
            self.model,
            batch["prompt_ids"],
            num_generations=1,
            max_completion_length=self.max_completion_length,
            do_sample=False,
        )
        _, metrics, _ = self._shared_step(batch, rollout, num_generations=1)
        num_completion_tokens = sum(len(ids) for ids in rollout.completion_ids)
        for name, value in metrics.items():  # token-weighted over the whole validation set
            self.log(f"val/{name}", value, batch_size=max(num_completion_tokens, 1), sync_dist=True,
                     prog_bar=name in ("loss", "kl"))  # fmt: skip
        lengths = torch.tensor([len(ids) for ids in rollout.completion_ids], dtype=torch.float)
        self.log("val/completions/mean_length", lengths.mean(), batch_size=len(lengths), sync_dist=True)

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
        # sampling draws from this rank's own RNG stream, seeded from the global seed and the rank,
        # and saved in checkpoints, so a resumed run samples what the uninterrupted one would
        self.generator = torch.Generator(self.trainer.strategy.root_device)
        self.generator.manual_seed(torch.initial_seed() + self.global_rank)

    def configure_callbacks(self):
        callbacks = []
        # the teacher: the user's TeacherModel callback, else one loaded from teacher_model_name_or_path
        if not any(isinstance(c, TeacherModel) for c in self.trainer.callbacks):
            if self.teacher_model_name_or_path is None:
                raise ValueError(
                    f"{self.METHOD}: set model.init_args.teacher_model_name_or_path (the teacher's hub id or "
                    "directory) or give the Trainer a lit_posttrain.callbacks.TeacherModel callback"
                )
            callbacks.append(TeacherModel(self.teacher_model_name_or_path))
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
    def _shared_step(self, batch: dict, rollout: RolloutOutput, num_generations: int | None = None):
        """`distillation_loss` of the rollout's completions; returns (loss, metrics, prompt + completion tokens)."""
        G = num_generations or self.num_generations
        completions = [torch.tensor(ids, dtype=torch.long) for ids in rollout.completion_ids]
        input_ids, attention_mask, completion_mask = self._pack(batch["prompt_ids"], completions, G)
        C = completion_mask.size(1)
        student_logits = self(input_ids, attention_mask, C)  # (N, C, V)
        teacher = find_teacher_model(self.trainer, self.METHOD)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as the student's
        teacher_logits = teacher.forward(input_ids, attention_mask, position_ids, logits_to_keep=C + 1)[
            :, :-1
        ]
        teacher_logits = teacher_logits / self.temperature  # (N, C, V), no grad
        # the normaliser: this step's completion tokens, averaged over ranks (DDP averages gradients)
        num_items_in_batch = self.trainer.strategy.reduce(completion_mask.sum().float(), reduce_op="mean")
        loss, metrics = distillation_loss(
            student_logits,
            teacher_logits,
            completion_mask,
            beta=self.beta,
            num_items_in_batch=num_items_in_batch,
        )
        metrics = self._mean_over_ranks(metrics, completion_mask)
        metrics["loss"] = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        return loss, metrics, attention_mask.sum()

    def _pack(self, prompt_ids: list[list[int]], completions: list[torch.Tensor], G: int):
        """Each prompt G times (prompt-major, as the rollout), left-padded, then its completion, right-padded.

        Returns ``input_ids`` (N, P+C), ``attention_mask`` (N, P+C), ``completion_mask`` (N, C).
        """
        pad_token_id = self.tokenizer.pad_token_id
        prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids for _ in range(G)]
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompts], 0, "left")  # (N, P)
        completion_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in completions], 0)  # (N, C)
        input_ids = torch.cat([pad(prompts, pad_token_id, "left"), pad(completions, pad_token_id)], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        return input_ids.to(self.device), attention_mask.to(self.device), completion_mask.to(self.device)

    def _mean_over_ranks(self, metrics: dict[str, torch.Tensor], completion_mask: torch.Tensor) -> dict:
        """Token means of this rank -> token means over all ranks, in one collective."""
        count = completion_mask.sum().float()
        names = list(metrics)
        stacked = torch.stack([metrics[name] * count for name in names] + [count])
        totals = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        return {name: totals[i] / totals[-1].clamp(min=1) for i, name in enumerate(names)}

    def _completion_metrics(self, rollout: RolloutOutput) -> dict[str, torch.Tensor]:
        """Completion lengths over every rank's samples (TRL's names)."""
        lengths = torch.tensor(
            [len(ids) for ids in rollout.completion_ids], dtype=torch.float, device=self.device
        )
        truncated = torch.tensor(rollout.truncated, dtype=torch.float, device=self.device)
        both = self.all_gather(torch.stack([lengths, truncated], 1)).reshape(-1, 2)  # (world_size * N, 2)
        return {
            "completions/mean_length": both[:, 0].mean(),
            "completions/min_length": both[:, 0].min(),
            "completions/max_length": both[:, 0].max(),
            "completions/clipped_ratio": both[:, 1].mean(),
        }


__all__ = ["DataCollatorForPrompts", "DistillationDataModule", "DistillationModule", "distillation_loss"]
