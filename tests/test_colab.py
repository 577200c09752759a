"""The notebooks' install cell: its decision (`colab.install_plan`), and the cell itself in both branches."""

import builtins
import json
import pathlib
import subprocess
import tomllib

import pytest

from nemotron_jax import colab

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPO = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
REQS = ["jax>=0.11.2", "flax>=0.12", "numpy>=2.0", 'pytest>=8; extra == "test"']
PY = "python"
PIP = [PY, "-m", "pip", "install", "-q"]


def plan(installed):
    return colab.install_plan(REQS, installed, python=PY)


def test_already_installed_does_nothing():
    assert plan({"jax": "0.11.2", "jaxlib": "0.11.2", "flax": "0.12.1", "numpy": "2.3.0"}) == []
    assert plan({"JAX": "0.12.0", "Flax": "0.13", "numpy": "2.0"}) == []  # names compare normalized


def test_the_test_extra_is_not_installed():
    assert all("pytest" not in " ".join(c) for c in plan({"jax": "0.11.2", "flax": "0.11"}))


def test_missing_jax_is_installed_as_declared():
    assert plan({"numpy": "2.1"}) == [PIP + ["jax>=0.11.2", "flax>=0.12"]]
    assert plan({"flax": "0.12", "numpy": "2.1"}) == [PIP + ["jax>=0.11.2"]]


@pytest.mark.parametrize("accel", [
    {"jax-cuda12-plugin": "0.11.2", "jax-cuda12-pjrt": "0.11.2"},  # Colab GPU
    {"libtpu": "0.0.21"},  # Colab TPU
    {},  # Colab CPU
])
def test_present_jax_is_pinned_never_replaced(accel):
    installed = {"jax": "0.11.2", "jaxlib": "0.11.2", "numpy": "1.26.4", **accel}
    (cmd,) = plan(installed)
    assert cmd[:len(PIP)] == PIP and "--upgrade" not in cmd
    reqs = cmd[len(PIP):]
    assert "flax>=0.12" in reqs and "numpy>=2.0" in reqs  # missing and too old
    assert "jax>=0.11.2" not in reqs
    for name, version in {"jax": "0.11.2", "jaxlib": "0.11.2", **accel}.items():
        assert f"{name}=={version}" in reqs  # the whole jax family stays exactly as installed


@pytest.mark.parametrize("accel, spec", [
    ({"jax-cuda12-plugin": "0.7.2"}, "jax[cuda12]"),
    ({"jax-cuda13-plugin": "0.8.0", "jax-cuda13-pjrt": "0.8.0"}, "jax[cuda13]"),
    ({"libtpu": "0.0.17"}, "jax[tpu]"),
    ({"jaxlib": "0.4.30+cuda12.cudnn89"}, "jax[cuda12]"),
    ({}, "jax"),
])
def test_too_old_jax_is_upgraded_on_its_accelerator(accel, spec):
    installed = {"jax": "0.7.2", "jaxlib": "0.7.2", "flax": "0.12", "numpy": "2.0", **accel}
    assert plan(installed) == [PIP + ["--upgrade", f"{spec}>=0.11.2"]]


def test_too_old_rocm_jax_is_left_to_the_user():
    with pytest.raises(RuntimeError, match="ROCm"):
        plan({"jax": "0.7.2", "jaxlib": "0.7.2", "jax-rocm7-plugin": "0.7.2"})


def test_accelerator_detection():
    assert colab.accelerator({"jax": "0.11.2", "jaxlib": "0.11.2"}) is None
    assert colab.accelerator({"jax_cuda12_plugin": "0.11.2"}) == "cuda12"
    assert colab.accelerator({"libtpu-nightly": "0.1"}) == "tpu"
    assert colab.accelerator({"jax-rocm7-plugin": "0.8"}) == "rocm"


def test_this_environment_needs_nothing():
    assert colab.install(dry_run=True) == []


# ------------------------------------------------------------------------ the cell in the notebooks
def first_code_cell(path):
    nb = json.loads(path.read_text())
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_starts_with_the_install_cell_and_a_badge(path):
    assert first_code_cell(path) == colab.install_cell(REPO)
    nb = json.loads(path.read_text())
    top = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown"
    owner_name = REPO.removeprefix("https://github.com/")
    assert f"https://colab.research.google.com/github/{owner_name}/blob/main/notebooks/{path.name}" in top


def test_readme_has_a_badge_for_each_notebook():
    readme = (ROOT / "README.md").read_text()
    owner_name = REPO.removeprefix("https://github.com/")
    for path in NOTEBOOKS:
        assert f"https://colab.research.google.com/github/{owner_name}/blob/main/notebooks/{path.name}" in readme


def test_cell_does_nothing_when_the_package_imports(monkeypatch):
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: pytest.fail("pip ran"))
    exec(colab.install_cell(REPO), {})


def test_cell_installs_from_the_repository_when_the_package_is_missing(monkeypatch):
    calls, real_import, failed = [], builtins.__import__, []

    def fake_import(name, *args, **kwargs):
        if name == "nemotron_jax" and not failed:  # the first import fails, as on a fresh runtime
            failed.append(name)
            raise ImportError("No module named 'nemotron_jax'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, **k: calls.append(cmd))
    exec(colab.install_cell(REPO), {})
    # the package alone, from the repository; nothing else here, since this environment has every requirement
    assert [c[1:] for c in calls] == [["-m", "pip", "install", "-q", "--no-deps", f"git+{REPO}"]]
