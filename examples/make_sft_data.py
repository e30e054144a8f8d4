"""Generate the shipped SFT data: two-number addition, as prompt-completion and as conversations.

    python examples/make_sft_data.py          # writes examples/data/sft/{train,val}.jsonl and chat_*.jsonl

The tiny character-level model learns the format and most answer digits within a couple of CPU
minutes; held-out pairs never appear in the training file.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "sft"


def main(seed: int = 0, max_operand: int = 49, num_val: int = 200) -> None:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(pairs)
    splits = {"val": pairs[:num_val], "train": pairs[num_val:]}
    OUT.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(OUT / f"{split}.jsonl", "w") as f:
            for a, b in rows:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
        with open(OUT / f"chat_{split}.jsonl", "w") as f:
            for a, b in rows:
                messages = [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]
                f.write(json.dumps({"messages": messages}) + "\n")
        print(f"{OUT / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
