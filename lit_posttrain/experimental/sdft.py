"""SDFT: Self-Distilled Fine-Tuning (Shenfeld, Damani, Hübotter, Agrawal 2026, "Self-Distillation Enables
Continual Learning", https://arxiv.org/abs/2601.19897; TRL's experimental ``SDFTTrainer``).

Learning from demonstrations on-policy, with the model as its own teacher. Each row has a ``prompt``
and a ``privileged_context`` (a demonstration, the worked answer, a hint: something the model will
not see at inference). The student is the model given the prompt alone; the teacher is the *same
model* given the prompt and the privileged context, composed by ``teacher_prompt_template``
(TRL's default ``"{prompt}\\n\\n{privileged_context}"``). For each prompt x with context c:

    y ~ pi_theta(. | x)                                      the student samples (self.rollout.generate)
    S_t = pi_theta(. | x, y_<t)                              student next-token distribution
    T_t = stop_gradient(pi_theta(. | template(x, c), y_<t))  teacher: same weights, privileged context
    loss = sum_t D_alpha(S_t, T_t) / (completion tokens)

with ``D_alpha`` the generalized Jensen-Shannon divergence of GKD (``distillation_alpha``, TRL's
convention: 0 forward KL(T || S), 1 reverse KL(S || T), otherwise
``alpha KL(T || M) + (1 - alpha) KL(S || M)`` with ``M = (1 - alpha) S + alpha T``), computed by
``distillation_mode`` on (see `sdft_loss`):

- ``topk_logits`` (default): the student's top ``distillation_topk`` tokens at each position; both
  distributions restricted to them and renormalised (or, with ``distillation_add_tail``, with one
  extra bucket holding the rest of the mass);
- ``full_logits``: the whole vocabulary;
- ``sampled_token``: the sampled token only, the policy-gradient estimator of the reverse KL
  ``(log S(y_t) - log T(y_t)).detach() * log S(y_t)`` (needs ``distillation_alpha=1``).

No second copy of the weights: the teacher pass is a second forward of ``self.model`` under
``torch.no_grad()`` on the teacher prompt (``teacher_model_kind="live"``), or, with LoRA and
``teacher_model_kind="base"``, of the same model with its adapters disabled (the frozen initial
weights, the paper's fixed teacher, at no memory cost). Nothing is added to the module's
parameters, state_dict or optimizer, and SDFT adds no callback that holds weights.

Numbered departures from TRL's ``SDFTTrainer`` / the paper:
1. ``teacher_model_kind="live"`` by default (TRL and the paper: ``"base"``, a frozen copy of the
   initial weights, or ``"ema"``): a frozen copy of a full model doubles its memory, and this module
   must hold none. ``"base"`` is offered with LoRA only (adapters disabled: no copy); ``"ema"`` is
   not offered (it needs a second copy).
2. ``num_generations=1`` by default (TRL's shared self-distillation config: 8). SDFT has no group
   statistics; more samples per prompt is a batch-size choice.
3. No importance-sampling correction (TRL's ``distillation_is_clip``): every training step samples
   with the current weights and takes one optimizer step on them, so the ratio it would clip is 1.
   With `lit_posttrain.callbacks.VLLMRollout` the sampler's small numeric mismatch is not corrected.
4. The loss is normalised by the completion tokens of the step's batch over all ranks (TRL's
   default ``dapo`` aggregation for one micro-batch); under ``trainer.accumulate_grad_batches`` each
   micro-batch is normalised by its own tokens and the micro-batches weigh equally.
5. ``distillation_topk`` larger than the vocabulary uses the whole vocabulary (TRL's ``torch.topk``
   would fail).

Data: ``prompt`` (a string, or a list of messages rendered with the chat template and
``add_generation_prompt``) and ``privileged_context`` (a string; a list of messages is joined by
their contents, as TRL does). For a conversational prompt the template replaces the content of the
last (user) message; earlier messages (a system prompt) are kept. An optional ``completion`` column
(a string: the reference answer) is never trained on; it only gives the token accuracies below.

    {"prompt": "23+19=", "privileged_context": "23+19=42", "completion": "42"}

Metrics (``train/`` and ``val/``): ``loss``; ``kl`` the full-vocabulary reverse KL(S || T) per
completion token whatever the loss is (the quantity SDFT drives down, comparable across settings);
``teacher_entropy`` and ``student_entropy`` (nats per completion token);
``completions/mean_length|min_length|max_length|clipped_ratio``; ``num_tokens`` (train: prompt and
completion tokens so far); ``grad_norm`` and ``learning_rate``. Validation samples one greedy
completion per prompt from the student prompt and measures the same quantities on it.
With a ``completion`` column (not in TRL; absent without it), the answers are scored against it by
`token_accuracy` (each reference token position by position, then the end: 1 for an exact answer):
``completions/mean_token_accuracy`` (train: the step's sampled completions) and, on validation,
``mean_token_accuracy`` (the student's greedy completion from the prompt alone) and
``teacher_mean_token_accuracy`` (the teacher's greedy completion from the teacher prompt, adapters
off with ``teacher_model_kind="base"``): SDFT should move the first toward the second. Token-weighted
over ranks and the validation set.

Supports: plain and conversational prompts, LoRA, DDP and FSDP2 (``ModelParallelStrategy``; the
teacher pass is the sharded model's own forward), `lit_posttrain.callbacks.VLLMRollout`, exact
resume (the sampling RNG is checkpointed). Assumes a tokenizer with a pad token.

    lit-posttrain fit --config configs/quickstart/sdft.yaml
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import fully_shard
from transformers import PreTrainedTokenizerBase

from lit_posttrain.callbacks.diagnostics import TrainingDiagnostics
from lit_posttrain.data import (
    DataFormatError,
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
from lit_posttrain.models import DType, LoRAConfig, decoder_layers, is_peft_model, load_model, load_tokenizer
from lit_posttrain.ops import finite_grad_norm, masked_mean, pad
from lit_posttrain.rollout import HFRollout, RolloutOutput, sampling_rng
from lit_posttrain.schedulers import WarmupDecayLR

warn_experimental(__name__)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForSDFT:
    """Batch tokenized student and teacher prompts without padding: the rollout engine pads them.

    A reference completion (``reference_ids``) is passed on when every row of the batch has one.

    >>> collator = DataCollatorForSDFT()
    >>> batch = collator([
    ...     {"prompt_ids": [5, 6], "teacher_prompt_ids": [9, 5, 6], "prompt": "2+2=", "privileged_context": "4"},
    ...     {"prompt_ids": [8], "teacher_prompt_ids": [7, 8], "prompt": "3+3=", "privileged_context": "6"},
    ... ])
    >>> batch["prompt_ids"], batch["teacher_prompt_ids"]
    ([[5, 6], [8]], [[9, 5, 6], [7, 8]])
    >>> batch["prompt"]
    ['2+2=', '3+3=']
    """

    def __call__(self, examples: list[dict]) -> dict:
        batch = {
            "prompt_ids": [example["prompt_ids"] for example in examples],
            "teacher_prompt_ids": [example["teacher_prompt_ids"] for example in examples],
            "prompt": [example["prompt"] for example in examples],
        }
        if all(example.get("reference_ids") is not None for example in examples):
            batch["reference_ids"] = [example["reference_ids"] for example in examples]
        return batch


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
def compose_teacher_prompt(prompt: str | list[dict], privileged_context, template: str):
    """The teacher's prompt: ``template`` filled with the prompt and the privileged context (TRL's rule).

    A conversational prompt keeps its earlier messages and gets the template in its last message.

    >>> compose_teacher_prompt("23+19=", "23+19=42", "{privileged_context}\\n{prompt}")
    '23+19=42\\n23+19='
    >>> compose_teacher_prompt([{"role": "user", "content": "Solve 2+2."}], "Example answer: 4.",
    ...                        "{prompt}\\n\\n{privileged_context}")
    [{'role': 'user', 'content': 'Solve 2+2.\\n\\nExample answer: 4.'}]
    """
    if isinstance(privileged_context, list):  # messages: their text contents, one per line (TRL)
        privileged_context = "\n".join(
            str(m.get("content", "")) for m in privileged_context if m.get("content")
        )
    if is_conversational(prompt):
        text = template.format(prompt=prompt[-1]["content"], privileged_context=privileged_context)
        return list(prompt[:-1]) + [{**prompt[-1], "content": text}]
    return template.format(prompt=prompt, privileged_context=privileged_context)


class SDFTDataModule(L.LightningDataModule):
    """Load, check and tokenize ``prompt`` + ``privileged_context`` rows; batch ``batch_size`` prompts.

    Each example gets the student prompt's tokens (``prompt_ids``) and the teacher prompt's
    (``teacher_prompt_ids``: `compose_teacher_prompt` with ``teacher_prompt_template``). An optional
    ``completion`` column (the reference answer, a non-empty string: ``"42"``) is tokenized as
    ``reference_ids`` and only measured against (the token accuracies of `SDFTModule`), never trained on.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: prompts per training step (each sampled ``num_generations`` times). The last
            incomplete batch of an epoch is dropped.
        max_prompt_length: tokens kept of each student and teacher prompt (their end). None: all.
        teacher_prompt_template: how the teacher's prompt is made (TRL's option and default); must
            contain ``{prompt}`` and ``{privileged_context}``.
        dataset_split / val_dataset_split / dataset_config: hub dataset split and configuration.
        columns: maps the expected column names to the data's (``{privileged_context: solution}``).
        system_prompt: when set, each prompt (student and teacher) becomes a conversation that starts
            with this system message.
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
        teacher_prompt_template: str = "{prompt}\n\n{privileged_context}",
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
        if "{prompt}" not in teacher_prompt_template or "{privileged_context}" not in teacher_prompt_template:
            raise ValueError(
                "teacher_prompt_template must contain both {prompt} and {privileged_context}, got "
                f"{teacher_prompt_template!r}"
            )
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.train_data, self.val_data, self.val_size = train_data, val_data, val_size
        self.batch_size, self.max_prompt_length = batch_size, max_prompt_length
        self.teacher_prompt_template = teacher_prompt_template
        self.num_workers, self.seed = num_workers, seed
        self.dataset_split, self.val_dataset_split = dataset_split, val_dataset_split or dataset_split
        self.dataset_config, self.columns, self.system_prompt = dataset_config, columns, system_prompt
        self.collator = DataCollatorForSDFT()
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        if self.train_data is None:
            raise ValueError(
                "SDFTDataModule: train_data is required (a path, hub id, list of dicts or Dataset)"
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
        """Rows of ``data`` (its ``split``), renamed as ``columns`` says; each checked for both columns."""
        rows = load_rows(data, split=split, name=self.dataset_config, columns=self.columns)
        source = describe_source(data)
        try:
            required = {"prompt": "text", "privileged_context": "text"}
            check_rows(rows, required=required, optional={"completion": "str"}, source=source)
        except DataFormatError as error:
            if "missing column" in str(error) and "privileged_context" not in rows.column_names:
                raise DataFormatError(
                    f"{error}. SDFT needs a privileged_context column (the demonstration or worked answer the "
                    "teacher sees); map another column to it with data.columns: {privileged_context: <column>}"
                ) from None
            raise
        return rows

    def _tokenize(self, rows) -> list[dict]:
        """-> [{"prompt_ids", "teacher_prompt_ids", "prompt", ...}]; prompts keep their last tokens.

        With a ``completion`` column, also ``reference_ids``: its tokens (no special tokens added).
        """
        examples = []
        for row in rows:
            prompt = self._with_system_prompt(row["prompt"])
            teacher_prompt = compose_teacher_prompt(
                prompt, row["privileged_context"], self.teacher_prompt_template
            )
            examples.append(
                {
                    "prompt": prompt,
                    "privileged_context": row["privileged_context"],
                    "prompt_ids": self._encode(prompt),
                    "teacher_prompt_ids": self._encode(teacher_prompt),
                }
            )
            if row.get("completion") is not None:  # the reference answer: measured, not trained on
                reference = self.tokenizer(row["completion"], add_special_tokens=False)
                examples[-1]["reference_ids"] = reference["input_ids"]
        return examples

    def _with_system_prompt(self, prompt):
        if self.system_prompt is None:
            return prompt
        messages = prompt if is_conversational(prompt) else [{"role": "user", "content": prompt}]
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def _encode(self, prompt) -> list[int]:
        tok = self.tokenizer
        if is_conversational(prompt):
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_length :] if self.max_prompt_length is not None else ids

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
def generalized_divergence(
    student_logps: torch.Tensor, teacher_logps: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Per-position divergence between two log-distributions over the last dimension (TRL's convention).

    ``alpha=0``: KL(T || S) (forward); ``alpha=1``: KL(S || T) (reverse); otherwise
    ``alpha KL(T || M) + (1 - alpha) KL(S || M)`` with ``M = (1 - alpha) S + alpha T``.

    Args:
        student_logps / teacher_logps: (..., K) log-probabilities (each row sums to 1 in probability).
    Returns:
        (...) divergences in nats.
    """
    if alpha == 0.0:
        return F.kl_div(student_logps, teacher_logps, reduction="none", log_target=True).sum(-1)
    if alpha == 1.0:
        return F.kl_div(teacher_logps, student_logps, reduction="none", log_target=True).sum(-1)
    log_mixture = torch.logsumexp(
        torch.stack([student_logps + math.log(1 - alpha), teacher_logps + math.log(alpha)]), dim=0
    )
    kl_teacher = F.kl_div(log_mixture, teacher_logps, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(log_mixture, student_logps, reduction="none", log_target=True).sum(-1)
    return alpha * kl_teacher + (1 - alpha) * kl_student


def sdft_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    distillation_mode: Literal["topk_logits", "full_logits", "sampled_token"] = "topk_logits",
    distillation_alpha: float = 0.5,
    distillation_topk: int = 100,
    distillation_add_tail: bool = False,
    completion_ids: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The self-distillation loss of TRL's SDFT on the student's completion tokens.

    Args:
        student_logits: (B, C, V) the student's logits predicting each completion token (with grad).
        teacher_logits: (B, C, V) the teacher's (privileged-context) logits at the same tokens (no grad).
        completion_mask: (B, C) 1 on completion tokens that take the loss.
        distillation_mode: ``topk_logits`` (the student's top ``distillation_topk`` tokens, both
            distributions renormalised on them, or with one tail bucket if ``distillation_add_tail``),
            ``full_logits`` (the whole vocabulary) or ``sampled_token`` (the sampled token's
            ``(log S - log T).detach() * log S``, an estimator of the reverse KL's gradient).
        distillation_alpha: 0 forward KL(T || S), 1 reverse KL(S || T), between: generalized JSD.
        completion_ids: (B, C) the sampled tokens; needed by ``sampled_token``.
        num_items_in_batch: the normaliser (completion tokens of the whole batch, averaged over
            ranks under DDP); default: this batch's completion tokens.
    Returns:
        ``(loss, metrics)``: metrics (detached, means over completion tokens) ``kl`` (full-vocabulary
        KL(S || T)), ``student_entropy``, ``teacher_entropy``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"sdft_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 or wider
    mask = completion_mask.to(dtype)
    student_logps = F.log_softmax(student_logits.to(dtype), dim=-1)  # (B, C, V)
    teacher_logps = F.log_softmax(teacher_logits.to(dtype), dim=-1)  # (B, C, V)
    if distillation_mode == "topk_logits":
        k = min(distillation_topk, student_logps.size(-1))  # departure 5
        topk_student_logps, topk_indices = student_logps.topk(k, dim=-1)  # (B, C, k): the student's top k
        topk_teacher_logps = teacher_logps.gather(-1, topk_indices)  # (B, C, k)
        if distillation_add_tail:  # one more bucket: the mass outside the top k
            topk_student_logps = _add_tail(topk_student_logps)
            topk_teacher_logps = _add_tail(topk_teacher_logps)
        else:  # renormalised on the top k
            topk_student_logps = topk_student_logps - topk_student_logps.logsumexp(-1, keepdim=True)
            topk_teacher_logps = topk_teacher_logps - topk_teacher_logps.logsumexp(-1, keepdim=True)
        per_token_loss = generalized_divergence(topk_student_logps, topk_teacher_logps, distillation_alpha)
    elif distillation_mode == "full_logits":
        per_token_loss = generalized_divergence(student_logps, teacher_logps, distillation_alpha)  # (B, C)
    elif distillation_mode == "sampled_token":
        if distillation_alpha != 1.0:
            raise ValueError(
                f"distillation_mode='sampled_token' needs distillation_alpha=1.0 (reverse KL), got {distillation_alpha}"
            )
        if completion_ids is None:
            raise ValueError("sdft_loss: distillation_mode='sampled_token' needs completion_ids")
        student_token_logps = student_logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, C)
        teacher_token_logps = teacher_logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        # REINFORCE with the per-token reward log T - log S: its gradient is the reverse KL's (TRL)
        per_token_loss = (student_token_logps - teacher_token_logps).detach() * student_token_logps
    else:
        raise ValueError(
            "distillation_mode must be one of ['topk_logits', 'full_logits', 'sampled_token'], "
            f"got {distillation_mode!r}"
        )
    normalizer = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = (per_token_loss * mask).sum() / torch.as_tensor(normalizer, dtype=mask.dtype).clamp(min=1)
    with torch.no_grad():
        student_probs = student_logps.exp()
        metrics = {
            "kl": masked_mean((student_probs * (student_logps - teacher_logps)).sum(-1), mask),
            "student_entropy": masked_mean(-(student_probs * student_logps).sum(-1), mask),
            "teacher_entropy": masked_mean(-(teacher_logps.exp() * teacher_logps).sum(-1), mask),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}


def token_accuracy(
    completion_ids: list[list[int]], truncated: list[bool], reference_ids: list[list[int]]
) -> tuple[int, int]:
    """(correct, total): completion tokens equal to the reference's, position by position, and the end.

    Each reference (the tokens of a row's ``completion``) has one more position, its end: right when
    the completion stops there (its last token is an end token, not a truncation). A completion that
    is longer or shorter than its reference loses the positions it does not match. ``correct / total``
    is the token accuracy (1 for an exact answer).

    >>> # reference "42" = [8, 6]; EOS = 1. Exact; a wrong last digit; right digits but no end (truncated)
    >>> token_accuracy([[8, 6, 1], [8, 7, 1], [8, 6, 5]], [False, False, True], [[8, 6]] * 3)
    (7, 9)
    """
    correct = total = 0
    for ids, cut, reference in zip(completion_ids, truncated, reference_ids, strict=True):
        correct += sum(a == b for a, b in zip(ids, reference))
        correct += len(ids) == len(reference) + 1 and not cut  # stopped right after the answer
        total += len(reference) + 1
    return int(correct), total


def _add_tail(logps: torch.Tensor) -> torch.Tensor:
    """(..., k) top-k log-probs -> (..., k + 1): one more entry, log(1 - sum of the k probabilities)."""
    log_mass = logps.logsumexp(-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logps, torch.log(-torch.expm1(log_mass))], dim=-1)


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class SDFTModule(L.LightningModule):
    """Self-distilled fine-tuning: the model with the privileged context teaches the model without it.

    Args:
        model_name_or_path: hub id or local directory of the model (student and teacher).
        tokenizer_name_or_path: tokenizer location when it differs from the model's.
        random_init: build the model from its config with random weights (tests).
        model_config: config fields to override.
        init_seed: seed of the random initialisation.
        dtype: parameter dtype at load time (Lightning's ``precision`` decides the compute dtype).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: allow model code from the hub (off unless asked).
        lora: LoRA adapter settings; None for full fine-tuning.
        quantization: QLoRA: load the base in 4-bit or 8-bit (transformers' ``BitsAndBytesConfig`` fields,
            e.g. ``{load_in_4bit: true, bnb_4bit_quant_type: nf4}``); needs ``lora``. See docs/qlora.md.
        teacher_model_kind: ``"live"``: the current weights (default; departure 1); ``"base"``: the
            initial weights, with LoRA only (adapters disabled for the teacher pass).
        generate_from_teacher: sample from the teacher's prompt instead of the student's (TRL's
            option: better samples, less on-policy); the loss is still on the student's prompt.
        num_generations: completions sampled per prompt.
        max_completion_length: new tokens per completion at most.
        temperature / top_p / top_k: sampling settings (``top_k=0``: off). The loss is computed on
            temperature-scaled logits of student and teacher (TRL).
        distillation_mode: ``topk_logits``, ``full_logits`` or ``sampled_token`` (see `sdft_loss`).
        distillation_alpha: divergence direction: 0 forward KL, 0.5 JSD (default), 1 reverse KL.
        distillation_topk: tokens kept by ``topk_logits`` (TRL's default 100).
        distillation_add_tail: ``topk_logits`` with one bucket for the remaining mass instead of
            renormalising.
        num_loss_tokens_to_skip: the first completion tokens left out of the loss (TRL: teacher-prompt
            artifacts at the start of a completion).
        disable_dropout: set dropout to 0 so student and teacher passes are deterministic (TRL's default).
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback unless the Trainer
            has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step; a
            `lit_posttrain.schedulers.WarmupDecayLR` without ``num_training_steps`` gets the run's.
    """

    METHOD = "SDFT"
    PAPER = "https://arxiv.org/abs/2601.19897"

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
        teacher_model_kind: Literal["live", "base"] = "live",
        generate_from_teacher: bool = False,
        num_generations: int = 1,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        distillation_mode: Literal["topk_logits", "full_logits", "sampled_token"] = "topk_logits",
        distillation_alpha: float = 0.5,
        distillation_topk: int = 100,
        distillation_add_tail: bool = False,
        num_loss_tokens_to_skip: int = 0,
        disable_dropout: bool = True,
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if teacher_model_kind not in ("live", "base"):
            raise ValueError(
                f"teacher_model_kind must be one of ['live', 'base'], got {teacher_model_kind!r} ('ema' needs a "
                "second copy of the weights, which SDFTModule does not keep)"
            )
        if teacher_model_kind == "base" and lora is None:
            raise ValueError(
                "teacher_model_kind='base' needs lora (the teacher is the model with its adapters disabled): "
                "a frozen copy of the full model would double its memory. Set model.init_args.lora, or use "
                "teacher_model_kind: live"
            )
        if distillation_mode not in ("topk_logits", "full_logits", "sampled_token"):
            raise ValueError(
                "distillation_mode must be one of ['topk_logits', 'full_logits', 'sampled_token'], "
                f"got {distillation_mode!r}"
            )
        if not 0.0 <= distillation_alpha <= 1.0:
            raise ValueError(f"distillation_alpha must be in [0, 1], got {distillation_alpha}")
        if distillation_mode == "sampled_token" and distillation_alpha != 1.0:
            raise ValueError(
                f"distillation_mode='sampled_token' needs distillation_alpha=1.0 (reverse KL), got {distillation_alpha}"
            )
        if distillation_topk < 1:
            raise ValueError(f"distillation_topk must be >= 1, got {distillation_topk}")
        if num_loss_tokens_to_skip < 0:
            raise ValueError(f"num_loss_tokens_to_skip must be >= 0, got {num_loss_tokens_to_skip}")
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
        self.teacher_model_kind, self.generate_from_teacher = teacher_model_kind, generate_from_teacher
        self.num_generations, self.max_completion_length = num_generations, max_completion_length
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.distillation_mode, self.distillation_alpha = distillation_mode, distillation_alpha
        self.distillation_topk, self.distillation_add_tail = distillation_topk, distillation_add_tail
        self.num_loss_tokens_to_skip = num_loss_tokens_to_skip
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
        # 1. sample num_generations completions per prompt from the student prompt (or the teacher's)
        sampling_prompt_ids = (
            batch["teacher_prompt_ids"] if self.generate_from_teacher else batch["prompt_ids"]
        )
        with sampling_rng(self.generator):
            rollout = self.rollout.generate(
                self.model, sampling_prompt_ids, num_generations=self.num_generations,
                max_completion_length=self.max_completion_length, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k,
            )  # fmt: skip
        # 2. the loss and its metrics on those completions, after the student's and the teacher's prompts
        loss, metrics, num_tokens = self._shared_step(batch, rollout)
        # 3. metrics over every rank's samples (and their accuracy when the data has reference completions)
        metrics |= self._completion_metrics(rollout)
        if "reference_ids" in batch:
            correct, total = self._token_accuracy(rollout, batch["reference_ids"], self.num_generations)
            metrics["completions/mean_token_accuracy"] = correct / total.clamp(min=1)
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
        if "reference_ids" not in batch:
            return
        # the greedy answers of the student (prompt alone) and of the teacher (the privileged context; the
        # adapters off with teacher_model_kind="base")
        with self._teacher_context():
            teacher_rollout = self.rollout.generate(
                self.model, batch["teacher_prompt_ids"], num_generations=1,
                max_completion_length=self.max_completion_length, do_sample=False,
            )  # fmt: skip
        for name, answers in (
            ("mean_token_accuracy", rollout),
            ("teacher_mean_token_accuracy", teacher_rollout),
        ):
            correct, total = self._token_accuracy(answers, batch["reference_ids"], 1)
            # totals over every rank already: each rank logs the same value, weighted by all ranks' tokens
            accuracy = correct / total.clamp(min=1)
            self.log(f"val/{name}", accuracy, batch_size=max(int(total), 1), sync_dist=True)

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
        """`sdft_loss` of the rollout's completions; returns (loss, metrics, prompt + completion tokens)."""
        G = num_generations or self.num_generations
        completions = [torch.tensor(ids, dtype=torch.long) for ids in rollout.completion_ids]
        input_ids, attention_mask, completion_mask = self._pack(batch["prompt_ids"], completions, G)
        teacher_input_ids, teacher_attention_mask, _ = self._pack(batch["teacher_prompt_ids"], completions, G)
        C = completion_mask.size(1)
        if self.num_loss_tokens_to_skip:  # TRL: no loss on the first completion tokens
            completion_mask = completion_mask * (
                torch.arange(C, device=self.device) >= self.num_loss_tokens_to_skip
            )
        student_logits = self(input_ids, attention_mask, C)  # (N, C, V)
        with torch.no_grad(), self._teacher_context():  # the same weights: no copy, no gradient
            teacher_logits = self(teacher_input_ids, teacher_attention_mask, C)  # (N, C, V)
        # the normaliser: this step's completion tokens, averaged over ranks (DDP averages gradients)
        num_items_in_batch = self.trainer.strategy.reduce(completion_mask.sum().float(), reduce_op="mean")
        loss, metrics = sdft_loss(
            student_logits,
            teacher_logits,
            completion_mask,
            distillation_mode=self.distillation_mode,
            distillation_alpha=self.distillation_alpha,
            distillation_topk=self.distillation_topk,
            distillation_add_tail=self.distillation_add_tail,
            completion_ids=input_ids[:, -C:],
            num_items_in_batch=num_items_in_batch,
        )
        metrics = self._mean_over_ranks(metrics, completion_mask)
        metrics["loss"] = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        return loss, metrics, attention_mask.sum()

    def _teacher_context(self):
        """``base``: the adapters off for the teacher pass (LoRA); ``live``: nothing to change."""
        if self.teacher_model_kind == "base" and is_peft_model(self.model):
            return self.model.disable_adapter()
        return nullcontext()

    def _pack(self, prompt_ids: list[list[int]], completions: list[torch.Tensor], G: int):
        """Each prompt G times (prompt-major, as the rollout), left-padded, then its completion, right-padded.

        Returns ``input_ids`` (N, P+C), ``attention_mask`` (N, P+C), ``completion_mask`` (N, C). Student and
        teacher rows share the completion part, so their last C positions hold the same tokens.
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

    def _token_accuracy(self, rollout: RolloutOutput, reference_ids: list[list[int]], G: int):
        """`token_accuracy` of the rollout: (correct, total) summed over every rank."""
        references = [ids for ids in reference_ids for _ in range(G)]  # prompt-major, as the rollout
        correct, total = token_accuracy(rollout.completion_ids, rollout.truncated, references)
        sums = torch.tensor([correct, total], dtype=torch.float, device=self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return sums[0], sums[1]

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


__all__ = [
    "DataCollatorForSDFT",
    "SDFTDataModule",
    "SDFTModule",
    "compose_teacher_prompt",
    "sdft_loss",
    "token_accuracy",
]
