"""Train the shipped tiny teacher for the distillation quickstarts and tests (GKD, on-policy distillation).

    python examples/make_teacher.py      # writes examples/tiny-teacher/ (config, tokenizer, model.safetensors)

The teacher is examples/tiny-model (2 layers, hidden 128, character tokenizer of 128 symbols) trained
with SFT (completion-only NLL with `lit_posttrain.SFTDataModule`'s tokenization, in a plain loop) on
the shipped addition data examples/data/sft/train.jsonl (prompt "23+19=" -> completion "42"; loss on
the completion and its end token), fp32 on CPU, one thread, seeded (data order, initialisation):
a rerun writes a bit-identical model.safetensors (checked 2026-12-01: the same sha256).

Students: examples/tiny-student/ is the same tokenizer with one decoder layer (about half the
parameters), random init; or examples/tiny-model with ``model_config: {num_hidden_layers: 1}``.

Measured (2026-12-01, 2-core CPU shared with other jobs: 3 min 16 s wall, 54 s CPU): held-out
(examples/data/sft/val.jsonl, 200 pairs never trained on) completion-token accuracy of the teacher 0.90
and loss 0.25 nats per token, against 0.035 (accuracy) and 4.8 (loss, ln 128) for the random
initialisation. See examples/tiny-teacher/README.md.
"""

import json
import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lit_posttrain import SFTDataModule, load_model
from lit_posttrain.schedulers import WarmupDecayLR

ROOT = Path(__file__).resolve().parent
TINY = ROOT / "tiny-model"
OUT = ROOT / "tiny-teacher"
STUDENT = ROOT / "tiny-student"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def write_student() -> None:
    """examples/tiny-student: the tiny model's config with one decoder layer (no weights: random_init)."""
    STUDENT.mkdir(exist_ok=True)
    config = json.loads((TINY / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (STUDENT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, STUDENT / name)


def main(max_steps: int = 1500, seed: int = 0, lr: float = 3e-3, batch_size: int = 32) -> dict[str, float]:
    """A plain, seeded fp32 loop (one thread): SFT's data pipeline and loss, AdamW with warmup and cosine decay."""
    torch.set_num_threads(1)  # deterministic and fastest for a model this small
    torch.manual_seed(seed)
    data = SFTDataModule(
        str(TINY),
        train_data=str(ROOT / "data" / "sft" / "train.jsonl"),
        val_data=str(ROOT / "data" / "sft" / "val.jsonl"),
        max_length=32,
    )
    data.setup("fit")
    model = load_model(str(TINY), random_init=True, init_seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = WarmupDecayLR(optimizer, warmup_ratio=0.05, min_lr_ratio=0.1, num_training_steps=max_steps)
    order = torch.Generator().manual_seed(seed)
    step = 0
    while step < max_steps:
        loader = DataLoader(data.train_examples, batch_size=batch_size, shuffle=True, generator=order,
                            collate_fn=data.collator, drop_last=True)  # fmt: skip
        for batch in loader:
            loss, _, _ = _nll(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step}: train loss {loss.item():.3f}", flush=True)
            if step == max_steps:
                break
    model.eval()
    with torch.no_grad():
        total_loss = correct = count = 0.0
        for batch in DataLoader(data.val_examples, batch_size=100, collate_fn=data.collator):
            loss, n_correct, n = _nll(model, batch)
            total_loss, correct, count = total_loss + loss.item() * n, correct + n_correct, count + n
    OUT.mkdir(exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, OUT / name)
    write_student()
    figures = {"val/loss": total_loss / count, "val/mean_token_accuracy": correct / count}
    print(f"{OUT}: held-out {figures}")
    return figures


def _nll(model, batch):
    """Mean NLL over the completion tokens (and EOS) of a batch, correct argmax predictions, token count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    correct = (logits[mask].argmax(-1) == labels[mask]).sum().item()
    return loss, correct, int(mask.sum())


if __name__ == "__main__":
    main()
