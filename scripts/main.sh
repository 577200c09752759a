#!/usr/bin/env bash
# The main job on the bundled default (sets up .venv first when needed). Extra args go to the job.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python experiments/main.py "$@"
