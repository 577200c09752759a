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


# -- the allocator part: a scratch copy with a stand-in venv (its stamp matches, so no venv is built)

def _tcmalloc_in_this_process() -> str | None:
    """The tcmalloc library the running suite has preloaded (scripts/test.sh goes through setup.sh), if any."""
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "libtcmalloc" in path:
            return path
    return None


def _fake_venv(d, lib_bytes: bytes | None = None):
    venv = d / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    stamp = subprocess.run(["bash", "-c", "cat pyproject.toml | sha256sum | cut -d' ' -f1"], cwd=d,
                           capture_output=True, text=True, check=True).stdout.strip()
    (venv / ".nemotron-stamp").write_text(stamp + "\n")
    lib = venv / "lib" / "tcmalloc"
    lib.mkdir(parents=True)
    (lib / ".tried").touch()  # never fetch from apt in a test
    if lib_bytes is not None:
        (lib / "libtcmalloc_minimal.so.4").write_bytes(lib_bytes)
    return venv


def _env_after_setup(d, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LD_PRELOAD", "TCMALLOC_", "NEMOTRON_JAX_"))}
    script = 'source scripts/setup.sh && echo "LD_PRELOAD=${LD_PRELOAD:-}" && env | grep "^TCMALLOC_" || true'
    return subprocess.run(["bash", "-c", script], cwd=d, env=dict(base, **env), capture_output=True, text=True,
                          timeout=60)


def test_setup_refuses_an_unknown_malloc_choice(tmp_path):
    d = _scratch(tmp_path)
    _fake_venv(d)
    r = _env_after_setup(d, NEMOTRON_JAX_MALLOC="jemalloc")
    assert r.returncode == 1
    assert "NEMOTRON_JAX_MALLOC=jemalloc: use tcmalloc (the default) or system" in r.stderr


def test_setup_never_preloads_a_library_that_does_not_load(tmp_path):
    d = _scratch(tmp_path)
    venv = _fake_venv(d, lib_bytes=b"not an ELF file")
    r = _env_after_setup(d)
    assert r.returncode == 0, r.stderr
    assert str(venv / "lib" / "tcmalloc") not in r.stdout


def test_setup_preloads_tcmalloc_unless_told_system(tmp_path):
    lib = _tcmalloc_in_this_process() or ROOT / ".venv" / "lib" / "tcmalloc" / "libtcmalloc_minimal.so.4"
    assert pathlib.Path(lib).exists(), "scripts/setup.sh fetches tcmalloc into .venv/lib/tcmalloc"
    d = _scratch(tmp_path)
    venv = _fake_venv(d, lib_bytes=pathlib.Path(lib).read_bytes())
    ours = venv / "lib" / "tcmalloc" / "libtcmalloc_minimal.so.4"
    r = _env_after_setup(d)
    assert r.returncode == 0, r.stderr
    assert f"LD_PRELOAD={ours}\n" in r.stdout and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=" in r.stdout
    r = _env_after_setup(d, NEMOTRON_JAX_MALLOC="system")
    assert r.returncode == 0 and "LD_PRELOAD=\n" in r.stdout
