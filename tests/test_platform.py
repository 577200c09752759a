"""nemotron_jax.platform: the one place that asks JAX which platform this is; kernels never ask."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from nemotron_jax import platform

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_on_this_cpu_test_machine():
    assert platform.backend() == "cpu"
    assert platform.on_cpu() and not platform.on_gpu()
    assert platform.interpret_default() is True


@pytest.mark.parametrize("jax_name,name,gpu", [
    ("gpu", "gpu", True), ("cuda", "gpu", True), ("rocm", "gpu", True), ("tpu", "tpu", False), ("cpu", "cpu", False),
])
def test_backend_names(monkeypatch, jax_name, name, gpu):
    monkeypatch.setattr(jax, "default_backend", lambda: jax_name)
    assert platform.backend() == name
    assert platform.on_gpu() is gpu and platform.on_cpu() is (name == "cpu")
    assert platform.interpret_default() is (not gpu)   # the kernels compile for GPUs only


def _sources(*dirs):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_only_the_platform_module_asks_jax():
    """jax.default_backend() is read in nemotron_jax/platform.py and nowhere else in the package or kernels."""
    askers = [str(f.relative_to(ROOT)) for f in _sources("nemotron_jax", "pallas_kernels")
              if "default_backend" in f.read_text() and f.name != "platform.py"]
    assert askers == []


def test_kernels_are_leaves():
    """pallas_kernels/ never imports nemotron_jax: a kernel is told (interpret=...), it does not ask."""
    for f in _sources("pallas_kernels"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "nemotron_jax" for n in names), f"{f.name} imports {names}"


def _allocator_of_child(env) -> str:
    code = "from nemotron_jax.platform import host_allocator; print(host_allocator())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def test_host_allocator_names_the_preloaded_one():
    """A child without LD_PRELOAD is on the system's malloc; with scripts/setup.sh's tcmalloc preloaded (as
    scripts/test.sh runs the suite) it and this process are on tcmalloc."""
    bare = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert _allocator_of_child(bare) == "system"
    lib = ROOT / ".venv" / "lib" / "tcmalloc" / "libtcmalloc_minimal.so.4"
    assert lib.exists(), "scripts/setup.sh fetches tcmalloc into .venv/lib/tcmalloc"
    assert _allocator_of_child(dict(bare, LD_PRELOAD=str(lib))) == "tcmalloc"
    expected = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    assert platform.host_allocator() == expected
