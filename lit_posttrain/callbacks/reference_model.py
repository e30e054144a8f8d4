"""The frozen reference policy for methods that regularise towards one (DPO, GRPO with beta > 0, ...).

`ReferenceModel` owns the reference's lifecycle; the method owns the math. The module asks it for
reference logits with ``reference.forward(input_ids, attention_mask, ...)`` (under ``torch.no_grad``)
and turns them into log-probs itself. Four ways to hold the reference:

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
from torch.distributed.tensor import DTensor

from lit_posttrain.models import is_peft_model

SPLITS = ("train", "val")


class ReferenceModel(L.Callback):
    """Provide a frozen reference model to the LightningModule.

    Args:
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
        if self.policy is None:
            raise RuntimeError(
                "ReferenceModel is not set up yet: it is set up by the Trainer (Callback.setup)"
            )
        if self.precomputed:
            raise RuntimeError(
                "ReferenceModel: the reference log-probs were precomputed and the reference model was freed; "
                "this batch has no precomputed values (a DataModule without add_columns / ordered_dataloader?)"
            )
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

    # ------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.policy is pl_module.model:  # already set up for this policy (fit, then validate)
            return
        self.policy = pl_module.model
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
        reference = trainer.precision_plugin.convert_module(reference)
        self.model = reference.to(trainer.strategy.root_device)

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
            param = param.full_tensor() if isinstance(param, DTensor) else param  # FSDP2 policy
            ref.copy_(alpha * param.detach() + (1 - alpha) * ref)

    def state_dict(self) -> dict:
        state = {"last_sync_step": self.last_sync_step}
        if self.sync_ref_model and self.model is not None:
            state["reference"] = self.model.state_dict()  # synced: training state, needed for exact resume
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_sync_step = state_dict["last_sync_step"]
        if "reference" in state_dict and self.model is not None:
            self.model.load_state_dict(state_dict["reference"])

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
                for i, batch in enumerate(loader):
                    if i % world_size != rank:
                        continue
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                    for name, values in pl_module.compute_ref_logps(batch).items():
                        parts.setdefault(name, [None] * len(sizes))[i] = values.detach().float().cpu()
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
        if self.model is not None:
            named = list(self.model.state_dict().items())
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

    def _free(self) -> None:
        self.model = None
        self.precomputed = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
