"""PyTorch helpers shipped with unlearn-jax: run trained erasers in a stock diffusers CogVideoX model.

    import unlearn_jax.torch
    unlearn_jax.torch.attach_erasers(pipe.transformer, "ERASER_DIR")   # ours or the published format
    unlearn_jax.torch.detach_erasers(pipe.transformer)

This subpackage is the only part of unlearn-jax that imports torch (the JAX side never needs it), and it
never imports JAX.
"""
from unlearn_jax.torch.erasers import (AdapterEraser, LoRAEraser, attach_erasers, attached_erasers, detach_erasers,
                                       set_eraser_scale)

__all__ = ["AdapterEraser", "LoRAEraser", "attach_erasers", "attached_erasers", "detach_erasers",
           "set_eraser_scale"]
