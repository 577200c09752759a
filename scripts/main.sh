#!/usr/bin/env bash
# The main job on the bundled default: train the tiny preset on the bundled Shakespeare corpus on CPU
# (sets up .venv first when needed). Extra args go to experiments/train.py, e.g. --config.steps=200;
# without --workdir each run gets a fresh runs/tiny-<time> directory (pass --workdir DIR to resume one).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
args=("$@")
case " ${args[*]-} " in
  *" --workdir"*) ;;
  *) args+=("--workdir=runs/tiny-$(date +%Y%m%d-%H%M%S)") ;;
esac
exec python experiments/train.py --config configs/tiny.py "${args[@]}"
