#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast tier only (~2 s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${DROMEDARY_VENV:-.venv}"
# DeepSpeed compiles its CPU ops on first use (~1 min); keep them between runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dromedary-ray/torch_extensions}"
export PYTHONUNBUFFERED=1
"$VENV/bin/ruff" check dromedary_ray tests benchmarks
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
