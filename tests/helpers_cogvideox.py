"""Tiny CogVideoX transformers built with diffusers (random weights) for parity tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from repo_paths import MODEL_CONFIGS

# Each variant: a tiny config of one real model family. Text length 13 and 3 latent frames
# (not powers of two) are exercised by the tests.
VARIANTS = {
    "2b_sincos": dict(),
    "5b_rope": dict(use_rotary_positional_embeddings=True),
    "15_patch_t": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
    "learned_pos": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
}

BASE = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
    text_embed_dim=20, num_layers=2, sample_width=12, sample_height=8, sample_frames=9,
    max_text_seq_length=13, temporal_compression_ratio=4,
)


def tiny_config(variant: str, **overrides) -> dict:
    return {**BASE, **VARIANTS[variant], **overrides}


def build_torch(config: dict, seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**config).eval()
    # Random init leaves some tensors at exactly zero/one (norms, biases): perturb every tensor so a
    # swapped or skipped weight cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("pos_embedding") and "pos_embedding" in model.state_dict():
                b.copy_(0.1 * torch.randn_like(b))
    return model.to(torch.float32)


def frames_for(config: dict, latent_frames: int) -> int:
    return latent_frames


def torch_rope(config: dict, latent_frames: int, height: int, width: int):
    """The rotary embedding exactly as CogVideoXPipeline prepares it (None for sin-cos models)."""
    if not config.get("use_rotary_positional_embeddings"):
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, pt = config["patch_size"] if "patch_size" in config else 2, config.get("patch_size_t")
    gh, gw = height // p, width // p
    base_w, base_h = config["sample_width"] // p, config["sample_height"] // p
    if pt is None:
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=config["attention_head_dim"], crops_coords=crops,
                                       grid_size=(gh, gw), temporal_size=latent_frames)
    return get_3d_rotary_pos_embed(embed_dim=config["attention_head_dim"], crops_coords=None, grid_size=(gh, gw),
                                   temporal_size=(latent_frames + pt - 1) // pt, grid_type="slice",
                                   max_size=(base_h, base_w))


def torch_forward(model, config, x: np.ndarray, ctx: np.ndarray, t: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(np.asarray(x))
    with torch.no_grad():
        out = model(xt, torch.from_numpy(np.asarray(ctx)), torch.from_numpy(np.asarray(t)),
                    image_rotary_emb=torch_rope(config, x.shape[1], x.shape[3], x.shape[4]), return_dict=False)[0]
    return out.float().numpy()


def inputs(config: dict, batch: int = 2, frames: int = 3, height: int = 8, width: int = 12, text_len=None, seed=0):
    rng = np.random.default_rng(seed)
    text_len = text_len or config["max_text_seq_length"]
    x = rng.standard_normal((batch, frames, config["in_channels"], height, width)).astype(np.float32)
    ctx = rng.standard_normal((batch, text_len, config["text_embed_dim"])).astype(np.float32)
    t = rng.integers(0, 1000, size=(batch,)).astype(np.int64)
    return x, ctx, t


# --------------------------------------------------------------------------------------------
# A tiny CogVideoX pipeline with a VAE (sampling and evaluation tests)
# --------------------------------------------------------------------------------------------
CFG_2B = json.loads((MODEL_CONFIGS / "cogvideox_2b_scheduler.json").read_text())
CFG_5B = json.loads((MODEL_CONFIGS / "cogvideox_5b_scheduler.json").read_text())
TEXT_LEN = 16
# video: 9 frames of 32x32 -> latents (3, 4, 4, 4) with the tiny VAE (8x spatial, 4x temporal)
FRAMES, HEIGHT, WIDTH = 9, 32, 32
LATENT = (3, 4, 4, 4)
STEPS = 4
VAE_CFG = dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
               sample_height=64, sample_width=72)


def perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init leaves zero biases / unit norms: perturb everything
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def build_video_pipeline(folder: Path, rope: bool):
    """A tiny CogVideoX pipeline folder with a VAE (2B-style DDIM, or 5B-style RoPE + DPM scheduler)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from helpers_text import build_tiny_pipeline

    folder, tok, enc = build_tiny_pipeline(folder, max_text_seq_length=TEXT_LEN)
    torch.manual_seed(0)
    tm = perturb(CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=enc.config.d_model, num_layers=2, sample_width=4, sample_height=4, sample_frames=FRAMES,
        max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=rope), 1)
    tm.save_pretrained(folder / "transformer")
    vae = perturb(AutoencoderKLCogVideoX(**VAE_CFG), 2)
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(CFG_5B if rope else CFG_2B))
    return folder, tok, enc, tm, vae
