#!/usr/bin/env bash
# Runs the whole test suite on CPU (sets up .venv first when needed). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
exec python -m pytest -q "$@"
