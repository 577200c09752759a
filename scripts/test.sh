#!/usr/bin/env bash
# Runs the whole test suite on CPU (sets up .venv first when needed). Extra args go to pytest.
# One pytest-xdist worker per core (`-n 0` after it runs in one process); the 15 slowest tests are listed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
exec python -m pytest -q -n auto --durations=15 "$@"
