"""ReferenceModel: frozen and out of checkpoints, no copy with LoRA, precomputed == on the fly, TR-DPO sync."""

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain import DPODataModule, DPOModule, LoRAConfig, load_model
from lit_posttrain.callbacks import ReferenceModel

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"


def trainer(tmp_path, callbacks=(), max_steps=2, enable_checkpointing=False, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )


def data(tiny_model_dir, **kwargs):
    kwargs.setdefault("batch_size", 8)
    return DPODataModule(tiny_model_dir, train_data=str(DATA / "val.jsonl"), **kwargs)


def module(tiny_model_dir, **kwargs):
    return DPOModule(
        tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **kwargs
    )


def test_reference_frozen_and_absent_from_checkpoint(tiny_model_dir, tmp_path):
    """After training the reference still holds the initial weights (the policy moved), is not a parameter of
    the module or the optimizer, and the checkpoint file holds only the module's own tensors."""
    policy = module(tiny_model_dir)
    initial = {k: v.clone() for k, v in policy.model.state_dict().items()}
    reference = ReferenceModel()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")
    fit = trainer(tmp_path, [reference, checkpoint], max_steps=3, enable_checkpointing=True)
    fit.fit(policy, data(tiny_model_dir))

    assert [cb for cb in fit.callbacks if isinstance(cb, ReferenceModel)] == [reference]  # no default added
    assert not reference.model.training and not any(p.requires_grad for p in reference.model.parameters())
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, initial[name]), name
    assert any(
        not torch.equal(t, initial[n]) for n, t in policy.model.state_dict().items()
    )  # the policy trained

    reference_ptrs = {p.data_ptr() for p in reference.model.parameters()}
    assert reference_ptrs.isdisjoint(p.data_ptr() for p in policy.parameters())
    optimized = {p.data_ptr() for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert reference_ptrs.isdisjoint(optimized)

    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == set(policy.state_dict())
    assert all(key.startswith(("model.", "bco_", "num_tokens")) for key in ckpt["state_dict"])
    assert ckpt["callbacks"][reference.state_key] == {"last_sync_step": 0}  # no tensors from the callback
    stored = sum(t.numel() for t in ckpt["state_dict"].values())
    assert stored == sum(t.numel() for t in policy.state_dict().values())  # one copy of the weights, not two


def test_lora_reference_is_the_base_model_without_a_copy(tiny_model_dir, tmp_path):
    """With LoRA the callback holds no model: no second copy of the base weights exists anywhere, and the
    reference logits are those of the base model (a fresh model with the same seed), not the trained policy's."""
    policy = module(tiny_model_dir, lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    reference = ReferenceModel()
    fit = trainer(tmp_path, [reference], max_steps=3)
    fit.fit(policy, data(tiny_model_dir))
    assert reference.model is None

    def storages(*modules):
        tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    # the callback holds the policy itself, nothing else with weights
    assert reference.policy is policy.model
    assert not [
        v for v in vars(reference).values() if isinstance(v, torch.nn.Module) and v is not policy.model
    ]
    base = load_model(tiny_model_dir, random_init=True, init_seed=0)
    base_bytes = sum(storages(base).values())
    adapter_bytes = sum(
        p.numel() * p.element_size() for n, p in policy.model.named_parameters() if "lora_" in n
    )
    assert adapter_bytes > 0
    assert sum(storages(policy.model).values()) == base_bytes + adapter_bytes  # base weights stored once

    batch = data(tiny_model_dir).collator(
        [{"prompt_ids": [4, 5, 6], "chosen_ids": [7, 8, 1], "rejected_ids": [9, 1]}]
    )
    policy.eval()
    with torch.no_grad():
        ref_logits = reference.forward(batch["input_ids"], batch["attention_mask"])
        base_logits = base.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        policy_logits = policy(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ref_logits, base_logits, atol=1e-5, rtol=0)
    assert (policy_logits - base_logits).abs().max() > 1e-3  # the adapters trained


def test_precomputed_reference_logps_equal_on_the_fly(tiny_model_dir, tmp_path):
    """Precomputed reference log-probs (stored per row, train and val) equal those computed on the fly from the
    initial policy within 1e-5; the reference copy is freed; a second fit with the same cache_dir reuses the file."""
    dm = data(tiny_model_dir, val_size=40)
    reference = ReferenceModel(
        precompute_ref_logps=True, precompute_batch_size=16, cache_dir=str(tmp_path / "cache")
    )
    policy = module(tiny_model_dir)
    initial = copy.deepcopy(policy)
    trainer(tmp_path, [reference], max_steps=2, limit_val_batches=1).fit(policy, dm)
    assert reference.model is None and reference.precomputed

    for split in ("train", "val"):
        rows = dm.examples[split]
        assert all("ref_chosen_logps" in row and "ref_rejected_logps" in row for row in rows)
        on_the_fly = ReferenceModel()
        on_the_fly.policy, on_the_fly.model = (
            initial.model,
            initial.model.eval(),
        )  # the initial policy as reference
        initial.trainer = L.Trainer(callbacks=[on_the_fly], logger=False)
        for start in range(0, len(rows), 8):  # different batches than the precompute pass (16 rows)
            chunk = rows[start : start + 8]
            batch = dm.collator(
                [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in chunk]
            )
            expected = initial.compute_ref_logps(batch)
            for name in ("ref_chosen_logps", "ref_rejected_logps"):
                stored = torch.tensor([row[name] for row in chunk])
                torch.testing.assert_close(stored, expected[name], atol=1e-5, rtol=0)
    assert len(list((tmp_path / "cache").glob("ref_logps-*.pt"))) == 2  # train and val

    calls = []
    reused = ReferenceModel(
        precompute_ref_logps=True, precompute_batch_size=16, cache_dir=str(tmp_path / "cache")
    )
    compute = reused._compute
    reused._compute = lambda *args: calls.append(args) or compute(*args)
    dm2 = data(tiny_model_dir, val_size=40)
    trainer(tmp_path, [reused], max_steps=1, limit_val_batches=1).fit(module(tiny_model_dir), dm2)
    assert calls == []  # both splits came from the cache
    assert [r["ref_chosen_logps"] for r in dm2.examples["train"]] == [
        r["ref_chosen_logps"] for r in dm.examples["train"]
    ]


def test_tr_dpo_sync_mixes_policy_into_reference(tiny_model_dir, tmp_path):
    """Every sync_steps optimizer steps: ref = alpha * policy + (1 - alpha) * ref, exactly; the synced reference
    is then training state and is saved in the callback's checkpoint state."""
    policy = module(tiny_model_dir)
    initial = {k: v.clone() for k, v in policy.model.named_parameters()}
    reference = ReferenceModel(sync_ref_model=True, mixup_alpha=0.6, sync_steps=2)
    trainer(tmp_path, [reference], max_steps=2).fit(policy, data(tiny_model_dir))  # one sync, after step 2
    assert reference.last_sync_step == 2
    for (name, ref), (_, param) in zip(reference.model.named_parameters(), policy.model.named_parameters()):
        assert torch.equal(ref, 0.6 * param + (1 - 0.6) * initial[name]), name
    assert set(reference.state_dict()["reference"]) == set(reference.model.state_dict())


def test_sync_options_are_checked(tiny_model_dir, tmp_path):
    """Sync with precomputed log-probs or with LoRA is refused with a message naming the options."""
    with pytest.raises(ValueError, match="sync_ref_model.*precompute_ref_logps"):
        ReferenceModel(sync_ref_model=True, precompute_ref_logps=True)
    with pytest.raises(ValueError, match="mixup_alpha"):
        ReferenceModel(mixup_alpha=0.0)
    policy = module(tiny_model_dir, lora=LoRAConfig(r=2))
    with pytest.raises(ValueError, match="does not support LoRA"):
        trainer(tmp_path, [ReferenceModel(sync_ref_model=True)], max_steps=1).fit(
            policy, data(tiny_model_dir)
        )


def test_resume_keeps_the_initial_policy_as_reference(tiny_model_dir, tmp_path):
    """Resuming from a checkpoint rebuilds the reference from the initial policy (not the checkpoint's weights),
    so 2 steps + resume + 2 steps ends with the same weights as 4 steps in one go."""
    straight = module(tiny_model_dir)
    initial = {k: v.clone() for k, v in straight.model.state_dict().items()}
    trainer(tmp_path / "a", max_steps=4).fit(straight, data(tiny_model_dir))

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "b", [checkpoint], max_steps=2, enable_checkpointing=True).fit(
        module(tiny_model_dir), data(tiny_model_dir)
    )
    resumed, reference = module(tiny_model_dir), ReferenceModel()
    trainer(tmp_path / "b", [reference], max_steps=4).fit(
        resumed, data(tiny_model_dir), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, initial[name]), name
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
