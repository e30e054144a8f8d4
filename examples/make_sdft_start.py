"""Train the shipped SDFT warm start: a tiny model that uses a demonstration in context, adds poorly alone.

    python examples/make_sdft_start.py   # writes examples/tiny-sdft-start/ (config, tokenizer, weights)

SDFT's teacher is the model itself shown a demonstration (examples/data/sdft: the student sees
``23+19=``, the teacher ``23+19=42\\n23+19=``), so the method needs a model with an in-context skill.
A random model has none, and the tiny SFT teacher (examples/tiny-teacher) never saw a demonstration.
This script gives examples/tiny-model (2 layers, hidden 128, the 128-symbol character tokenizer) that
skill and little else: a plain, seeded fp32 loop (one thread) on two kinds of rows,

- demonstration rows ``a+b=c\\na+b=`` -> ``c<eos>``: copy the answer from the line above (the
  loss is on the copied answer and its end token only, so the first line teaches no arithmetic);
- plain rows ``a+b=`` -> ``c<eos>`` (``plain_fraction``, a quarter of each batch): the answer format
  and some addition, so that the model alone answers in the right shape but often wrongly.

Half of the demonstration rows use another operator (``-``, ``*``) and an arbitrary number to copy
(``7*31=402\\n7*31=`` -> ``402<eos>``): the skill learnt is copying from the line above, whatever
its digits and lengths, not adding. Every ``+`` pair has an operand of 50 or more: none of them is
a pair of examples/data/sdft (every pair of operands 0..49), train or val.

Measured (2026-12-01, 2-core CPU shared with other jobs: 2 min 13 s and 5 min 5 s wall, about 100 s
CPU): greedy token accuracy on the 200 prompts of examples/data/sdft/val.jsonl 0.32 alone and 0.85
with the demonstration in front (the script prints both). Deterministic: a rerun writes a
bit-identical model.safetensors (the same sha256). See examples/tiny-sdft-start/README.md.
"""

import json
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lit_posttrain import load_model
from lit_posttrain.schedulers import WarmupDecayLR

ROOT = Path(__file__).resolve().parent
TINY = ROOT / "tiny-model"
OUT = ROOT / "tiny-sdft-start"
SDFT_VAL = ROOT / "data" / "sdft" / "val.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def pairs(max_operand: int = 99) -> list[tuple[int, int]]:
    """Every pair a, b <= max_operand with an operand >= 50 (so none is a pair of the SDFT data)."""
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1) if max(a, b) >= 50]


def number(rng: random.Random, max_digits: int) -> int:
    """A number of 1 to ``max_digits`` digits, each length equally likely."""
    digits = rng.randint(1, max_digits)
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def encode(tokenizer, context: str, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context + prompt + answer + <eos>`` and labels (-100 except on the answer and <eos>)."""
    head = tokenizer(context + prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return head + tail, [-100] * len(head) + tail


def batch_of(tokenizer, rows: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
    encoded = [encode(tokenizer, *row) for row in rows]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # (B, T), right-padded
    labels = torch.full((len(rows), width), -100)  # (B, T)
    for i, (ids, row_labels) in enumerate(encoded):
        input_ids[i, : len(ids)], labels[i, : len(ids)] = torch.tensor(ids), torch.tensor(row_labels)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != tokenizer.pad_token_id).long(),
        "labels": labels,
    }


def nll(model, batch) -> tuple[torch.Tensor, int, int]:
    """Mean NLL over the labelled tokens, correct argmax predictions (teacher-forced), token count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]  # (B, T-1)
    mask = labels != -100
    loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    return loss, int((logits[mask].argmax(-1) == labels[mask]).sum()), int(mask.sum())


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: list[tuple[str, str, str]], max_new_tokens: int = 4) -> float:
    """Share of answer tokens (and the end) a greedy completion gets right, position by position."""
    correct = total = 0
    for context, prompt, answer in rows:
        ids = torch.tensor([tokenizer(context + prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.size(1):].tolist()  # fmt: skip
        reference = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        correct += sum(a == b for a, b in zip(out, reference))
        total += len(reference)
    return correct / total


def main(max_steps: int = 1500, seed: int = 0, lr: float = 3e-3, batch_size: int = 32,
         plain_fraction: float = 0.25, other_fraction: float = 0.5) -> dict[str, float]:  # fmt: skip
    start = time.time()
    torch.set_num_threads(1)  # deterministic and fastest for a model this small
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = load_model(str(TINY), random_init=True, init_seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = WarmupDecayLR(optimizer, warmup_ratio=0.05, min_lr_ratio=0.1, num_training_steps=max_steps)
    all_pairs = pairs()
    num_plain = round(plain_fraction * batch_size)
    model.train()
    for step in range(1, max_steps + 1):
        rows = []
        for i, (a, b) in enumerate(rng.sample(all_pairs, batch_size)):
            prompt, answer = f"{a}+{b}=", str(a + b)
            if i < num_plain:
                rows.append(("", prompt, answer))
                continue
            # another operator, any operands, any number on the line above: copying, not adding
            if rng.random() < other_fraction:
                prompt = f"{number(rng, 2)}{rng.choice('-*')}{number(rng, 2)}="
                answer = str(number(rng, 3))
            rows.append((f"{prompt}{answer}\n", prompt, answer))
        loss, _, _ = nll(model, batch_of(tokenizer, rows))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step % 100 == 0:
            print(f"step {step}: train loss {loss.item():.3f}", flush=True)
    model.eval()
    val = [json.loads(line) for line in SDFT_VAL.read_text().splitlines()]
    alone = [("", row["prompt"], row["privileged_context"].removeprefix(row["prompt"])) for row in val]
    shown = [
        (row["privileged_context"] + "\n", prompt, answer) for row, (_, prompt, answer) in zip(val, alone)
    ]
    figures = {
        "val/token_accuracy_alone": greedy_accuracy(model, tokenizer, alone),
        "val/token_accuracy_with_demonstration": greedy_accuracy(model, tokenizer, shown),
    }
    OUT.mkdir(exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, OUT / name)
    print(f"{OUT}: held-out (examples/data/sdft/val.jsonl, greedy) {figures}; {time.time() - start:.0f} s")
    return figures


if __name__ == "__main__":
    main()
