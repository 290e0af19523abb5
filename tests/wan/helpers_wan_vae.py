"""Tiny diffusers AutoencoderKLWan models (random weights) for the Wan VAE parity tests."""
from __future__ import annotations

import numpy as np
import torch

# The real block structure (four levels, time compressed by the last two downsamplers) with tiny,
# non-power-of-two widths. "wan21": plain blocks, two residual blocks per level; "wan22": residual
# blocks with their shortcuts, a 2x2 pixel (un)shuffle and a decoder wider than the encoder.
# (attn_scales stays empty: diffusers' encoder cannot run the attention blocks it adds, see
# test_encoder_attention_is_refused.)
VARIANTS = {
    "wan21": dict(base_dim=12, z_dim=4, num_res_blocks=2,
                  latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.7, 2.0, 1.1]),
    "wan22": dict(base_dim=8, decoder_base_dim=12, z_dim=6, num_res_blocks=1, is_residual=True,
                  in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                  latents_mean=[0.1, -0.3, 0.2, 0.0, 0.4, -0.1], latents_std=[0.5, 1.2, 0.8, 0.6, 1.4, 0.9]),
}


def build_torch(variant: str, seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VARIANTS[variant]).eval()
    # Every tensor moved off its init (norm gammas off one, biases off zero), so that a swapped or
    # skipped weight cannot pass; the output conv scaled down so that few decoded values reach the
    # [-1, 1] clamp (which would hide differences).
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
        vae.decoder.conv_out.weight.mul_(0.3)
        vae.decoder.conv_out.bias.mul_(0.1)
    return vae.to(torch.float32)


def torch_decode(vae, z: np.ndarray, tiles: dict | None = None) -> np.ndarray:
    if tiles:
        vae.enable_tiling(**tiles)
    try:
        with torch.no_grad():
            return vae.decode(torch.from_numpy(z)).sample.numpy()
    finally:
        vae.disable_tiling()


def torch_encode(vae, video: np.ndarray, tiles: dict | None = None):
    if tiles:
        vae.enable_tiling(**tiles)
    try:
        with torch.no_grad():
            dist = vae.encode(torch.from_numpy(video)).latent_dist
    finally:
        vae.disable_tiling()
    return dist.mean.numpy(), dist.logvar.numpy()
