"""Suite-wide set-up: 8 fake CPU devices for sharding tests (set before jax is imported), fp32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# Oracles in the tests compare fp32 against fp32: make XLA's CPU dots exact fp32 too.
jax.config.update("jax_default_matmul_precision", "highest")
