"""Run a shipped quickstart for a few steps and record what it produced, to compare across refactors.

    python tests/golden/run_quickstart.py sft OUT_DIR

Runs ``lit-posttrain fit --config configs/quickstart/<name>.yaml`` shortened to 20 optimizer steps
(validation every 10 steps on 2 batches, logging every step) in OUT_DIR (``examples`` and
``configs`` linked in, so every relative path of the config lands there), then writes
``OUT_DIR/<name>.csv`` (the logged metrics) and ``OUT_DIR/<name>.json`` (the sha256 of every
exported tensor). `tests/test_golden.py` compares those with the ones stored beside this script.
"""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "--trainer.max_steps", "20",
    "--trainer.val_check_interval", "10",
    "--trainer.limit_val_batches", "2",
    "--trainer.log_every_n_steps", "1",
]  # fmt: skip


def run(name: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for link in ("examples", "configs"):
        if not (out / link).exists():
            (out / link).symlink_to(ROOT / link)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lit_posttrain", "fit", "--config", f"configs/quickstart/{name}.yaml"]
    subprocess.run(command + OVERRIDES, cwd=out, env=env, check=True)
    run_dir = out / "outputs" / f"quickstart-{name}"
    (log_dir,) = run_dir.glob("lightning_logs/version_*")
    metrics_csv = log_dir / "metrics.csv"
    # diagnostics/* measure the machine (memory, data wait), not the algorithm: not recorded
    rows = [{k: v for k, v in row.items() if not k.startswith("diagnostics/")} for row in csv.DictReader(metrics_csv.open())]
    rows = [row for row in rows if any(v != "" for k, v in row.items() if k not in ("epoch", "step"))]
    columns = sorted({column for row in rows for column in row})
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tensors = load_file(log_dir / "export" / "final" / "model.safetensors")  # HubExport's default dirpath
    digests = {
        key: hashlib.sha256(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy()).hexdigest()
        for key, tensor in sorted(tensors.items())
    }
    (out / f"{name}.json").write_text(json.dumps(digests, indent=1) + "\n")


def kernel_fingerprint() -> str:
    """sha256 of the gradients of one fixed training step of the tiny model (fp32, 2 threads): equal on
    machines whose CPU kernels compute the recorded runs bit for bit, different where the kernels round
    differently (another instruction set picks other matmul kernels)."""
    from lit_posttrain.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = load_model(str(ROOT / "examples" / "tiny-model"), random_init=True, init_seed=0)
        ids = torch.randint(2, 128, (4, 48), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    return hashlib.sha256(grads.numpy().tobytes()).hexdigest()


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]).resolve())
    (Path(sys.argv[2]) / "machine.json").write_text(json.dumps({"kernel_fingerprint": kernel_fingerprint()}) + "\n")
