"""Test-wide setup: 8 simulated CPU devices (must be set before JAX is imported) and fp32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare fp32 results against PyTorch: no reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")
