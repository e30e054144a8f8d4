"""Frozen second models: the reference policy (DPO, GRPO with beta > 0, ...) and the teacher (GKD, distillation).

`ReferenceModel` and `TeacherModel` own a frozen model's lifecycle; the method owns the math. The
module asks for logits with ``reference.forward(input_ids, attention_mask, ...)`` /
``teacher.forward(...)`` (under ``torch.no_grad``) and turns them into log-probs itself, or for the
log-probs of the last tokens with ``reference.per_token_logps(...)``, which never holds the logits of
more than a chunk of positions (`lit_posttrain.ops.chunked_selective_log_softmax`). Five ways to
hold the reference:

1. Full fine-tuning (default): a frozen, eval-mode deep copy of ``pl_module.model`` made at
   ``setup`` (so it is the initial policy, also on resume: checkpoint weights are restored after
   ``setup``), cast by the Trainer's precision plugin and moved to the root device. It lives on the
   callback, not on the LightningModule: it is not in ``state_dict()``, ``parameters()``, the
   optimizer or checkpoint files.
2. LoRA (``pl_module.model`` is a ``PeftModel``): no copy. The reference is the same model with the
   adapters disabled (``with model.disable_adapter():``), i.e. the frozen base weights.
3. TR-DPO sync (``sync_ref_model=True``; Gorbatovski et al. 2024, https://arxiv.org/abs/2404.09656,
   "soft update"): every ``sync_steps`` optimizer steps ``ref <- mixup_alpha * policy + (1 -
   mixup_alpha) * ref``. The reference then is training state, so (only in this mode) the callback's
   checkpoint state carries the reference weights: resuming gives the synced reference back.
4. Precomputed reference log-probs (``precompute_ref_logps=True``): at ``on_fit_start`` (before the
   sanity check and the first step) one pass over the training and validation rows, in order,
   computes the module's reference quantities; they are stored with the rows (extra columns, so
   they follow shuffling) and the reference copy is freed. On resume they are recomputed from the
   initial policy, which gives the same values; set ``cache_dir`` to save the pass instead: files
   ``ref_logps-<split>-<key>.pt`` keyed by a hash of the reference weights, the collated data,
   the module class and the precision are reused when the key matches.

What the LightningModule provides: ``model`` (the policy) and, for precomputation,
``compute_ref_logps(batch) -> dict[str, Tensor]`` (each tensor (rows in batch,), e.g.
``ref_chosen_logps``), the same function the module uses on the fly. What the DataModule provides
for precomputation: ``ordered_dataloader(split, batch_size)`` (every row of ``"train"`` / ``"val"``
in stored order, None when the split is absent) and ``add_columns(split, columns)``; the collator
then emits those columns with each batch. `lit_posttrain.DPODataModule` implements both.

Distributed: each process keeps a full reference replica (not sharded with FSDP / DeepSpeed yet);
the precompute pass is split across processes (batch ``i`` on rank ``i % world_size``) and summed.

    trainer = L.Trainer(callbacks=[ReferenceModel(precompute_ref_logps=True)])
"""

from __future__ import annotations

import copy
import gc
import hashlib
import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lit_posttrain.models import (
    DType,
    decoder_layers,
    final_hidden_states,
    is_peft_model,
    load_model,
    load_tokenizer,
    unwrap_peft,
)
from lit_posttrain.ops import chunked_selective_log_softmax

SPLITS = ("train", "val")


class ReferenceModel(L.Callback):
    """Provide a frozen reference model to the LightningModule.

    Args:
        model_name_or_path: load the reference from this hub id or local directory (TRL ``ref_model``)
            instead of copying the initial policy. Its logits must have the policy's width.
        dtype: parameter dtype of the loaded reference; None: float32, then cast by the Trainer's
            precision plugin (as the copy is).
        trust_remote_code: allow model code from the hub for the loaded reference.
        sync_ref_model: TR-DPO: mix the policy into the reference every ``sync_steps`` optimizer steps
            (TRL ``sync_ref_model``). Not with LoRA, not with precomputed log-probs.
        mixup_alpha: weight of the policy in the mix (TRL ``ref_model_mixup_alpha``; 1.0 = hard copy).
        sync_steps: optimizer steps between syncs (TRL ``ref_model_sync_steps``).
        precompute_ref_logps: compute the reference quantities once before training, then free the
            reference (TRL ``precompute_ref_log_probs``).
        precompute_batch_size: rows per batch in that pass; None uses the DataModule's batch size.
        cache_dir: directory where precomputed values are saved and looked up (None: recompute on
            every ``fit``).
    """

    def __init__(
        self,
        *,
        model_name_or_path: str | None = None,
        dtype: DType | None = None,
        trust_remote_code: bool = False,
        sync_ref_model: bool = False,
        mixup_alpha: float = 0.6,
        sync_steps: int = 512,
        precompute_ref_logps: bool = False,
        precompute_batch_size: int | None = None,
        cache_dir: str | None = None,
    ):
        if not 0.0 < mixup_alpha <= 1.0:
            raise ValueError(f"mixup_alpha must be in (0, 1], got {mixup_alpha}")
        if sync_steps < 1:
            raise ValueError(f"sync_steps must be >= 1, got {sync_steps}")
        if sync_ref_model and precompute_ref_logps:
            raise ValueError(
                "sync_ref_model=True and precompute_ref_logps=True do not combine: precomputed reference "
                "log-probs would be stale after the first sync. Set one of them to false."
            )
        if dtype is not None and model_name_or_path is None:
            raise ValueError(
                "ReferenceModel: dtype applies to a reference loaded from model_name_or_path; the copy of the "
                "policy takes the policy's dtype and the Trainer's precision. Set model_name_or_path or drop dtype."
            )
        self.model_name_or_path, self.dtype, self.trust_remote_code = model_name_or_path, dtype, trust_remote_code
        self.sync_ref_model, self.mixup_alpha, self.sync_steps = sync_ref_model, mixup_alpha, sync_steps
        self.precompute_ref_logps, self.precompute_batch_size = precompute_ref_logps, precompute_batch_size
        self.cache_dir = cache_dir
        self.model: torch.nn.Module | None = None  # the frozen copy (None with LoRA or once freed)
        self.policy: torch.nn.Module | None = None
        self.precomputed = False
        self.last_sync_step = 0

    # ------------------------------------------------------------------------------------------
    # What the module calls
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Reference logits (N, T or logits_to_keep, V) for a batch, without gradients."""
        self._check_available()
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "logits_to_keep": logits_to_keep,
            "use_cache": False,
        }
        if self.model is None:  # LoRA: the base weights are the reference
            with self.policy.disable_adapter():
                return self.policy(**inputs).logits
        return self.model(**inputs).logits

    @torch.no_grad()
    def per_token_logps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        logits_to_keep: int,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Reference log-probs (N, C) of the last C = ``logits_to_keep`` tokens of ``input_ids``, from
        the logits divided by ``temperature``, without gradients. Computed from the final hidden states
        a chunk of positions at a time (`lit_posttrain.ops.chunked_selective_log_softmax`): the (N, C, V)
        logits never exist at once. With LoRA the head, too, runs with the adapters disabled."""
        self._check_available()
        inputs = (input_ids, attention_mask, position_ids)
        if self.model is None:  # LoRA: the base weights are the reference
            with self.policy.disable_adapter():
                return _last_tokens_logps(
                    self.policy, *inputs, logits_to_keep=logits_to_keep, temperature=temperature
                )
        return _last_tokens_logps(self.model, *inputs, logits_to_keep=logits_to_keep, temperature=temperature)

    # ------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.policy is pl_module.model:  # already set up for this policy (fit, then validate)
            return
        self.policy = pl_module.model
        if self.model_name_or_path is not None:  # TRL's ref_model: a separate model
            reference = load_frozen_model(self.model_name_or_path, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
            check_same_logit_width(reference, self.model_name_or_path, pl_module, role="reference")
            self.model = shard_frozen_model(reference, trainer, pl_module, convert=self.dtype is None)
            return
        if is_peft_model(self.policy):
            if self.sync_ref_model:
                raise ValueError(
                    "ReferenceModel(sync_ref_model=True) does not support LoRA: the reference is the base model "
                    "with adapters disabled, there is no separate copy to sync. Use full fine-tuning or turn sync off."
                )
            self.model = None
            return
        # a copy of the initial policy: checkpoint weights are restored only after setup
        reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.model = shard_frozen_model(reference, trainer, pl_module, convert=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.precompute_ref_logps or self.precomputed:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not all(
            callable(getattr(datamodule, name, None)) for name in ("ordered_dataloader", "add_columns")
        ):
            raise ValueError(
                "ReferenceModel(precompute_ref_logps=True) needs a LightningDataModule with ordered_dataloader() "
                f"and add_columns() (e.g. lit_posttrain.DPODataModule); got {type(datamodule).__name__}"
            )
        batch_size = self.precompute_batch_size
        for split in SPLITS:
            loader = datamodule.ordered_dataloader(split, batch_size)
            if loader is None:
                continue
            columns = self._cached_or_computed(trainer, pl_module, loader, split)
            datamodule.add_columns(split, columns)
        self._free()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        step = trainer.global_step
        if not self.sync_ref_model or step == 0 or step % self.sync_steps or step == self.last_sync_step:
            return
        self.sync()
        self.last_sync_step = step

    @torch.no_grad()
    def sync(self) -> None:
        """TR-DPO soft update: ``ref <- alpha * policy + (1 - alpha) * ref`` for every parameter."""
        alpha = self.mixup_alpha
        for (name, ref), (policy_name, param) in zip(
            self.model.named_parameters(), self.policy.named_parameters(), strict=True
        ):
            if name != policy_name:
                raise RuntimeError(f"reference and policy parameters differ: {name} vs {policy_name}")
            if isinstance(ref, DTensor):  # both sharded alike (FSDP2): mix the local shards
                ref, param = ref.to_local(), param.to_local()
            elif isinstance(param, DTensor):
                param = param.full_tensor()
            ref.copy_(alpha * param.detach() + (1 - alpha) * ref)

    def state_dict(self) -> dict:
        state = {"last_sync_step": self.last_sync_step}
        if self.sync_ref_model and self.model is not None:
            # synced: training state, needed for exact resume (full tensors, also when sharded)
            state["reference"] = {
                name: value.full_tensor() if isinstance(value, DTensor) else value
                for name, value in self.model.state_dict().items()
            }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_sync_step = state_dict["last_sync_step"]
        if "reference" in state_dict and self.model is not None:
            with torch.no_grad():
                for name, value in self.model.state_dict().items():
                    saved = state_dict["reference"][name]
                    if isinstance(value, DTensor):  # sharded: this rank's shard of the full tensor
                        saved = distribute_tensor(saved.to(value.device), value.device_mesh, value.placements).to_local()
                        value = value.to_local()
                    value.copy_(saved)

    # ------------------------------------------------------------------------------------------
    # Precomputation
    # ------------------------------------------------------------------------------------------
    def _cached_or_computed(self, trainer, pl_module, loader, split: str) -> dict[str, torch.Tensor]:
        path = None
        if self.cache_dir is not None:
            path = os.path.join(
                self.cache_dir, f"ref_logps-{split}-{self._key(trainer, pl_module, loader)}.pt"
            )
            hit = trainer.strategy.broadcast(os.path.isfile(path), src=0)
            if hit:
                columns = torch.load(path, weights_only=True) if trainer.is_global_zero else None
                rank_zero_info(f"ReferenceModel: {split} reference log-probs loaded from {path}")
                return trainer.strategy.broadcast(columns, src=0)
        rank_zero_info(
            f"ReferenceModel: precomputing {split} reference log-probs ({len(loader.dataset)} rows)"
        )
        columns = self._compute(trainer, pl_module, loader)
        if path is not None and trainer.is_global_zero:
            os.makedirs(self.cache_dir, exist_ok=True)
            torch.save(columns, path)
        return columns

    @torch.no_grad()
    def _compute(self, trainer, pl_module, loader) -> dict[str, torch.Tensor]:
        """One ordered pass; batch ``i`` on rank ``i % world_size``, others' rows zero, then summed."""
        world_size, rank = trainer.world_size, trainer.global_rank
        num_rows, batch_size = len(loader.dataset), loader.batch_size
        sizes = [min(batch_size, num_rows - start) for start in range(0, num_rows, batch_size)]
        parts: dict[str, list] = {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                first = None  # the loader's first batch, for the padding forward below
                for i, batch in enumerate(loader):
                    first = batch if first is None else first
                    if i % world_size != rank:
                        continue
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                    for name, values in pl_module.compute_ref_logps(batch).items():
                        parts.setdefault(name, [None] * len(sizes))[i] = values.detach().float().cpu()
                # sharded reference: forwards are collective, so a rank with one batch fewer runs one more
                fewer = len(range(rank, len(sizes), world_size)) < len(range(0, len(sizes), world_size))
                if is_sharded(self.model) and fewer and first is not None:
                    pl_module.compute_ref_logps(trainer.strategy.batch_to_device(first, pl_module.device))
        finally:
            pl_module.train(was_training)
        names = trainer.strategy.broadcast(sorted(parts), src=0)
        columns = {}
        for name in names:
            pieces = parts.get(name, [None] * len(sizes))
            column = torch.cat([p if p is not None else torch.zeros(n) for p, n in zip(pieces, sizes)])
            if world_size > 1:
                column = trainer.strategy.reduce(column.to(pl_module.device), reduce_op="sum").cpu()
            columns[name] = column
        return columns

    def _key(self, trainer, pl_module, loader) -> str:
        """Hash of what the precomputed values depend on: reference weights, data, method, precision."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{type(pl_module).__module__}.{type(pl_module).__qualname__}|{trainer.precision}".encode())
        if self.model is not None:  # sharded: the full tensors (collective; every rank computes the key)
            named = [
                (n, t.full_tensor() if isinstance(t, DTensor) else t) for n, t in self.model.state_dict().items()
            ]
        else:  # LoRA: the frozen base weights
            named = [(n, p) for n, p in self.policy.named_parameters() if not p.requires_grad]
        for name, tensor in named:
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for batch in loader:
            for name in sorted(batch):
                if isinstance(batch[name], torch.Tensor):
                    h.update(name.encode())
                    h.update(batch[name].contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _check_available(self) -> None:
        if self.policy is None:
            raise RuntimeError(
                "ReferenceModel is not set up yet: it is set up by the Trainer (Callback.setup)"
            )
        if self.precomputed:
            raise RuntimeError(
                "ReferenceModel: the reference log-probs were precomputed and the reference model was freed; "
                "this batch has no precomputed values (a DataModule without add_columns / ordered_dataloader?)"
            )

    def _free(self) -> None:
        self.model = None
        self.precomputed = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _last_tokens_logps(
    model, input_ids, attention_mask, position_ids, *, logits_to_keep: int, temperature: float
) -> torch.Tensor:
    """(N, C) log-probs of the last C = ``logits_to_keep`` tokens of ``input_ids`` under ``model``."""
    hidden_states = final_hidden_states(model, input_ids, attention_mask, position_ids)
    hidden_states = hidden_states[:, -logits_to_keep - 1 : -1]  # (N, C, H): position t predicts token t + 1
    head = model.get_output_embeddings()
    # a frozen copy sharded by shard_frozen_model reshards its root after the forward: gather the
    # head's weight again for the chunks (a collective, as the forward is), then free it
    sharded_head = isinstance(head.weight, DTensor)
    if sharded_head:
        model.unshard()
    try:
        per_token_logps, _ = chunked_selective_log_softmax(
            hidden_states, head, input_ids[:, -logits_to_keep:], temperature=temperature
        )
    finally:
        if sharded_head:
            model.reshard()
    return per_token_logps


def find_reference_model(trainer: L.Trainer, method: str) -> ReferenceModel:
    """The Trainer's one `ReferenceModel` callback; a clear error naming ``method`` otherwise.

    Every method that reads a reference calls this, so a missing or doubled callback gives the same
    message everywhere.
    """
    found = [callback for callback in trainer.callbacks if isinstance(callback, ReferenceModel)]
    if len(found) != 1:
        raise RuntimeError(
            f"{method} needs exactly one lit_posttrain.callbacks.ReferenceModel callback, the Trainer has "
            f"{len(found)}. The module adds one with defaults in configure_callbacks when it needs a reference "
            "and the Trainer has none; a Trainer built without calling fit (or a second ReferenceModel in "
            "trainer.callbacks) bypasses that: pass exactly one in trainer.callbacks."
        )
    return found[0]


class TeacherModel(L.Callback):
    """Provide a frozen teacher, loaded from its own path, to a distillation method (GKD, ...).

    The teacher lives on this callback: not in the module's ``state_dict()``, ``parameters()``,
    optimizer or checkpoint files; in eval mode, without gradients, on the module's device, sharded
    like the policy under FSDP2. Teacher and student must share a vocabulary: checked at ``setup``.

    Args:
        model_name_or_path: hub id or local directory of the teacher (TRL ``teacher_model_name_or_path``).
        dtype: parameter dtype of the teacher; None: float32, then cast by the Trainer's precision plugin.
        tokenizer_name_or_path: the teacher's tokenizer when it is not next to the weights (compared
            with the student's at ``setup``); None: ``model_name_or_path``.
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``.
        trust_remote_code: allow model code from the hub for the teacher (off unless asked).

    Example (the module adds one with its ``teacher_model_name_or_path`` when the Trainer has none):

    >>> teacher = TeacherModel("examples/tiny-teacher")
    >>> teacher.model is None  # loaded at setup
    True
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: DType | None = None,
        *,
        tokenizer_name_or_path: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ):
        if not model_name_or_path:
            raise ValueError("TeacherModel: model_name_or_path is required (a hub id or a local model directory)")
        self.model_name_or_path, self.dtype = model_name_or_path, dtype
        self.tokenizer_name_or_path = tokenizer_name_or_path or model_name_or_path
        self.attn_implementation, self.trust_remote_code = attn_implementation, trust_remote_code
        self.model: torch.nn.Module | None = None  # the frozen teacher, loaded at setup
        self.policy: torch.nn.Module | None = None  # the student it was set up for

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Teacher logits (N, T or logits_to_keep, V) for a batch, without gradients."""
        if self.model is None:
            raise RuntimeError("TeacherModel is not set up yet: it is set up by the Trainer (Callback.setup)")
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        ).logits

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.policy is pl_module.model:  # already set up for this student (fit, then validate)
            return
        teacher = load_frozen_model(
            self.model_name_or_path,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
        )
        check_same_vocabulary(teacher, self.model_name_or_path, self.tokenizer_name_or_path, pl_module, self.trust_remote_code)
        self.model = shard_frozen_model(teacher, trainer, pl_module, convert=self.dtype is None)
        self.policy = pl_module.model


def find_teacher_model(trainer: L.Trainer, method: str) -> TeacherModel:
    """The Trainer's one `TeacherModel` callback; a clear error naming ``method`` otherwise."""
    found = [callback for callback in trainer.callbacks if isinstance(callback, TeacherModel)]
    if len(found) != 1:
        raise RuntimeError(
            f"{method} needs exactly one lit_posttrain.callbacks.TeacherModel callback, the Trainer has "
            f"{len(found)}. Add one: trainer.callbacks=[TeacherModel('<teacher path or hub id>')] (YAML: "
            "class_path: lit_posttrain.callbacks.TeacherModel, init_args: {model_name_or_path: ...}); the module "
            "adds one from its teacher_model_name_or_path in configure_callbacks when the Trainer has none, "
            "but a Trainer built without calling fit bypasses that."
        )
    return found[0]


# ----------------------------------------------------------------------------------------------
# Loading and sharding a frozen model (reference or teacher)
# ----------------------------------------------------------------------------------------------
def load_frozen_model(
    model_name_or_path: str,
    *,
    dtype: DType | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A causal LM from ``model_name_or_path`` in eval mode without gradients (float32 when ``dtype`` is None)."""
    model = load_model(
        model_name_or_path,
        dtype=dtype or "float32",
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return model.eval().requires_grad_(False)


def shard_frozen_model(
    model: torch.nn.Module, trainer: L.Trainer, pl_module: L.LightningModule, *, convert: bool
) -> torch.nn.Module:
    """Cast (``convert``: by the precision plugin), move to the root device, and under FSDP2 shard like the policy.

    FSDP2 (``pl_module.device_mesh`` set by ``ModelParallelStrategy``): ``fully_shard`` on each decoder
    layer, then the root, on the data-parallel mesh, as the methods' ``configure_model`` does for the
    policy; ``reshard_after_forward=True`` everywhere (also the root: there is no backward to keep
    the gathered parameters for), so between forwards each rank holds only its shards.
    """
    if convert:
        model = trainer.precision_plugin.convert_module(model)
    model = model.to(trainer.strategy.root_device)
    mesh = pl_module.device_mesh
    if mesh is None:
        return model
    mesh = mesh["data_parallel"]
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


def _logit_width(model: torch.nn.Module) -> int:
    return unwrap_peft(model).get_output_embeddings().weight.shape[0]


def _student_name(pl_module: L.LightningModule) -> str:
    return str(pl_module.hparams.get("model_name_or_path", type(pl_module).__name__))


def check_same_logit_width(model: torch.nn.Module, path: str, pl_module: L.LightningModule, *, role: str) -> None:
    """Raise naming both models when ``model``'s logits are not as wide as the policy's."""
    width, policy_width = _logit_width(model), _logit_width(pl_module.model)
    if width != policy_width:
        raise ValueError(
            f"the {role} model {path} has {width} logits per token but the policy {_student_name(pl_module)} has "
            f"{policy_width}: the two must share a vocabulary (same tokenizer, same embedding size)"
        )


def check_same_vocabulary(
    teacher: torch.nn.Module,
    teacher_path: str,
    teacher_tokenizer_path: str,
    pl_module: L.LightningModule,
    trust_remote_code: bool = False,
) -> None:
    """Raise naming both paths and sizes unless teacher and student share a vocabulary.

    Compared: the models' logit widths, and the tokenizers' token -> id maps (the student's is
    ``pl_module.tokenizer``; the teacher's is loaded from ``teacher_tokenizer_path``).
    """
    check_same_logit_width(teacher, teacher_path, pl_module, role="teacher")
    student_tokenizer = pl_module.tokenizer
    teacher_tokenizer = load_tokenizer(teacher_tokenizer_path, trust_remote_code=trust_remote_code)
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])[:3]
        raise ValueError(
            f"teacher and student do not share a vocabulary: the teacher tokenizer {teacher_tokenizer_path} has "
            f"{len(teacher_vocab)} tokens, the student tokenizer {student_tokenizer.name_or_path or _student_name(pl_module)} "
            f"has {len(student_vocab)}; first differing (token, id) pairs: {differing}. Distillation compares the "
            "two distributions token by token, so both must use the same tokenizer."
        )
