"""The CogVideoX family: CogVideoX-2B / 5B / 1.5 text-to-video pipelines (and the pixel-space toy world).

What is CogVideoX's, as the core needs it:
- the transformer (`models.cogvideox`), its rule table, latents laid out (B, F, C, H, W);
- the text side: the pipeline's T5 (`text_encoding.T5Text`), 226 tokens, no mask; the
  conditioning is the embeddings array (N, L, D) itself;
- the VAE (`models.cogvideox_vae`): latents / scaling_factor, frames decoded two latent frames at a
  time, spatial tiling as `enable_tiling()`; a folder without vae/ samples pixels in [-1, 1];
- sampling: DDIM for models without RoPE (2B), DPM with dynamic CFG for RoPE models (5B, 1.5), as
  CogVideo's demo; batched CFG; x_t for erasure from DDIM (docs/METHOD.md §2);
- erasers: the adapter on the video part of each block's `attn1` output, LoRA on its projections,
  the published files' keys `transformer_blocks.{i}.attn1.adapter`.
"""
from __future__ import annotations

from pathlib import Path

from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.base import EraserSite, Family, SamplerDefaults, VideoShape

CLASS_NAME = "CogVideoXTransformer3DModel"
LORA_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def _positive(name: str, value) -> int:
    from unlearn_jax.checks import positive_int

    return positive_int(name, value)


def decoded_frames(latent_frames: int, temporal_levels: int) -> int:
    """How many frames the CogVideoX VAE decodes from `latent_frames` (its frame chunks of two, the
    first taking the odd one out; each temporal upsampling doubles a chunk, keeping the first frame
    of an odd chunk apart)."""
    from unlearn_jax.models.cogvideox_vae import LATENT_FRAMES_PER_CHUNK, frame_chunks

    total = 0
    for start, end in frame_chunks(latent_frames, LATENT_FRAMES_PER_CHUNK):
        c = end - start
        for _ in range(temporal_levels):
            c = c if c == 1 else (2 * c - 1 if c % 2 else 2 * c)
        total += c
    return total


def video_shape(model_cfg, vae_cfg, num_frames=None, height=None, width=None) -> VideoShape:
    """The pipeline's video size (defaults from the transformer config, as `CogVideoXPipeline`)
    checked against the VAE's compression and the transformer's patches."""
    if vae_cfg is not None:
        spatial, temporal = vae_cfg.spatial_ratio, int(vae_cfg.temporal_compression_ratio)
    else:
        spatial, temporal = 1, 1
    if num_frames is None:
        num_frames = model_cfg.sample_frames if vae_cfg is not None else \
            (model_cfg.sample_frames - 1) // model_cfg.temporal_compression_ratio + 1
    height = model_cfg.sample_height * spatial if height is None else height
    width = model_cfg.sample_width * spatial if width is None else width
    num_frames, height, width = _positive("num_frames", num_frames), _positive("height", height), \
        _positive("width", width)
    f = (num_frames - 1) // temporal + 1
    if vae_cfg is not None and decoded_frames(f, vae_cfg.temporal_compress_level) != num_frames:
        # the VAE decodes latent frames two at a time (the first chunk takes an odd one out): only an odd
        # number of latent frames gives back 1 + temporal * (latent frames - 1) frames
        period = 2 * temporal
        lo = (num_frames - 1) // period * period + 1
        raise UnlearnError(f"num_frames = {num_frames} does not fit the VAE (temporal compression {temporal}, "
                           f"decoded two latent frames at a time): use 1 + a multiple of {period}, "
                           f"e.g. {lo} or {lo + period}")
    step = spatial * model_cfg.patch_size
    for name, v in (("height", height), ("width", width)):
        if v % step:
            what = f"the VAE's {spatial}x compression times patch_size {model_cfg.patch_size}" if vae_cfg is not None \
                else f"patch_size {model_cfg.patch_size}"
            raise UnlearnError(f"{name} = {v} is not a multiple of {step} ({what})")
    h, w = height // spatial, width // spatial
    if model_cfg.use_learned_positional_embeddings and (h, w) != (model_cfg.sample_height, model_cfg.sample_width):
        raise UnlearnError(f"this model's learned positional embeddings fix the video to "
                           f"{model_cfg.sample_height * spatial}x{model_cfg.sample_width * spatial}; "
                           f"got {height}x{width}")
    pad = (-f) % model_cfg.patch_size_t if model_cfg.patch_size_t else 0
    return VideoShape(num_frames, height, width, f + pad, model_cfg.in_channels, h, w, pad, layout="FCHW")


class CogVideoXFamily(Family):
    name = "cogvideox"
    title = "CogVideoX"
    transformer_class = CLASS_NAME
    pipeline_classes = ("CogVideoXPipeline",)
    samplers = ("ddim", "dpm")
    guidance = "cfg"
    latent_layout = "FCHW"
    published_prefix = "transformer_blocks.{layer}.attn1.adapter"

    # ---- the transformer -------------------------------------------------------------------
    def recognises(self, config) -> bool:
        return "max_text_seq_length" in config and "time_embed_dim" in config

    def owns(self, config) -> bool:
        from unlearn_jax.models.cogvideox import CogVideoXConfig

        return isinstance(config, CogVideoXConfig)

    def transformer_config(self, d, where: str = "config"):
        from unlearn_jax.models.cogvideox import CogVideoXConfig

        return CogVideoXConfig.from_dict(dict(d), where)

    def abstract_transformer(self, cfg, **runtime):
        from unlearn_jax.models.cogvideox import abstract_model

        return abstract_model(cfg, **runtime)

    def build_transformer(self, cfg, seed: int = 0, **runtime):
        from flax import nnx

        from unlearn_jax.models.cogvideox import CogVideoXTransformer

        return CogVideoXTransformer(cfg, rngs=nnx.Rngs(seed), **runtime)

    def transformer_rules(self, cfg):
        from unlearn_jax.models.cogvideox import rule_table

        return rule_table(cfg)

    def token_grid(self, model, latent_shape):
        f, _, h, w = latent_shape
        return model.token_grid(f, h, w)

    def eraser_site_from_dict(self, config: dict) -> EraserSite:
        d = int(config.get("num_attention_heads", 30)) * int(config.get("attention_head_dim", 64))
        return EraserSite(stack="blocks", num_layers=int(config.get("num_layers", 30)), dim=d, attention="attn1",
                          lora_targets={t: (d, d) for t in LORA_MODULES}, torch_blocks="transformer_blocks",
                          torch_attention="attn1", torch_lora_modules=LORA_MODULES, torch_output="tuple_first")

    # ---- text ------------------------------------------------------------------------------
    def text(self, pipeline_dir: Path, cache=None):
        from unlearn_jax.text_encoding import T5Text

        return T5Text(pipeline_dir, cache=cache)

    # ---- VAE and shapes --------------------------------------------------------------------
    def vae_config(self, vae_dir: Path):
        from unlearn_jax.models.cogvideox_vae import VAEConfig

        return VAEConfig.from_json(Path(vae_dir) / "config.json")

    def load_vae(self, vae_dir: Path, dtype=None, mesh=None):
        from unlearn_jax.models.cogvideox_vae import load_vae

        return load_vae(vae_dir, dtype=dtype, mesh=mesh)

    def check_tiling(self, vae_tiling) -> None:
        if vae_tiling is None or isinstance(vae_tiling, bool):
            return
        from unlearn_jax.models.cogvideox_vae import TileSpec

        if not isinstance(vae_tiling, TileSpec):
            raise UnlearnError(f"vae_tiling = {vae_tiling!r} is invalid; expected None, true, false or a TileSpec")

    def video_shape(self, model_cfg, vae_cfg, num_frames=None, height=None, width=None) -> VideoShape:
        return video_shape(model_cfg, vae_cfg, num_frames, height, width)

    def decode(self, vae, latents, shape: VideoShape, tiling, warn=None):
        """Final latents (1, F, C, h, w) -> frames (num_frames, H, W, 3) in [0, 1], as the pipeline's
        `output_type="np"` (padding frames of CogVideoX1.5 dropped first); pixel-space models map
        [-1, 1] to [0, 1]."""
        import jax.numpy as jnp
        import numpy as np

        lat = np.asarray(latents, np.float32)[:, shape.pad_frames:]
        if vae is None:
            frames = np.clip((lat[0] + 1.0) / 2.0, 0.0, 1.0)
            return np.ascontiguousarray(frames.transpose(0, 2, 3, 1))
        z = jnp.asarray(lat, vae.dtype) * (1.0 / vae.scaling_factor)
        video = vae.decode(z, tiling=tiling)          # (1, 3, T, H, W)
        want = (shape.height, shape.width)
        if tuple(video.shape[-2:]) != want:
            # diffusers' tiling crops tiles by the VAE config's tile sizes: for some VAE configs and
            # sizes (never CogVideoX's own) the seams do not add up to the video size
            if tiling is not True:
                raise UnlearnError(f"VAE tiling {tiling} decodes {want[0]}x{want[1]} videos to "
                                   f"{video.shape[-2]}x{video.shape[-1]} frames; use other tiles or vae_tiling=False")
            if warn is not None:
                warn("the VAE's default tiles decode %dx%d videos to %dx%d frames (as diffusers' enable_tiling "
                     "would); decoding whole frames instead" % (*want, *video.shape[-2:]))
            video = vae.decode(z, tiling=None)
        video = jnp.clip(video / 2 + 0.5, 0, 1)
        return np.ascontiguousarray(np.asarray(video[0].astype(jnp.float32)).transpose(1, 2, 3, 0))

    # ---- sampling ----------------------------------------------------------------------------
    def sampler_defaults(self, model_cfg) -> SamplerDefaults:
        # DDIM for the 2B (no RoPE), DPM + dynamic CFG for RoPE models, as CogVideo's demo runs them
        if model_cfg.use_rotary_positional_embeddings:
            return SamplerDefaults("dpm", 50, 6.0, dynamic_cfg=True)
        return SamplerDefaults("ddim", 50, 6.0, dynamic_cfg=False)

    def default_dynamic_cfg(self, sampler: str) -> bool:
        return sampler == "dpm"

    def training_sampler(self, model_cfg) -> str:
        return "ddim"  # x_t is sampled with DDIM for every CogVideoX model (docs/METHOD.md §2)


FAMILY = CogVideoXFamily()
