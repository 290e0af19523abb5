"""unlearn-jax: concept erasure for text-to-video diffusion transformers, in JAX."""
from __future__ import annotations

__version__ = "0.1.0"

# The public API is imported lazily so that `import unlearn_jax` stays cheap (no JAX start-up)
# and the command-line tool starts fast.
_LAZY = {
    "load_transformer": "unlearn_jax.loading",
    "save_transformer": "unlearn_jax.loading",
    "encode_prompts": "unlearn_jax.text_encoding",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unlearn_jax' has no attribute {name!r}")


__all__ = list(_LAZY)
