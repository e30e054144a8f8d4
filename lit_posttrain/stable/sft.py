"""Supervised fine-tuning (SFT): next-token negative log-likelihood on demonstrations.

    loss = - sum_{t in T} log p_theta(y_t | y_<t) / |T|

where ``T`` is the set of target tokens in the whole (accumulated, all-rank) batch: completion
tokens for prompt-completion data, assistant tokens for conversations, all tokens for plain text.
The DFT variant (Wu et al. 2025, "On the Generalization of SFT", https://arxiv.org/abs/2508.05629,
eq. 9) weights each token's loss by its detached probability: ``- sg(p_t) * log p_t``.

Departures from common practice, numbered:
1. The loss is normalised by the target tokens of the whole optimizer step (across gradient
   accumulation and ranks), not per micro-batch, so 4x1 and 1x4 give the same gradient.
   `SFTDataModule` attaches ``num_items_in_batch`` to each micro-batch by looking ahead over the
   accumulation window; without it (your own DataLoader) each micro-batch is normalised by its own
   tokens.
2. Best-fit-decreasing packing fills each row with whole sequences and ``position_ids`` that
   restart at every sequence; transformers builds a block-diagonal mask from them, so attention
   never crosses documents and the loss equals the unpacked loss. Rows are not concatenated into
   one (the usual "padding-free" layout): without a varlen attention kernel (flash-attention) a
   single long row costs attention quadratic in the whole batch's length; BFD rows are nearly
   full, so the padding left is small.
3. ``train/mean_token_accuracy`` and ``train/entropy`` are computed only on the optimizer steps whose
   metrics reach a reader: those Lightning logs (every ``trainer.log_every_n_steps``), the run's last
   step (``max_steps``), and every step when there is no logger (callbacks then read ``trainer.callback_metrics``
   after each batch). They cost extra passes over every chunk's logits (entropy, argmax), a
   sixth to a quarter of a step on a small model with a 32k vocabulary (docs/benchmarks.md). Each logged value
   is that optimizer step's (TRL computes them every step and logs the mean since its last log).
   Validation always computes them.

Supports: plain text (``text``), conversations (``messages``), prompt-completion (plain or
conversational); completion-only and assistant-only loss; packing (``bfd``, ``wrapped``); LoRA;
validation with the same metrics. Metrics: ``loss``, ``mean_token_accuracy``, ``entropy``,
``num_tokens``.
Assumes: a tokenizer with an EOS token; for assistant-only loss a chat template that marks
assistant turns with ``{% generation %}``.

    lit-posttrain fit --config configs/quickstart/sft.yaml
"""

from __future__ import annotations

import bisect
import warnings
from typing import Literal

import lightning as L
import torch
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
from lit_posttrain.ops import chunked_selective_log_softmax, finite_grad_norm, pad
from lit_posttrain.schedulers import WarmupDecayLR


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------
class DataCollatorForLanguageModeling:
    """Turn tokenized examples into a batch.

    Each example has ``input_ids`` (list[int]), ``completion_mask`` (1 where the loss is taken) and
    ``seq_lengths`` (lengths of the sequences it packs; one entry when not packed).

    Returns ``input_ids`` and ``labels`` (B, T), right-padded, and either ``attention_mask`` (B, T)
    or, with ``packed=True``, ``position_ids`` (B, T) that restart at 0 for every packed sequence
    (and for the padding tail): transformers then builds a block-diagonal causal mask from them, so
    no token attends across documents. A sequence's first token has label -100: nothing before it
    in that sequence predicts it.

    >>> collator = DataCollatorForLanguageModeling(pad_token_id=0)
    >>> batch = collator([
    ...     {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1], "seq_lengths": [4]},
    ...     {"input_ids": [9, 10], "completion_mask": [1, 1], "seq_lengths": [2]},
    ... ])
    >>> batch["input_ids"]
    tensor([[ 5,  6,  7,  8],
            [ 9, 10,  0,  0]])
    >>> batch["labels"]
    tensor([[-100, -100,    7,    8],
            [-100,   10, -100, -100]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 1],
            [1, 1, 0, 0]])

    Packed: the first row holds two sequences (3 and 2 tokens).

    >>> collator = DataCollatorForLanguageModeling(pad_token_id=0, packed=True)
    >>> batch = collator([
    ...     {"input_ids": [5, 6, 7, 8, 9], "completion_mask": [0, 1, 1, 1, 1], "seq_lengths": [3, 2]},
    ...     {"input_ids": [10, 11], "completion_mask": [1, 1], "seq_lengths": [2]},
    ... ])
    >>> batch["position_ids"]
    tensor([[0, 1, 2, 0, 1],
            [0, 1, 0, 1, 2]])
    >>> batch["labels"]
    tensor([[-100,    6,    7, -100,    9],
            [-100,   11, -100, -100, -100]])
    """

    def __init__(self, pad_token_id: int, packed: bool = False):
        self.pad_token_id = pad_token_id
        self.packed = packed

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, position_ids = [], [], []
        for example in examples:
            ids = torch.tensor(example["input_ids"], dtype=torch.long)
            target = torch.where(torch.tensor(example["completion_mask"], dtype=torch.bool), ids, -100)
            positions = torch.cat([torch.arange(n) for n in example["seq_lengths"]])
            target[positions == 0] = -100  # sequence starts: no previous token predicts them
            input_ids.append(ids)
            labels.append(target)
            position_ids.append(positions)
        batch = {"input_ids": pad(input_ids, self.pad_token_id), "labels": pad(labels, -100)}  # (B, T)
        if self.packed:
            longest = batch["input_ids"].size(1)
            # the padding tail is a segment of its own, restarting at 0 (causal: real tokens never see it)
            batch["position_ids"] = pad([torch.cat([p, torch.arange(longest - len(p))]) for p in position_ids], 0)
        else:
            batch["attention_mask"] = pad([torch.ones_like(ids) for ids in input_ids], 0)
        return batch


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
def pack_bfd(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: indices of the sequences in each bin of ``max_length``.

    Longest first; each goes into the open bin with the least room that still fits it.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining space, bin index)
    for i in order:
        pos = bisect.bisect_left(room, (lengths[i], -1))
        if pos == len(room):
            bins.append([i])
            bisect.insort(room, (max_length - lengths[i], len(bins) - 1))
        else:
            space, b = room.pop(pos)
            bins[b].append(i)
            bisect.insort(room, (space - lengths[i], b))
    return bins


class SFTDataModule(L.LightningDataModule):
    """Load, check, tokenize, optionally pack, and batch SFT data.

    Args:
        tokenizer: tokenizer (or its path / hub id; the CLI links it to the model's).
        train_data: path (json/jsonl/parquet/csv file or directory), hub id, list of dicts or Dataset.
        val_data: validation data; when None and ``val_size > 0`` it is split from ``train_data``.
        val_size: fraction (< 1) or number of training rows held out for validation.
        batch_size: sequences (or packs, with packing) per micro-batch.
        max_length: tokens per sequence (or per pack); longer sequences are truncated, keeping the start.
        packing: ``"bfd"`` (best-fit-decreasing: each row packs whole sequences up to ``max_length``,
            with ``position_ids`` restarting per sequence, so no attention across documents),
            ``"wrapped"`` (concatenate everything and cut into ``max_length`` chunks; attention
            crosses documents) or None.
        completion_only_loss: for prompt-completion data, take the loss on completion tokens only.
        assistant_only_loss: for conversations, take the loss on assistant tokens only (needs a chat
            template with ``{% generation %}`` markers; Qwen2.5's and Llama 3's have none). Off by
            default, as in TRL: the loss covers the whole conversation.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the ``val_size`` split.
        dataset_split: split to read ``train_data`` from, for a hub dataset.
        val_dataset_split: split to read ``val_data`` from (e.g. ``test``); default ``dataset_split``.
        dataset_config: hub dataset configuration name (e.g. ``"main"`` for ``openai/gsm8k``).
        columns: maps the column names SFT expects to the data's own, e.g.
            ``{prompt: question, completion: answer}``; unmapped columns keep their names.
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
        max_length: int = 1024,
        packing: Literal["bfd", "wrapped"] | None = None,
        completion_only_loss: bool = True,
        assistant_only_loss: bool = False,
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
        self.train_data, self.val_data = train_data, val_data
        self.batch_size, self.max_length, self.packing = batch_size, max_length, packing
        self.completion_only_loss, self.assistant_only_loss = completion_only_loss, assistant_only_loss
        self.val_size, self.num_workers, self.seed = val_size, num_workers, seed
        self.dataset_split, self.val_dataset_split = dataset_split, val_dataset_split or dataset_split
        self.dataset_config, self.columns = dataset_config, columns
        self.collator = DataCollatorForLanguageModeling(self.tokenizer.pad_token_id, packed=packing is not None)
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        if self.train_data is None:
            raise ValueError("SFTDataModule: train_data is required (a path, hub id, list of dicts or Dataset)")
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
        self.train_examples = self._pack(tokenize_cached(self, self._tokenize, train, source))
        self.val_examples = self._pack(tokenize_cached(self, self._tokenize, val, val_source)) if val is not None else None

    def _check(self, rows, source: str) -> None:
        columns = set(rows.column_names)
        if "text" in columns:
            check_rows(rows, required={"text": "str"}, source=source)
        elif "messages" in columns:
            check_rows(rows, required={"messages": "messages"}, source=source)
        elif {"prompt", "completion"} <= columns:
            check_rows(rows, required={"prompt": "text", "completion": "text"}, source=source)
        else:
            raise DataFormatError(
                f"{source}: SFT needs a 'text' column, a 'messages' column, or 'prompt' and 'completion' "
                f"columns; found {rows.column_names}"
            )

    def _tokenize(self, rows, source: str) -> list[dict]:
        """-> [{"input_ids", "completion_mask"}], truncated to ``max_length`` (keeping the start)."""
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        examples, untrained_end_of_turn, no_targets = [], 0, []
        for i, row in enumerate(rows):
            if "text" in row:
                ids = tok(row["text"], add_special_tokens=False)["input_ids"] + [eos]
                mask = [1] * len(ids)
            elif "messages" in row:
                out = tok.apply_chat_template(
                    row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                ids = list(out["input_ids"])
                mask = list(out["assistant_masks"]) if self.assistant_only_loss else [1] * len(ids)
                if self.assistant_only_loss:
                    if not any(mask):
                        raise DataFormatError(
                            f"{source}: row {i}, column 'messages': the assistant-only mask is empty. Either the "
                            "row has no assistant turn or the chat template does not mark assistant turns with "
                            "{% generation %}; set assistant_only_loss: false to train on every token."
                        )
                    untrained_end_of_turn += self._end_of_turn_untrained(ids, mask)
            elif isinstance(row["prompt"], str):
                prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
                completion_ids = tok(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
                ids = prompt_ids + completion_ids
                mask = [int(not self.completion_only_loss)] * len(prompt_ids) + [1] * len(completion_ids)
            else:
                prompt_ids = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
                ids = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)["input_ids"]
                if list(ids[: len(prompt_ids)]) != list(prompt_ids):
                    raise DataFormatError(
                        f"{source}: row {i}: the chat template renders prompt + completion with a different "
                        "prefix than the prompt alone, so the completion mask would be misaligned"
                    )
                ids = list(ids)
                mask = [int(not self.completion_only_loss)] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            if not any(mask[1:]):  # nothing to predict: the prompt fills max_length (targets are tokens 1..)
                no_targets.append(i)
                continue
            examples.append({"input_ids": ids, "completion_mask": mask})
        if no_targets:
            warnings.warn(
                f"{source}: {len(no_targets)} of {len(rows)} rows have no target tokens within max_length="
                f"{self.max_length} (the prompt fills it; first: row {no_targets[0]}) and are skipped; raise "
                "max_length or shorten the prompts"
            )
            if not examples:
                raise DataFormatError(
                    f"{source}: no row has a target token within max_length={self.max_length}; raise max_length"
                )
        if untrained_end_of_turn:
            warnings.warn(
                f"{source}: in {untrained_end_of_turn} conversation(s) the assistant mask ends on a non-special "
                "token: the end-of-turn token is not trained, so the model may not learn to stop. Put the "
                "end-of-turn token inside {% generation %} in the chat template."
            )
        return examples

    def _end_of_turn_untrained(self, ids: list[int], mask: list[int]) -> bool:
        """True when some assistant span's last token is not a special (end-of-turn) token."""
        special = set(self.tokenizer.all_special_ids)
        ends = [t for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]
        return any(ids[t] not in special for t in ends)

    def _pack(self, examples: list[dict]) -> list[dict]:
        """Add ``seq_lengths``; with packing, merge examples into packs of at most ``max_length``."""
        if self.packing is None:
            return [dict(e, seq_lengths=[len(e["input_ids"])]) for e in examples]
        if self.packing == "wrapped":
            ids = [t for e in examples for t in e["input_ids"]]
            mask = [m for e in examples for m in e["completion_mask"]]
            n = self.max_length
            return [
                {"input_ids": ids[s : s + n], "completion_mask": mask[s : s + n], "seq_lengths": [len(ids[s : s + n])]}
                for s in range(0, len(ids), n)
            ]
        packs = []
        for indices in pack_bfd([len(e["input_ids"]) for e in examples], self.max_length):
            packs.append(
                {
                    "input_ids": [t for i in indices for t in examples[i]["input_ids"]],
                    "completion_mask": [m for i in indices for m in examples[i]["completion_mask"]],
                    "seq_lengths": [len(examples[i]["input_ids"]) for i in indices],
                }
            )
        return packs

    def train_dataloader(self):
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return LookaheadLoader(
            self.train_examples,
            batch_size=self.batch_size,
            collate_fn=self.collator,
            accumulate_grad_batches=accumulate,
            count_items=_count_target_tokens,
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


def _count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def sft_loss(
    per_token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    loss_type: Literal["nll", "dft"] = "nll",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level SFT loss.

    Args:
        per_token_logps: (B, T) log-probabilities of the target tokens.
        loss_mask: (B, T) 1 where the loss is taken.
        loss_type: ``nll`` (cross-entropy) or ``dft`` (arXiv 2508.05629 eq. 9: ``-sg(p) log p``).
        num_items_in_batch: target tokens to normalise by (the whole optimizer step's); default:
            this batch's.
    Returns:
        scalar loss = sum of per-token losses / ``num_items_in_batch``.
    """
    if loss_type == "nll":
        per_token_loss = -per_token_logps
    elif loss_type == "dft":  # eq. 9: the token loss weighted by its (detached) probability
        per_token_loss = -per_token_logps.detach().exp() * per_token_logps
    else:
        raise ValueError(f"loss_type must be one of ['nll', 'dft'], got {loss_type!r}")
    if num_items_in_batch is None:
        num_items_in_batch = loss_mask.sum().clamp(min=1)
    return (per_token_loss * loss_mask).sum() / num_items_in_batch


# ---------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------
class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a causal LM (full or LoRA).

    Args:
        model_name_or_path: hub id or local directory of the model.
        tokenizer_name_or_path: tokenizer location when it differs from the model's.
        random_init: build the model from its config with random weights (tests, quickstart).
        model_config: config fields to override (e.g. ``{"num_hidden_layers": 4}``).
        init_seed: seed of the random initialisation.
        dtype: parameter dtype at load time (Lightning's ``precision`` decides the compute dtype).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: allow model code from the hub (off unless asked).
        lora: LoRA adapter settings; None for full fine-tuning.
        quantization: QLoRA: load the base in 4-bit or 8-bit (transformers' ``BitsAndBytesConfig`` fields,
            e.g. ``{load_in_4bit: true, bnb_4bit_quant_type: nf4}``); needs ``lora``. See docs/qlora.md.
        loss_type: ``nll`` or ``dft`` (dynamic fine-tuning).
        diagnostics: add a `lit_posttrain.callbacks.TrainingDiagnostics` callback (findings about the
            run's health, docs/diagnostics.md) unless the Trainer has one; False opts out.
        optimizer: optimizer factory (YAML: ``class_path: torch.optim.AdamW`` + ``init_args``); the
            default AdamW is fused (``fused=True``, TRL's ``adamw_torch_fused``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
    """

    METHOD = "SFT"
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
        loss_type: Literal["nll", "dft"] = "nll",
        diagnostics: bool = True,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=2e-5, fused=True),
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if loss_type not in ("nll", "dft"):
            raise ValueError(f"loss_type must be one of ['nll', 'dft'], got {loss_type!r}")
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
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path, trust_remote_code=trust_remote_code)
        self.loss_type = loss_type
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.diagnostics = diagnostics
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.long))  # input tokens trained on, all ranks
        self.val_loss, self.val_accuracy, self.val_entropy = MeanMetric(), MeanMetric(), MeanMetric()
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

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """(B, T, V) logits (for inference: training computes log-probs in chunks)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits

    def _shared_step(self, batch, with_stats: bool = True):
        hidden_states = final_hidden_states(
            self.model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
        )[:, :-1]  # (B, T-1, H)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        loss_mask = labels != -100
        # logits only at the N target positions, a chunk at a time: the (B, T-1, V) logits never exist
        target_logps, stats = chunked_selective_log_softmax(
            hidden_states[loss_mask], self.model.get_output_embeddings(), labels[loss_mask], with_stats=with_stats
        )  # (N,), TokenStats of (N,) or None
        per_token_logps = target_logps.new_zeros(labels.shape)  # (B, T-1), 0 where no loss is taken
        per_token_logps = per_token_logps.masked_scatter(loss_mask, target_logps)
        num_targets = loss_mask.sum()
        if stats is None:
            return per_token_logps, loss_mask, num_targets, None, None
        with torch.no_grad():
            correct = (stats.argmax == labels[loss_mask]).sum()
            entropy = stats.entropy.sum()
        return per_token_logps, loss_mask, num_targets, correct, entropy

    def _metrics_read_this_step(self) -> bool:
        """Whether this optimizer step's training metrics reach a reader (departure 3): Lightning logs
        the step (every ``log_every_n_steps``, or ``fast_dev_run``), it is the run's last step
        (``max_steps``), or there is no logger (callbacks read ``trainer.callback_metrics`` after every
        batch). The same answer on every rank: nothing rank-local decides it."""
        trainer = self.trainer
        step = trainer.global_step + 1  # the optimizer step this micro-batch belongs to, counted from 1
        logged = trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0
        last = 0 < trainer.max_steps <= step
        return not trainer.loggers or logged or last or bool(trainer.fast_dev_run)

    def training_step(self, batch, batch_idx):
        with_stats = self._metrics_read_this_step()  # the same for every micro-batch of an optimizer step
        per_token_logps, loss_mask, num_targets, correct, entropy = self._shared_step(batch, with_stats)
        # the sum of the per-token losses (normalised by 1); divided below by the step's target tokens
        loss_sum = sft_loss(per_token_logps, loss_mask, loss_type=self.loss_type, num_items_in_batch=1)
        num_items_in_batch = batch.get("num_items_in_batch")
        if "attention_mask" in batch:
            local_tokens = batch["attention_mask"].sum()
        else:  # packed rows have no padding mask: every position counts
            local_tokens = batch["input_ids"].new_tensor(batch["input_ids"].numel())
        # one collective: this micro-batch's counts and metric sums, summed over all ranks
        stats = {
            "num_items_in_batch": num_items_in_batch if num_items_in_batch is not None else num_targets,
            "loss": loss_sum.detach(),
            "num_targets": num_targets,
            "num_tokens": local_tokens,
            # (zeros on the steps without statistics: the collective's shape never varies between ranks)
            "correct": correct if with_stats else num_targets.new_zeros(()),
            "entropy": entropy if with_stats else num_targets.new_zeros(()),
        }
        reduced = self.trainer.strategy.reduce(torch.stack([s.float() for s in stats.values()]), reduce_op="sum")
        sums = dict(zip(stats, reduced))  # name -> its sum over all ranks
        if num_items_in_batch is not None:
            # tokens of the whole optimizer step, all ranks; Lightning divides the loss by the
            # accumulation steps and DDP averages over ranks, so undo both to get sum / tokens
            micro_batches = self.trainer.accumulate_grad_batches * self.trainer.world_size  # per step, all ranks
            # (at least one token: a step whose every row has zero targets contributes 0, not 0 / 0 = NaN)
            num_items_in_batch = sums["num_items_in_batch"].clamp(min=1) / micro_batches
        else:  # no DataModule look-ahead: this micro-batch's own target tokens
            num_items_in_batch = num_targets.clamp(min=1)
        loss = loss_sum / num_items_in_batch
        # the logged metrics are token-weighted over the optimizer step so far (all micro-batches
        # and ranks): at its last micro-batch, the one Lightning logs, they cover the whole step
        if self._step_sums_at != self.trainer.global_step:
            names = ("loss", "num_targets", "correct", "entropy")
            self._step_sums = {name: torch.zeros_like(sums[name]) for name in names}
            self._step_sums_at = self.trainer.global_step
        for name in self._step_sums:
            self._step_sums[name] += sums[name]
        step = self._step_sums
        n = step["num_targets"].clamp(min=1)
        self.num_tokens += sums["num_tokens"].long()
        self.log("train/loss", step["loss"] / n, prog_bar=True)
        if with_stats:
            self.log("train/mean_token_accuracy", step["correct"] / n)
            self.log("train/entropy", step["entropy"] / n)
        self.log("train/num_tokens", self.num_tokens.float())
        return loss

    def validation_step(self, batch, batch_idx):
        per_token_logps, loss_mask, num_targets, correct, entropy = self._shared_step(batch)
        n = num_targets.clamp(min=1)
        # token-weighted over the whole validation set and all ranks
        self.val_loss.update(sft_loss(per_token_logps, loss_mask, loss_type=self.loss_type), weight=num_targets)
        self.val_accuracy.update(correct / n, weight=num_targets)
        self.val_entropy.update(entropy / n, weight=num_targets)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/mean_token_accuracy", self.val_accuracy)
        self.log("val/entropy", self.val_entropy)

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
