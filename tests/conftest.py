"""Test-wide setup: 8 simulated CPU devices (must be set before JAX is imported) and fp32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare fp32 results against PyTorch: no reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the whole session (a fresh folder each run): the many runs of the
# same tiny erase config, each in a new process or a new jitted closure, compile the same programs.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="unlearn-jax-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)  # subprocesses of the tests share it
