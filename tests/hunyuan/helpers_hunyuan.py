"""Tiny HunyuanVideo transformers built with diffusers (random weights) for parity tests."""
from __future__ import annotations

import numpy as np
import torch

# 3 heads of 10 (not powers of two), rope split 2 + 4 + 4; mlp_ratio 2.5 (the token refiner keeps its own 4.0).
BASE = dict(
    in_channels=4, out_channels=6, num_attention_heads=3, attention_head_dim=10, num_layers=2, num_single_layers=3,
    num_refiner_layers=2, mlp_ratio=2.5, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
    text_embed_dim=14, pooled_projection_dim=9, rope_theta=256.0, rope_axes_dim=[2, 4, 4], image_condition_type=None,
)
VARIANTS = {
    # HunyuanVideo T2V (the guidance-distilled checkpoint): guidance embedding, spatial patch 2.
    "distilled": dict(),
    # Without the guidance embedding; temporal patch 2, one dual and two single blocks, one refiner block.
    "no_guidance_pt2": dict(guidance_embeds=False, patch_size_t=2, num_layers=1, num_single_layers=2,
                            num_refiner_layers=1, in_channels=5, out_channels=None),
}
TEXT_LEN = 7
LENGTHS = (7, 4)  # real tokens of each batch row (the second right-padded)


def tiny_config(variant: str = "distilled", **overrides) -> dict:
    return {**BASE, **VARIANTS[variant], **overrides}


def frames_for(config: dict) -> int:
    """3 latent frames, or two temporal patches."""
    pt = config["patch_size_t"]
    return 3 if pt == 1 else 2 * pt


def build_torch(config: dict, seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**config).eval()
    # Perturb every tensor (norm weights start at one, biases at zero) so swapped weights cannot pass.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(config: dict, batch: int = 2, frames: int | None = None, height: int = 6, width: int = 10,
           text_len: int = TEXT_LEN, lengths=LENGTHS, seed: int = 0) -> dict:
    """diffusers' forward arguments as numpy: latents (B, C, F, H, W) with an odd token grid (3 x 5 for 6 x 10),
    prompt embeddings with rows padded to `lengths` (the padded positions hold noise: they must not count),
    the mask, pooled projections, (B,) timesteps and guidance (guidance_scale * 1000)."""
    rng = np.random.default_rng(seed)
    frames = frames_for(config) if frames is None else frames
    mask = np.zeros((batch, text_len), np.int32)
    for i in range(batch):
        mask[i, :lengths[i % len(lengths)]] = 1
    return dict(
        hidden_states=rng.standard_normal((batch, config["in_channels"], frames, height, width)).astype(np.float32),
        timestep=rng.uniform(0, 1000, size=(batch,)).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, config["text_embed_dim"])).astype(np.float32),
        encoder_attention_mask=mask,
        pooled_projections=rng.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32),
        guidance=rng.uniform(1000, 8000, size=(batch,)).astype(np.float32),
    )


def cond_of(args: dict) -> dict:
    """The conditioning pytree of `forward` from diffusers' arguments."""
    return {"text": args["encoder_hidden_states"], "mask": args["encoder_attention_mask"],
            "pooled": args["pooled_projections"], "guidance": args["guidance"]}


def torch_forward(model, args: dict) -> np.ndarray:
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in args.items()}
    if not model.config.guidance_embeds:
        kw.pop("guidance")
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    return out.float().numpy()
