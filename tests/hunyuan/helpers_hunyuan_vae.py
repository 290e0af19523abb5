"""A tiny diffusers AutoencoderKLHunyuanVideo (random weights) for the HunyuanVideo VAE parity tests."""
from __future__ import annotations

import numpy as np
import torch

# The published block structure (four levels: space compressed by the first three, time by the
# middle two, the last level plain; attention in both mid blocks) with tiny widths that are not
# powers of two and an odd latent width (groups of 4 channels; one attention head of 20 channels).
TINY = dict(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=[8, 12, 20, 20], layers_per_block=1,
            norm_num_groups=4, act_fn="silu", scaling_factor=0.476986, spatial_compression_ratio=8,
            temporal_compression_ratio=4, mid_block_add_attention=True)

# The tiling attributes `enable_tiling` sets (and `disable_tiling` leaves as they are).
TILE_ATTRS = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_min_num_frames",
              "tile_sample_stride_height", "tile_sample_stride_width", "tile_sample_stride_num_frames")


def build_torch(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(**{**TINY, **overrides}).eval()
    # Every tensor moved off its init (norm weights off one, biases off zero), so that a swapped or
    # skipped weight cannot pass. (Decoded videos come out with a std of about 0.4: nothing is clamped.)
    with torch.no_grad():
        for _, p in vae.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


class _Tiling:
    """`enable_tiling(**kw)` for the duration of a call, then the fresh model's state again (diffusers'
    disable_tiling keeps the tile sizes, which also drive its always-on frame-wise passes)."""

    def __init__(self, vae, kw: dict | None):
        self.vae, self.kw = vae, kw

    def __enter__(self):
        self.saved = {a: getattr(self.vae, a) for a in TILE_ATTRS}
        if self.kw is not None:
            self.vae.enable_tiling(**self.kw)

    def __exit__(self, *exc):
        self.vae.disable_tiling()
        for a, v in self.saved.items():
            setattr(self.vae, a, v)


def torch_decode(vae, z: np.ndarray, tiles: dict | None = None) -> np.ndarray:
    with _Tiling(vae, tiles), torch.no_grad():
        return vae.decode(torch.from_numpy(z)).sample.numpy()


def torch_encode(vae, video: np.ndarray, tiles: dict | None = None):
    with _Tiling(vae, tiles), torch.no_grad():
        dist = vae.encode(torch.from_numpy(video)).latent_dist
    return dist.mean.numpy(), dist.logvar.numpy()
