"""Installing nemotron-jax in a hosted notebook (Colab) without replacing the runtime's accelerator jax.

The first code cell of every notebook in `notebooks/` does, in effect:

    try:
        import nemotron_jax                       # local clone, CI, or already installed: nothing to do
    except ImportError:
        pip install --no-deps git+<repository>   # only this package: cannot touch jax
        load this file from the installed package (without importing the package) and call install()

`install()` then installs the package's remaining requirements. The decision is `install_plan`, a pure
function of what is installed, so it is tested without pip (tests/test_colab.py):

- jax missing: install it (with the other requirements, as the package declares it);
- jax present and new enough: keep it, and every other installed jax distribution (jaxlib, the CUDA / ROCm
  plugins, libtpu) pinned to its installed version, so pip cannot swap a CUDA or TPU build for a CPU wheel;
- jax present but older than the package needs: upgrade it with the extra matching the runtime's accelerator
  (`jax[cuda12]`, `jax[tpu]`, ...), so the upgrade stays on the accelerator.

This module uses the standard library only and never imports the rest of the package, because it runs
before the package's dependencies are installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping

PACKAGE = "nemotron-jax"

# distributions that make up "jax" on a runtime; all are pinned when jax is kept
JAX_FAMILY = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
              "jax-rocm60-plugin", "jax-rocm60-pjrt", "jax-rocm7-plugin", "jax-rocm7-pjrt", "libtpu", "libtpu-nightly")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot read a package name from requirement {req!r}")
    return normalize(m.group(1))


def _release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version ('0.7.2rc1+cuda12' -> (0, 7, 2))."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def _minimum(req: str) -> tuple[int, ...] | None:
    """The lower bound a requirement puts on the version (`>=` or `==`), or None."""
    m = re.search(r"(>=|==|~=)\s*([0-9][0-9A-Za-z.+!-]*)", req.split(";")[0])
    return _release(m.group(2)) if m else None


def _at_least(version: str, minimum: tuple[int, ...]) -> bool:
    v = _release(version)
    n = max(len(v), len(minimum))
    return v + (0,) * (n - len(v)) >= minimum + (0,) * (n - len(minimum))


def accelerator(installed: Mapping[str, str]) -> str | None:
    """The jax extra of the runtime's accelerator build ('cuda12', 'cuda13', 'rocm', 'tpu'), or None (CPU)."""
    names = {normalize(k): v for k, v in installed.items()}
    for extra in ("cuda13", "cuda12"):
        if f"jax-{extra}-plugin" in names or f"jax-{extra}-pjrt" in names:
            return extra
    if any(n.startswith("jax-rocm") for n in names):
        return "rocm"
    if "libtpu" in names or "libtpu-nightly" in names:
        return "tpu"
    local = names.get("jaxlib", "").partition("+")[2]  # old wheels: jaxlib 0.4.x+cuda12.cudnn89
    m = re.match(r"cuda(\d+)", local)
    if m:
        return f"cuda{m.group(1)}"
    return None


def install_plan(requirements: Iterable[str], installed: Mapping[str, str], *, python: str = sys.executable
                 ) -> list[list[str]]:
    """The pip commands that complete an install, given the package's requirements (as in its metadata,
    e.g. 'jax>=0.7', extras markers allowed) and the installed distributions {name: version}.

    Returns [] when every requirement is installed at a version meeting its lower bound. Never lets pip
    replace an installed accelerator jax with another build: either it is pinned, or (when too old) it is
    upgraded with its accelerator's extra; a too-old ROCm jax (no such extra) raises RuntimeError.
    """
    names = {normalize(k): v for k, v in installed.items()}
    reqs = [r.split(";")[0].strip() for r in requirements if r.strip() and not re.search(r";.*\bextra\s*==", r)]
    jax_reqs = [r for r in reqs if _req_name(r) == "jax"]
    unmet = [r for r in reqs if _req_name(r) != "jax" and not _satisfied(r, names)]
    pip = [python, "-m", "pip", "install", "-q"]

    if "jax" not in names:  # no jax at all: install it as the package declares it
        return [pip + (jax_reqs or ["jax"]) + unmet]
    if not all(_satisfied(r, names) for r in jax_reqs):  # too old: upgrade it on the same accelerator
        acc = accelerator(names)
        if acc == "rocm":
            raise RuntimeError(f"jax {names['jax']} (ROCm) is older than {jax_reqs}: upgrade jax and its ROCm "
                               "plugin together by hand, then run this again")
        floor = ".".join(map(str, next(m for m in map(_minimum, jax_reqs) if m is not None)))
        return [pip + ["--upgrade", f"jax[{acc}]>={floor}" if acc else f"jax>={floor}"] + unmet]
    if not unmet:
        return []
    pins = [f"{n}=={names[n]}" for n in JAX_FAMILY if n in names]  # keep the runtime's jax exactly as it is
    return [pip + unmet + pins]


def _satisfied(req: str, names: Mapping[str, str]) -> bool:
    """Installed at a version that meets the requirement's lower bound (upper bounds are not checked)."""
    name = _req_name(req)
    if name not in names:
        return False
    low = _minimum(req)
    return low is None or _at_least(names[name], low)


def installed_distributions() -> dict[str, str]:
    """{normalized name: version} of every installed distribution."""
    out: dict[str, str] = {}
    for d in importlib.metadata.distributions():
        name = d.metadata["Name"]
        if name:
            out.setdefault(normalize(name), d.version)
    return out


def install(package: str = PACKAGE, *, dry_run: bool = False) -> list[list[str]]:
    """Install `package`'s requirements (the package itself must already be installed, e.g. with --no-deps).
    Runs and returns the commands of `install_plan`; `dry_run` only returns them."""
    plan = install_plan(importlib.metadata.requires(package) or [], installed_distributions())
    for cmd in plan:
        print("$", " ".join(cmd[1:]), flush=True)
        if not dry_run:
            subprocess.check_call(cmd)
    return plan


_CELL = '''\
# Install (Colab): does nothing where nemotron_jax is already importable (a local clone, CI).
REPO = "{repo}"  # pyproject.toml [project.urls] Repository
try:
    import nemotron_jax
except ImportError:  # the package alone first (--no-deps cannot touch jax), then its requirements:
    import importlib, importlib.util, pathlib, subprocess, sys  # nemotron_jax/colab.py keeps the runtime's jax
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"git+{{REPO}}"])
    importlib.invalidate_caches()
    _where = pathlib.Path(importlib.util.find_spec("nemotron_jax").origin).parent / "colab.py"
    _spec = importlib.util.spec_from_file_location("nemotron_jax_colab", _where)
    _colab = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_colab)
    _colab.install()
    import nemotron_jax'''


def install_cell(repo: str) -> str:
    """The source of the first code cell of every notebook (tests/test_colab.py checks they match)."""
    return _CELL.format(repo=repo)


def repo_file(relpath: str, repo: str | None = None) -> "pathlib.Path":
    """A file of the repository that the installed package does not carry (e.g. `configs/tiny.py`): the
    local clone's copy when the package runs from one (editable install, CI), else downloaded once from the
    repository's main branch into ~/.cache/nemotron-jax (`repo`: default, the package's declared Repository URL).
    """
    import pathlib  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    local = pathlib.Path(__file__).resolve().parents[1] / relpath
    if local.is_file():
        return local
    if repo is None:
        urls = importlib.metadata.metadata(PACKAGE).get_all("Project-URL") or []
        repo = next(u.split(",", 1)[1].strip() for u in urls if u.lower().startswith("repository"))
    raw = repo.rstrip("/").replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/" + relpath
    dest = pathlib.Path.home() / ".cache" / "nemotron-jax" / relpath
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(raw, timeout=60) as r:
            dest.write_bytes(r.read())
    return dest
