"""Generate the shipped preference data: two-number addition with a correct and a wrong answer.

    python examples/make_preference_data.py   # writes examples/data/preference/{train,val}.jsonl, chat_*.jsonl

Prompts are ``"23+45="`` with both operands in 10..49, so every correct sum has two digits.
``chosen`` is the correct sum; ``rejected`` is a wrong answer of one of two kinds, both of which
have three digits (the clear, learnable surface difference that lets a tiny random-init model
reach held-out reward accuracy ~1 within a minute of CPU training):

- "column" slip: the tens and the units are added separately and written side by side without
  carrying, units zero-padded (23+45 -> "6" "08" = "608"; 27+45 -> "6" "12" = "612");
- "stutter": one digit of the correct sum written twice (23+45 -> "668" or "688").

Validation prompts never appear in the training files. Every training prompt appears twice, once
with each kind of rejected answer; each validation prompt once. ``chat_*.jsonl`` hold the same
rows as conversations without a ``prompt`` column (the prompt is the shared user turn, extracted
by the DataModule). Deterministic: the same seed writes the same files.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "preference"


def column_slip(a: int, b: int) -> str:
    return f"{a // 10 + b // 10}{a % 10 + b % 10:02d}"


def stutter(a: int, b: int, rng: random.Random) -> str:
    digits = str(a + b)
    i = rng.randrange(len(digits))
    return digits[: i + 1] + digits[i:]


def main(seed: int = 0, low: int = 10, high: int = 49, num_val: int = 300) -> None:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    rng.shuffle(pairs)
    val_pairs, train_pairs = pairs[:num_val], pairs[num_val:]
    splits = {
        "train": [(a, b, kind) for a, b in train_pairs for kind in ("column", "stutter")],
        "val": [(a, b, ("column", "stutter")[i % 2]) for i, (a, b) in enumerate(val_pairs)],
    }
    rng.shuffle(splits["train"])
    OUT.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(OUT / f"{split}.jsonl", "w") as plain, open(OUT / f"chat_{split}.jsonl", "w") as chat:
            for a, b, kind in rows:
                chosen = str(a + b)
                rejected = column_slip(a, b) if kind == "column" else stutter(a, b, rng)
                assert rejected != chosen and len(rejected) == 3 and len(chosen) == 2
                plain.write(
                    json.dumps({"prompt": f"{a}+{b}=", "chosen": chosen, "rejected": rejected}) + "\n"
                )
                user = {"role": "user", "content": f"{a}+{b}"}
                chat.write(
                    json.dumps(
                        {
                            "chosen": [user, {"role": "assistant", "content": chosen}],
                            "rejected": [user, {"role": "assistant", "content": rejected}],
                        }
                    )
                    + "\n"
                )
        print(f"{OUT / split}.jsonl, chat_{split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
