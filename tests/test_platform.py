"""nemotron_jax.platform: the one place that asks JAX which platform this is; kernels never ask."""

from __future__ import annotations

import ast
import pathlib

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
