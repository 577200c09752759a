"""scripts/setup.sh: finds Python >= 3.12 or says in one line what to install (checked in a scratch copy)."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _scratch(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _run(tmp_path, env):
    return subprocess.run(["bash", "-c", "source scripts/setup.sh"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_bad_python_variable_gives_one_clear_line(tmp_path):
    d = _scratch(tmp_path)
    r = _run(d, dict(os.environ, PYTHON="/bin/false"))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "PYTHON=/bin/false" in lines[0] and "install python3.12" in lines[0]
    assert not (d / ".venv").exists()


def test_no_python_found_gives_one_clear_line(tmp_path):
    d = _scratch(tmp_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    (empty / "python3").symlink_to("/bin/false")  # a python3 that is not >= 3.12
    env = {"PATH": f"{empty}:/bin", "HOME": str(tmp_path)}  # no python3.12/3.13, no pyenv
    r = _run(d, env)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["nemotron-jax needs Python >= 3.12: install python3.12 (or 3.13), "
                     "or set PYTHON=/path/to/python3.12"], lines


def test_finder_accepts_this_interpreter(tmp_path):
    """With PYTHON pointing at the running (>= 3.12) interpreter, the finder picks it."""
    d = _scratch(tmp_path)
    script = 'source <(sed -n "/^_py_ok()/,/^}/p;/^_find_python()/,/^}/p" scripts/setup.sh); _find_python'
    r = subprocess.run(["bash", "-c", script], cwd=d, env=dict(os.environ, PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == sys.executable
