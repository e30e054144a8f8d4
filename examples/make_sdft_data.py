"""Generate the shipped SDFT data: addition prompts with the worked answer as privileged context.

    python examples/make_sdft_data.py         # writes examples/data/sdft/{train,val}.jsonl

``train.jsonl`` / ``val.jsonl``:
``{"prompt": "23+19=", "privileged_context": "23+19=42", "completion": "42"}``, the
pairs of examples/data/sft/{train,val}.jsonl (so validation pairs are never trained on, and the
figures compare with the SFT quickstart and the tiny teacher). The student sees ``23+19=``; the
teacher, with the quickstart's ``teacher_prompt_template: "{privileged_context}\\n{prompt}"``, sees
``23+19=42\\n23+19=``: a demonstration of the same problem, which a model that can copy from its
context answers correctly. ``completion`` is the answer alone: SDFT never trains on it, it measures the
student's and the teacher's token accuracy (`lit_posttrain.experimental.sdft.SDFTModule`'s metrics).

Deterministic.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SFT = ROOT / "data" / "sft"
OUT = ROOT / "data" / "sdft"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (SFT / f"{split}.jsonl").read_text().splitlines()]
        with open(OUT / f"{split}.jsonl", "w") as f:
            for row in rows:
                demonstration = row["prompt"] + row["completion"]  # the worked answer: "23+19=42"
                f.write(json.dumps({"prompt": row["prompt"], "privileged_context": demonstration,
                                    "completion": row["completion"]}) + "\n")  # fmt: skip
        print(f"{OUT / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
