#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast tier only (~2 s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${DROMEDARY_VENV:-.venv}"
# DeepSpeed compiles its CPU ops on first use (~1 min); keep them between runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dromedary-ray/torch_extensions}"
# A process killed mid-compile leaves its op's `lock` file behind, and every later DeepSpeed
# start then waits on it for ever (seen here after an OOM kill). A compile takes about a minute,
# so a lock older than 10 minutes is stale.
find "$TORCH_EXTENSIONS_DIR" -name lock -mmin +10 -delete 2>/dev/null || true
export PYTHONUNBUFFERED=1
"$VENV/bin/ruff" check dromedary_ray tests benchmarks
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
