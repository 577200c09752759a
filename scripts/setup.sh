# Sourced by scripts/main.sh and scripts/test.sh: makes .venv with the project and its test extra.
# Finds Python >= 3.12: $PYTHON, then python3.13 / python3.12 on PATH, then pyenv's installed 3.13 / 3.12.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

_py_ok() {  # true when "$1" runs and is Python >= 3.12
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

_find_python() {
  if [ -n "${PYTHON:-}" ]; then
    if _py_ok "$PYTHON"; then echo "$PYTHON"; return 0; fi
    echo "nemotron-jax needs Python >= 3.12, but PYTHON=$PYTHON is not one: install python3.12 (or 3.13) and point PYTHON at it" >&2
    return 2
  fi
  local c
  for c in python3.13 python3.12; do
    if command -v "$c" >/dev/null 2>&1 && _py_ok "$c"; then command -v "$c"; return 0; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local root; root="$(pyenv root)"
    for c in $(ls -d "$root"/versions/3.13* "$root"/versions/3.12* 2>/dev/null | sort -rV); do
      for exe in "$c"/bin/python3.13 "$c"/bin/python3.12; do
        if [ -x "$exe" ] && _py_ok "$exe"; then echo "$exe"; return 0; fi
      done
    done
  fi
  return 1
}

_stamp() { cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.nemotron-stamp" 2>/dev/null)" != "$(_stamp)" ]; then
  PY="$(_find_python)" || {
    [ $? -eq 2 ] || echo "nemotron-jax needs Python >= 3.12: install python3.12 (or 3.13), or set PYTHON=/path/to/python3.12" >&2
    exit 1
  }
  echo "[setup] creating $VENV with $PY ($("$PY" --version 2>&1)); installing nemotron-jax[test] ..." >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >&2
  _stamp > "$VENV/.nemotron-stamp"
  echo "[setup] done" >&2
fi
export PATH="$VENV/bin:$PATH"
