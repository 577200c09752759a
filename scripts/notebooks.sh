#!/usr/bin/env bash
# Re-executes the notebooks in place, so the committed copies carry their outputs (figures included).
#   ./scripts/notebooks.sh                       # every notebooks/*.ipynb
#   ./scripts/notebooks.sh notebooks/training.ipynb
# Runs on CPU (as CI does) with the `python3` kernel of .venv (ipykernel); sets up .venv first when needed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
unset MPLBACKEND  # the kernel's inline backend puts figures into the outputs
if [ $# -eq 0 ]; then set -- notebooks/*.ipynb; fi
exec python - "$@" <<'PY'
import pathlib, resource, sys, time
import nbformat
from nbclient import NotebookClient

for arg in sys.argv[1:]:
    path = pathlib.Path(arg).resolve()
    nb = nbformat.read(path, as_version=4)
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel's CPU time, once it has exited
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    print(f"{path.name}: executed in {time.perf_counter() - t0:.1f}s (kernel CPU {cpu:.1f}s)", flush=True)
PY
