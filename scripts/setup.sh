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

# tcmalloc under the CPU runtime (docs/benchmarks.md, "The host allocator on CPU"): XLA mallocs every call's
# scratch buffer (97 MB for the tiny train step, 2 GB for the bench step) and glibc serves blocks that large with a
# fresh mmap, which the step then faults in page by page (a third of the tiny step's CPU time is the kernel's);
# tcmalloc keeps the freed memory for the next call. Best effort: the system's library, else the Debian package
# unpacked into .venv/lib/tcmalloc (once); without either everything runs on glibc's malloc.
# NEMOTRON_JAX_MALLOC=system opts out.
_tcmalloc_ok() { [ -e "$1" ] && [ -z "$(LD_PRELOAD="$1" "$VENV/bin/python" -c pass 2>&1)" ]; }
_find_tcmalloc() {
  local p
  for p in "$VENV/lib/tcmalloc/libtcmalloc_minimal.so.4" \
           $(ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 /{print $NF}'); do
    if _tcmalloc_ok "$p"; then echo "$p"; return 0; fi
  done
  return 1
}
_fetch_tcmalloc() {  # the Debian package's library into .venv/lib/tcmalloc; quiet, and tried once per venv
  local dest="$VENV/lib/tcmalloc" tmp
  mkdir -p "$dest"; touch "$dest/.tried"
  command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 || return 1
  tmp="$(mktemp -d)"
  if (cd "$tmp" && timeout 120 apt-get download -q libtcmalloc-minimal4 >/dev/null 2>&1 \
      && dpkg -x libtcmalloc-minimal4_*.deb x); then
    cp -L "$tmp"/x/usr/lib/*/libtcmalloc_minimal.so.4 "$dest/" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
case "${NEMOTRON_JAX_MALLOC:-tcmalloc}" in
  tcmalloc)
    if [ "$(uname -s)" = Linux ] && [[ ":${LD_PRELOAD:-}:" != *tcmalloc* ]]; then
      if ! TCMALLOC="$(_find_tcmalloc)" && [ ! -e "$VENV/lib/tcmalloc/.tried" ]; then
        echo "[setup] fetching tcmalloc (Debian libtcmalloc-minimal4) into $VENV/lib/tcmalloc ..." >&2
        _fetch_tcmalloc || true
        TCMALLOC="$(_find_tcmalloc)" || echo "[setup] no tcmalloc: running on glibc's malloc (slower CPU steps)" >&2
      fi
      if [ -n "${TCMALLOC:-}" ]; then
        export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
        # a 2 GB scratch buffer is expected here, not a leak worth a stderr line per call
        export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD="${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}"
      fi
    fi ;;
  system) ;;
  *) echo "NEMOTRON_JAX_MALLOC=${NEMOTRON_JAX_MALLOC}: use tcmalloc (the default) or system" >&2; exit 1 ;;
esac
