"""Tiny Wan transformers built with diffusers (random weights) for parity tests."""
from __future__ import annotations

import numpy as np
import torch

# Each variant: a tiny config of one real model. 3 heads of 12 (not powers of two), 2 layers.
BASE = dict(
    patch_size=[1, 2, 2], num_attention_heads=3, attention_head_dim=12, text_dim=20, freq_dim=32, ffn_dim=50,
    num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
)
VARIANTS = {
    # Wan 2.1 T2V (1.3B / 14B) and each Wan 2.2 A14B expert: 16 latent channels.
    "wan21": dict(in_channels=16, out_channels=16),
    # Wan 2.2 TI2V-5B: 48 latent channels, per-token timesteps in its pipeline.
    "wan22_5b": dict(in_channels=48, out_channels=48, ffn_dim=58),
    # Not a released model: covers no cross-attention norm and temporal patching.
    "no_cross_norm_pt2": dict(in_channels=4, out_channels=6, cross_attn_norm=False, patch_size=[2, 2, 2]),
}
TEXT_LEN = 7


def tiny_config(variant: str, **overrides) -> dict:
    return {**BASE, **VARIANTS[variant], **overrides}


def frames_for(config: dict) -> int:
    """3 latent frames, or the next multiple of the temporal patch."""
    pt = config["patch_size"][0]
    return 3 if pt == 1 else 2 * pt


def build_torch(config: dict, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    # Perturb every tensor (norm weights start at one, biases at zero) so swapped weights cannot pass.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(config: dict, batch: int = 2, frames: int | None = None, height: int = 6, width: int = 10,
           text_len: int = TEXT_LEN, seed: int = 0):
    """Latents (B, C, F, H, W) with an odd token grid (3 x 5 for 6 x 10), prompt embeddings, (B,) timesteps."""
    rng = np.random.default_rng(seed)
    frames = frames_for(config) if frames is None else frames
    x = rng.standard_normal((batch, config["in_channels"], frames, height, width)).astype(np.float32)
    ctx = rng.standard_normal((batch, text_len, config["text_dim"])).astype(np.float32)
    t = rng.uniform(0, 1000, size=(batch,)).astype(np.float32)
    return x, ctx, t


def torch_forward(model, x, ctx, t) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(t)),
                    torch.from_numpy(np.asarray(ctx)), return_dict=False)[0]
    return out.float().numpy()
