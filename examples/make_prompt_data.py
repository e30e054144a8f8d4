"""Generate the shipped prompt-only data for the online RL quickstarts (GRPO, RLOO).

    python examples/make_prompt_data.py       # writes examples/data/prompts/{train,val}.jsonl

Each row is ``{"prompt": "Digits only: 37+45=", "answer": "82"}``: a prompt-only dataset with an
extra ``answer`` column that reward functions receive as a keyword (``accuracy_reward`` reads it).
The quickstarts train a randomly initialised character-level model, which cannot do arithmetic, on
a partial-credit reward a random policy can climb: the fraction of the completion's characters
that are digits (`lit_posttrain.rewards.PatternFractionReward` with ``pattern: "[0-9]"``). A
random policy scores about 10/128; a trained one answers in digits only. Deterministic (seeded);
validation prompts never appear in the training file.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "prompts"


def main(seed: int = 0, max_operand: int = 99, num_train: int = 2000, num_val: int = 64) -> None:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(pairs)
    splits = {"val": pairs[:num_val], "train": pairs[num_val : num_val + num_train]}
    OUT.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(OUT / f"{split}.jsonl", "w") as f:
            for a, b in rows:
                f.write(json.dumps({"prompt": f"Digits only: {a}+{b}=", "answer": str(a + b)}) + "\n")
        print(f"{OUT / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
