"""GKD: Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", https://arxiv.org/abs/2306.13649).

A student S is trained to match a frozen teacher T token by token on completions y of prompts x.
Each training step draws where the completions come from (paper Algorithm 1, TRL's GKDTrainer):

    with probability lmbda       y ~ S(. | x)   (on-policy: the student's own samples, at ``temperature``)
    else, if seq_kd               y ~ T(. | x)   (sequence-level KD: the teacher's samples)
    else                          y = the dataset's completion (supervised KD)

and minimises the generalized Jensen-Shannon divergence between the two next-token distributions
at every completion position t (paper eq. 1 and §3.1; `generalized_jsd_loss`)

    M_t  = (1 - beta) S_t + beta T_t                      (mixed in probability space)
    JSD_beta(t) = beta KL(T_t || M_t) + (1 - beta) KL(S_t || M_t)       for 0 < beta < 1
    beta = 0: KL(T_t || S_t) (forward KL, supervised KD);  beta = 1: KL(S_t || T_t) (reverse KL)
    loss = sum over completion positions of JSD_beta(t) / number of completion positions

(The mixture weight convention is TRL's: M puts weight beta on the teacher, so the two limits are
the forward and reverse KL as stated. JSD_0.5 is the symmetric JSD, bounded by ln 2.)

Numbered departures from TRL's GKDTrainer (none from the paper's algorithm):
1. The coin is flipped once per training step (micro-batch) from a checkpointed ``torch.Generator``
   seeded from rank 0's seed, so every rank draws the same source (needed under FSDP2, where
   generation is collective) and a resumed run continues the same sequence; sampling draws from a
   second, per-rank checkpointed generator (as GRPO's). TRL uses Python's ``random``, not restored
   on resume.
2. With ``seq_kd`` the teacher samples only in the steps where the coin chose it (TRL samples the
   teacher every step and then overwrites its samples with the student's with probability lmbda;
   the distribution of the completions is the same, the compute is lower).
3. ``generalized_jsd_loss(..., reduction="none")`` returns one JSD per position, (...,), 0 where
   ``labels == -100`` (TRL returns the element-wise (..., V) terms of the kept positions).
4. Dataset completions end with the tokenizer's EOS (plain prompt-completion) or the chat template's
   end of turn (conversations), and the loss covers that token, as SFT here.
5. Validation (which TRL's GKDTrainer computes as the training loss on dataset completions) also
   logs the student's and the teacher's token accuracy on the dataset completions and the length of
   greedy student completions.

``temperature``: the sampling temperature of the on-policy (and seq_kd) completions. The loss is
computed at temperature 1 (``generalized_jsd_loss``'s own ``temperature`` argument is left at 1.0),
as in TRL, so the student matches the teacher's actual distribution.

Training loop (automatic optimization; gradient accumulation and clipping are the Trainer's):

    coin = rand(coin_generator) < lmbda                              # same draw on every rank
    if coin:     completions = self.rollout.generate(self.model, prompt_ids, ...)   # on-policy
    elif seq_kd: completions = teacher_rollout.generate(teacher.model, prompt_ids, ...)
    else:        completions = batch["completion_ids"]
    student_logits (grad), teacher_logits (no grad) on prompt + completions   # (B, C, V) each
    loss = generalized_jsd_loss(student_logits, teacher_logits, labels, beta=beta)

Supports: ``messages`` rows (the last message is the assistant completion, the earlier ones the
prompt, rendered with the chat template) and ``prompt``/``completion`` rows (plain or
conversational), the `lit_posttrain.callbacks.VLLMRollout` engine for the on-policy samples, LoRA,
DDP and FSDP2 (the teacher is sharded like the student, `lit_posttrain.callbacks.TeacherModel`).
Assumes: teacher and student share a tokenizer (checked at setup); a causal LM whose forward accepts
``logits_to_keep``.

Metrics (``train/`` per step over every rank, ``val/`` over the held-out set): ``loss``; ``jsd``
(the generalized JSD per completion token, token-weighted over ranks; with ``beta`` 0 or 1 it is
the forward or reverse KL); ``teacher_entropy`` and ``student_entropy`` (mean per completion token,
nats); ``on_policy_fraction`` (train: the fraction of training steps so far that used the
student's samples, ~lmbda); ``completions/mean_length|min_length|max_length`` (train: the step's
completions, whatever their source; val: greedy student completions of ``max_new_tokens`` at most);
``num_tokens``, ``grad_norm``, ``learning_rate`` (train); ``mean_token_accuracy`` and
``teacher_mean_token_accuracy`` (val, on the dataset completions).

    lit-posttrain fit --config configs/quickstart/gkd.yaml
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_posttrain.callbacks.diagnostics import TrainingDiagnostics
from lit_posttrain.callbacks.reference_model import TeacherModel, find_teacher_model
from lit_posttrain.data import (
    DataFormatError,
    DatasetSource,
    LookaheadLoader,
    check_rows,
    describe_source,
    load_rows,
    split_rows,
    tokenize_cached,
)
from lit_posttrain.experimental import warn_experimental
from lit_posttrain.models import DType, LoRAConfig, decoder_layers, load_model, load_tokenizer
from lit_posttrain.ops import entropy_from_logits, finite_grad_norm, pad
from lit_posttrain.rollout import HFRollout, sampling_rng
from lit_posttrain.schedulers import WarmupDecayLR

warn_experimental(__name__)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForGKD:
    """Batch tokenized prompt-completion examples without padding: the module packs the sequences
    itself, after choosing the completions (dataset, student or teacher samples).

    >>> collator = DataCollatorForGKD()
    >>> batch = collator([{"prompt_ids": [5, 6], "completion_ids": [7, 1]}, {"prompt_ids": [8], "completion_ids": [9, 9, 1]}])
    >>> batch["prompt_ids"], batch["completion_ids"]
    ([[5, 6], [8]], [[7, 1], [9, 9, 1]])
    """

    def __call__(self, examples: list[dict]) -> dict:
        return {
            "prompt_ids": [example["prompt_ids"] for example in examples],
            "completion_ids": [example["completion_ids"] for example in examples],
        }


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
class GKDDataModule(L.LightningDataModule):
    """Load, check and tokenize SFT-shaped data into prompts and completions.

    Rows: ``messages`` (a conversation whose last message is the assistant's: the completion; the
    earlier messages are the prompt, rendered with ``add_generation_prompt=True``), or ``prompt`` and
    ``completion`` (strings, or lists of messages rendered with the chat template). Plain completions
    get the EOS token appended.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: prompts per micro-batch. The last incomplete training batch of an epoch is dropped.
        max_prompt_length: prompt tokens kept (the end); None: all.
        max_length: prompt + dataset completion tokens kept (the completion is cut); None: all.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the ``val_size`` split.
        dataset_split: split to read ``train_data`` from, for a hub dataset.
        val_dataset_split: split to read ``val_data`` from (e.g. ``test``); default ``dataset_split``.
        dataset_config: hub dataset configuration name.
        columns: maps the expected column names to the data's (``{prompt: question, completion: answer}``).
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
        self.batch_size, self.max_prompt_length, self.max_length = batch_size, max_prompt_length, max_length
        self.num_workers, self.seed = num_workers, seed
        self.dataset_split, self.val_dataset_split = dataset_split, val_dataset_split or dataset_split
        self.dataset_config, self.columns = dataset_config, columns
        self.collator = DataCollatorForGKD()
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        if self.train_data is None:
            raise ValueError(
                "GKDDataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
            )
        train = load_rows(
            self.train_data, split=self.dataset_split, name=self.dataset_config, columns=self.columns
        )
        source = describe_source(self.train_data)
        self._check(train, source)
        val, val_source = None, None
        if self.val_data is not None:
            val = load_rows(
                self.val_data, split=self.val_dataset_split, name=self.dataset_config, columns=self.columns
            )
            val_source = describe_source(self.val_data)
            self._check(val, val_source)
        elif self.val_size:
            train, val = split_rows(train, self.val_size, seed=self.seed)
            val_source = f"{source} (validation split)"
        self.train_examples = tokenize_cached(self, self._tokenize, train, source)
        self.val_examples = tokenize_cached(self, self._tokenize, val, val_source) if val is not None else None

    def _check(self, rows, source: str) -> None:
        columns = set(rows.column_names)
        if "messages" in columns:
            check_rows(rows, required={"messages": "messages"}, source=source)
            for i, row in enumerate(rows):
                if len(row["messages"]) < 2 or row["messages"][-1]["role"] != "assistant":
                    raise DataFormatError(
                        f"{source}: row {i}, column 'messages': GKD needs a conversation that ends with an "
                        "assistant message (the completion) after at least one prompt message"
                    )
        elif {"prompt", "completion"} <= columns:
            check_rows(rows, required={"prompt": "text", "completion": "text"}, source=source)
        else:
            raise DataFormatError(
                f"{source}: GKD needs a 'messages' column, or 'prompt' and 'completion' columns; found "
                f"{rows.column_names}"
            )

    def _tokenize(self, rows, source: str) -> list[dict]:
        """-> [{"prompt_ids", "completion_ids"}], truncated as ``max_prompt_length`` / ``max_length`` say."""
        tok = self.tokenizer
        examples = []
        for i, row in enumerate(rows):
            if "messages" in row:
                prompt, completion = row["messages"][:-1], row["messages"][-1:]
            else:
                prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str):
                prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            else:
                prompt_ids = list(
                    tok.apply_chat_template(
                        prompt, tokenize=True, add_generation_prompt=True, return_dict=True
                    )["input_ids"]
                )
                ids = list(
                    tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
                )
                if ids[: len(prompt_ids)] != prompt_ids:
                    raise DataFormatError(
                        f"{source}: row {i}: the chat template renders prompt + completion with a different "
                        "prefix than the prompt alone, so the completion cannot be cut out of the conversation"
                    )
                completion_ids = ids[len(prompt_ids) :]
            if self.max_prompt_length is not None:
                prompt_ids = prompt_ids[-self.max_prompt_length :]
            if self.max_length is not None:
                completion_ids = completion_ids[: max(self.max_length - len(prompt_ids), 0)]
            if not completion_ids:
                raise DataFormatError(
                    f"{source}: row {i}: the completion is empty (after truncation to max_length={self.max_length})"
                )
            examples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids})
        return examples

    def train_dataloader(self):
        # stateful (exact mid-epoch resume); the normaliser is counted after the completions are chosen
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
        return DataLoader(
            self.val_examples,
            batch_size=self.batch_size,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The generalized Jensen-Shannon divergence between student and teacher token distributions
    (GKD, arXiv 2306.13649 §3.1; TRL's ``GKDTrainer.generalized_jsd_loss``).

    With ``S = softmax(student_logits / temperature)``, ``T = softmax(teacher_logits / temperature)``
    and ``M = (1 - beta) S + beta T`` (mixed in probability space, as log-sum-exp of log-probs):
    ``beta = 0`` gives KL(T || S) (forward KL), ``beta = 1`` KL(S || T) (reverse KL), otherwise
    ``beta KL(T || M) + (1 - beta) KL(S || M)``. Computed in float32 (or wider).

    Args:
        student_logits: (..., V) logits of the student (with grad).
        teacher_logits: (..., V) logits of the teacher, same shape.
        labels: (...) token ids; positions with ``-100`` are ignored. None: every position counts.
        beta: the interpolation in [0, 1].
        temperature: both logits are divided by it before the softmax (GKD uses 1: the loss
            compares the models' actual distributions; the sampling temperature is separate).
        reduction: ``"batchmean"`` (sum over kept positions / their number), ``"sum"``, ``"mean"``
            (sum / (kept positions x V), as ``torch.nn.functional.kl_div``'s ``mean``), or ``"none"``
            (the JSD of each position, (...), 0 where ignored).

    >>> logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    >>> generalized_jsd_loss(logits, logits).abs().item() < 1e-6  # identical distributions (up to rounding)
    True
    >>> s, t = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[0.0, -1e4]]])  # (1/2, 1/2) vs (1, 0)
    >>> round(generalized_jsd_loss(s, t, beta=0.0).item(), 4)  # KL(T||S) = 1 * ln(1 / (1/2)) = ln 2
    0.6931
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd_loss: beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"generalized_jsd_loss: temperature must be > 0, got {temperature}")
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(
            f"generalized_jsd_loss: reduction must be one of ['batchmean', 'sum', 'mean', 'none'], got {reduction!r}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"generalized_jsd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (a different vocabulary size?)"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_logps = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (..., V)
    teacher_logps = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (..., V)
    # kl_div(input, target, log_target=True) = target.exp() * (target - input) = the terms of KL(target || input)
    if beta == 0.0:  # forward KL(T || S)
        per_element = F.kl_div(student_logps, teacher_logps, reduction="none", log_target=True)
    elif beta == 1.0:  # reverse KL(S || T)
        per_element = F.kl_div(teacher_logps, student_logps, reduction="none", log_target=True)
    else:  # log M = log((1 - beta) S + beta T)
        mixture_logps = torch.logsumexp(
            torch.stack([student_logps + torch.log1p(torch.tensor(-beta, dtype=dtype)),
                         teacher_logps + torch.log(torch.tensor(beta, dtype=dtype))]),
            dim=0,
        )  # fmt: skip
        kl_teacher = F.kl_div(mixture_logps, teacher_logps, reduction="none", log_target=True)  # KL(T || M)
        kl_student = F.kl_div(mixture_logps, student_logps, reduction="none", log_target=True)  # KL(S || M)
        per_element = beta * kl_teacher + (1 - beta) * kl_student
    per_position = per_element.sum(-1)  # (...)
    if labels is not None:
        mask = labels != -100
        per_position = per_position * mask
        num_kept = mask.sum()
    else:
        num_kept = torch.tensor(per_position.numel(), device=per_position.device)
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if reduction == "mean":
        return per_position.sum() / (num_kept * student_logits.size(-1)).clamp(min=1)
    return per_position.sum() / num_kept.clamp(min=1)  # batchmean


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class GKDModule(L.LightningModule):
    """Generalized knowledge distillation of a student into a frozen teacher's token distributions.

    Args:
        model_name_or_path: the student: hub id or local directory.
        tokenizer_name_or_path: tokenizer location when it differs from the model's.
        random_init: build the student from its config with random weights (tests, quickstart).
        model_config: config fields to override (e.g. ``{"num_hidden_layers": 1}``).
        init_seed: seed of the random initialisation.
        dtype: parameter dtype of the student at load time.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: allow model code from the hub (off unless asked).
        lora: LoRA adapter settings; None for full fine-tuning.
        quantization: QLoRA: load the base in 4-bit or 8-bit (transformers' ``BitsAndBytesConfig`` fields,
            e.g. ``{load_in_4bit: true, bnb_4bit_quant_type: nf4}``); needs ``lora``. See docs/qlora.md.
        teacher_model_name_or_path: the teacher (TRL's name); the module adds
            ``TeacherModel(teacher_model_name_or_path)`` unless the Trainer has a `TeacherModel`
            (use the callback directly for its dtype and other options).
        lmbda: probability that a step's completions are the student's own samples (TRL 0.5).
        beta: the generalized JSD's interpolation: 0 forward KL, 1 reverse KL (TRL 0.5).
        temperature: sampling temperature of the student's (and seq_kd teacher's) completions (TRL 0.9).
        max_new_tokens: completion tokens sampled at most (TRL 128).
        seq_kd: when the coin does not choose the student, use the teacher's samples instead of the
            dataset's completions (TRL False).
        disable_dropout: set the student's dropout to 0 (TRL True).
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback unless the Trainer has one.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
    """

    METHOD = "GKD"
    PAPER = "https://arxiv.org/abs/2306.13649"

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
        teacher_model_name_or_path: str | None = None,
        lmbda: float = 0.5,
        beta: float = 0.5,
        temperature: float = 0.9,
        max_new_tokens: int = 128,
        seq_kd: bool = False,
        disable_dropout: bool = True,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=2e-5, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
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
            disable_dropout=disable_dropout,
        )
        self.tokenizer = load_tokenizer(
            tokenizer_name_or_path or model_name_or_path, trust_remote_code=trust_remote_code
        )
        self.rollout = HFRollout(self.tokenizer)  # the student's samples (swapped for vLLM by VLLMRollout)
        self.teacher_rollout = HFRollout(self.tokenizer)  # the teacher's samples (seq_kd), always HF generate
        self.teacher_model_name_or_path = teacher_model_name_or_path
        self.lmbda, self.beta, self.temperature = lmbda, beta, temperature
        self.max_new_tokens, self.seq_kd = max_new_tokens, seq_kd
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        self.register_buffer(
            "num_tokens", torch.zeros((), dtype=torch.long)
        )  # prompt + completion tokens, all ranks
        self.register_buffer("num_on_policy_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_training_steps", torch.zeros((), dtype=torch.long))
        self.generator: torch.Generator | None = None  # this rank's sampling RNG, created in setup
        self.coin_generator: torch.Generator | None = None  # the on-policy coin, the same on every rank
        self.val_loss, self.val_jsd = MeanMetric(), MeanMetric()
        self.val_teacher_entropy, self.val_student_entropy = MeanMetric(), MeanMetric()
        self.val_accuracy, self.val_teacher_accuracy = MeanMetric(), MeanMetric()
        self.val_completion_length = MeanMetric()

    def configure_callbacks(self):
        """The teacher (``TeacherModel(teacher_model_name_or_path)`` unless the Trainer has one) and a
        default `TrainingDiagnostics` unless the Trainer has one (or ``diagnostics=False``)."""
        callbacks = []
        if not any(isinstance(c, TeacherModel) for c in self.trainer.callbacks):
            if self.teacher_model_name_or_path is None:
                raise ValueError(
                    f"{self.METHOD}: no teacher: set model.init_args.teacher_model_name_or_path, or add a "
                    "lit_posttrain.callbacks.TeacherModel callback to trainer.callbacks"
                )
            callbacks.append(TeacherModel(self.teacher_model_name_or_path))
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

    def forward(self, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
        """(N, C, V) student logits predicting the last C = ``logits_to_keep`` tokens of ``input_ids``."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep + 1,
            use_cache=False,
        ).logits[:, :-1]  # position t predicts completion token t

    def training_step(self, batch, batch_idx):
        prompt_ids = batch["prompt_ids"]
        # 1. where the completions come from: the same coin on every rank (generation is collective under FSDP2)
        on_policy = bool(torch.rand((), generator=self.coin_generator) < self.lmbda)
        if on_policy:  # the student's own samples
            with sampling_rng(self.generator):
                rollout = self.rollout.generate(
                    self.model,
                    prompt_ids,
                    max_completion_length=self.max_new_tokens,
                    temperature=self.temperature,
                )
            completion_ids = rollout.completion_ids
        elif self.seq_kd:  # the teacher's samples
            teacher = find_teacher_model(self.trainer, self.METHOD)
            with sampling_rng(self.generator):
                rollout = self.teacher_rollout.generate(
                    teacher.model,
                    prompt_ids,
                    max_completion_length=self.max_new_tokens,
                    temperature=self.temperature,
                )
            completion_ids = rollout.completion_ids
        else:  # the dataset's completions
            completion_ids = batch["completion_ids"]
        # 2. prompt (left-padded) + completion (right-padded): (B, P+C), (B, P+C), labels (B, C)
        input_ids, attention_mask, labels = self._pack(prompt_ids, completion_ids)
        # 3. generalized JSD between the student's and the teacher's next-token distributions
        loss, sums = self._distill(input_ids, attention_mask, labels)
        # 4. metrics over every rank (one collective)
        self.num_training_steps += 1
        self.num_on_policy_steps += int(on_policy)
        lengths = (labels != -100).sum(1).float()  # (B,)
        stats = torch.stack([sums["jsd"], sums["teacher_entropy"], sums["student_entropy"], sums["num_targets"],
                             attention_mask.sum().float(), lengths.sum(), lengths.new_tensor(len(lengths))])  # fmt: skip
        reduced = self.trainer.strategy.reduce(stats, reduce_op="sum")
        jsd, teacher_entropy, student_entropy, num_targets, num_tokens, length_sum, num_rows = reduced
        extremes = torch.stack([lengths.min(), -lengths.max()])
        min_length, neg_max_length = self.trainer.strategy.reduce(extremes, reduce_op="min")
        n = num_targets.clamp(min=1)
        self.num_tokens += num_tokens.long()
        self.log("train/loss", self.trainer.strategy.reduce(loss.detach(), reduce_op="mean"), prog_bar=True)
        self.log("train/jsd", jsd / n)
        self.log("train/teacher_entropy", teacher_entropy / n)
        self.log("train/student_entropy", student_entropy / n)
        self.log("train/on_policy_fraction", self.num_on_policy_steps.float() / self.num_training_steps)
        self.log("train/completions/mean_length", length_sum / num_rows)
        self.log("train/completions/min_length", min_length)
        self.log("train/completions/max_length", -neg_max_length)
        self.log("train/num_tokens", self.num_tokens.float())
        return loss

    def validation_step(self, batch, batch_idx):
        input_ids, attention_mask, labels = self._pack(batch["prompt_ids"], batch["completion_ids"])
        loss, sums = self._distill(input_ids, attention_mask, labels)
        num_targets = sums["num_targets"]
        n = num_targets.clamp(min=1)
        # greedy student completions: how long the student's own answers are
        rollout = self.rollout.generate(
            self.model, batch["prompt_ids"], max_completion_length=self.max_new_tokens, do_sample=False
        )
        self.val_loss.update(loss, weight=num_targets)
        self.val_jsd.update(sums["jsd"] / n, weight=num_targets)
        self.val_teacher_entropy.update(sums["teacher_entropy"] / n, weight=num_targets)
        self.val_student_entropy.update(sums["student_entropy"] / n, weight=num_targets)
        self.val_accuracy.update(sums["correct"] / n, weight=num_targets)
        self.val_teacher_accuracy.update(sums["teacher_correct"] / n, weight=num_targets)
        self.val_completion_length.update(
            torch.tensor([len(ids) for ids in rollout.completion_ids], dtype=torch.float)
        )
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/jsd", self.val_jsd)
        self.log("val/teacher_entropy", self.val_teacher_entropy)
        self.log("val/student_entropy", self.val_student_entropy)
        self.log("val/mean_token_accuracy", self.val_accuracy)
        self.log("val/teacher_mean_token_accuracy", self.val_teacher_accuracy)
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

    def setup(self, stage: str) -> None:
        # sampling draws from this rank's own RNG stream (seeded from the global seed and the rank), the
        # coin from one stream seeded from rank 0's seed (the same draw on every rank); both are saved
        # in checkpoints (Lightning does not save the global RNG), so a resumed run continues them
        seed = self.trainer.strategy.broadcast(torch.initial_seed(), src=0)
        self.generator = torch.Generator(self.trainer.strategy.root_device)
        self.generator.manual_seed(seed + self.global_rank)
        self.coin_generator = torch.Generator()
        self.coin_generator.manual_seed(seed)

    def on_before_optimizer_step(self, optimizer) -> None:
        # TRL's grad_norm (before clipping) and learning_rate, once per optimizer step
        self.log("train/grad_norm", finite_grad_norm(self.parameters(), self.global_step))
        self.log("train/learning_rate", float(optimizer.param_groups[0]["lr"]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every rank's sampling RNG state (this hook runs on every rank; the strategy writes rank 0's dict)
        state = self.generator.get_state().to(self.device)
        checkpoint["generator_states"] = (
            self.trainer.strategy.all_gather(state).view(self.trainer.world_size, -1).cpu()
        )
        checkpoint["coin_generator_state"] = self.coin_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("generator_states")
        if states is None or self.generator is None:  # load_from_checkpoint: nothing to continue
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(
                f"{self.METHOD}: the checkpoint holds the sampling RNG states of {len(states)} processes, this run "
                f"has {self.trainer.world_size}: sampling restarts from the seed (not an exact continuation)"
            )
        else:
            self.generator.set_state(states[self.global_rank].clone())  # a copy: set_state rejects a row view
        self.coin_generator.set_state(checkpoint["coin_generator_state"])

    # -----------------------------------------------------------------------------------------
    # Helpers
    # -----------------------------------------------------------------------------------------
    def _pack(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]):
        """Prompts left-padded, then completions right-padded: ``input_ids`` (B, P+C), ``attention_mask``
        (B, P+C), ``labels`` (B, C): the completion tokens, -100 on padding."""
        pad_token_id = self.tokenizer.pad_token_id
        prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
        completions = [torch.tensor(ids, dtype=torch.long) for ids in completion_ids]
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompts], 0, "left")  # (B, P)
        completion_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in completions], 0)  # (B, C)
        completion = pad(completions, pad_token_id)  # (B, C)
        input_ids = torch.cat([pad(prompts, pad_token_id, "left"), completion], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        labels = completion.masked_fill(completion_mask == 0, -100)
        return input_ids.to(self.device), attention_mask.to(self.device), labels.to(self.device)

    def _distill(self, input_ids, attention_mask, labels):
        """The loss of one batch and its metric sums (jsd, entropies, token accuracies, target count)."""
        C = labels.size(1)
        student_logits = self(input_ids, attention_mask, C)  # (B, C, V)
        teacher = find_teacher_model(self.trainer, self.METHOD)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        teacher_logits = teacher.forward(input_ids, attention_mask, position_ids, logits_to_keep=C + 1)[
            :, :-1
        ]
        loss = generalized_jsd_loss(student_logits, teacher_logits, labels, beta=self.beta)
        with torch.no_grad():
            mask = labels != -100  # (B, C)
            per_token_jsd = generalized_jsd_loss(
                student_logits, teacher_logits, labels, beta=self.beta, reduction="none"
            )
            sums = {
                "jsd": per_token_jsd.sum(),
                "teacher_entropy": entropy_from_logits(teacher_logits.float())[mask].sum(),
                "student_entropy": entropy_from_logits(student_logits.detach().float())[mask].sum(),
                "correct": (student_logits.argmax(-1) == labels)[mask].sum().float(),
                "teacher_correct": (teacher_logits.argmax(-1) == labels)[mask].sum().float(),
                "num_targets": mask.sum().float(),
            }
        return loss, sums
