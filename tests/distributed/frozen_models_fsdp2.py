"""A 2-process FSDP2 fit (ModelParallelStrategy, gloo on CPU) of GKD with a TeacherModel and a ReferenceModel (a
copy of the policy), run as a script because Lightning's launcher re-runs the script for the other process:

    python tests/distributed/frozen_models_fsdp2.py OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json``: the bytes of its local shards of the teacher and of the reference, the
full models' bytes, the largest difference between the sharded teacher's / reference's logits and those of the
unsharded models on a fixed batch, and whether the teacher's weights are bit-identical to the shipped file after
training. Read by test_frozen_models_fsdp2.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[2]
TEACHER = str(ROOT / "examples" / "tiny-teacher")
STUDENT = str(ROOT / "examples" / "tiny-student")
DATA = ROOT / "examples" / "data" / "sft"


def local_and_full_bytes(model: torch.nn.Module) -> tuple[int, int]:
    local = full = 0
    for p in model.parameters():
        shard = p.to_local() if isinstance(p, DTensor) else p
        local += shard.numel() * shard.element_size()
        full += p.numel() * p.element_size()  # a DTensor's numel is the full tensor's
    return local, full


def main(out_dir: str) -> None:
    os.environ.setdefault("LIT_POSTTRAIN_SILENCE_EXPERIMENTAL", "1")
    torch.set_num_threads(1)
    from lit_posttrain.callbacks import ReferenceModel
    from lit_posttrain.callbacks.reference_model import TeacherModel, is_sharded
    from lit_posttrain.experimental.gkd import GKDDataModule, GKDModule
    from lit_posttrain.models import load_model

    L.seed_everything(0, verbose=False)
    teacher, reference = TeacherModel(TEACHER), ReferenceModel()
    module = GKDModule(
        STUDENT, random_init=True, lmbda=0.5, max_new_tokens=4, diagnostics=False,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )  # fmt: skip
    data = GKDDataModule(STUDENT, train_data=str(DATA / "train.jsonl"), batch_size=4, max_length=32)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[teacher, reference],
    )  # fmt: skip
    trainer.fit(module, data)

    rank = trainer.global_rank
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 100, (3, 10), generator=g)  # the same batch on both ranks
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    shipped = load_model(TEACHER).eval()
    initial_policy = load_model(STUDENT, random_init=True, init_seed=0).eval()  # what the reference copied
    with torch.no_grad():
        teacher_expected = shipped(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        reference_expected = initial_policy(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits
    teacher_logits = teacher.forward(input_ids, attention_mask)  # collective: both ranks
    reference_logits = reference.forward(input_ids, attention_mask)
    teacher_unchanged = all(
        torch.equal(value.full_tensor() if isinstance(value, DTensor) else value, shipped.state_dict()[name])
        for name, value in teacher.model.state_dict().items()
    )
    result = {
        "rank": rank,
        "teacher_sharded": is_sharded(teacher.model),
        "reference_sharded": is_sharded(reference.model),
        "teacher_bytes": local_and_full_bytes(teacher.model),
        "reference_bytes": local_and_full_bytes(reference.model),
        "teacher_max_diff": (teacher_logits - teacher_expected).abs().max().item(),
        "reference_max_diff": (reference_logits - reference_expected).abs().max().item(),
        "teacher_unchanged": teacher_unchanged,
        "teacher_in_module": any(p is q for p in module.parameters() for q in teacher.model.parameters()),
        "teacher_training": teacher.model.training,
    }
    result["dpo_ref_logps"] = precompute_with_sharded_reference()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def precompute_with_sharded_reference() -> list[float]:
    """DPO with precomputed reference log-probs under FSDP2: 40 pairs in 5 batches of 8, so rank 0 computes 3 and
    rank 1 only 2 (then runs one discarded forward: the sharded reference's all-gathers are collective).
    Returns every training row's precomputed reference log-prob of its chosen completion."""
    from lit_posttrain import DPODataModule, DPOModule
    from lit_posttrain.callbacks import ReferenceModel

    pairs = [json.loads(line) for line in (ROOT / "examples" / "data" / "preference" / "train.jsonl").open()][
        :40
    ]
    module = DPOModule(str(ROOT / "examples" / "tiny-model"), random_init=True, diagnostics=False)
    data = DPODataModule(str(ROOT / "examples" / "tiny-model"), train_data=pairs, batch_size=8, max_length=32)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[ReferenceModel(precompute_ref_logps=True)],
    )  # fmt: skip
    trainer.fit(module, data)
    return [row["ref_chosen_logps"] for row in data.examples["train"]]


if __name__ == "__main__":
    main(sys.argv[1])
