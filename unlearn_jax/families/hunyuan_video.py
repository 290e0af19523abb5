"""The HunyuanVideo family: the text-to-video HunyuanVideo pipeline (`HunyuanVideoPipeline`, the
guidance-distilled 13B checkpoint and configs without the guidance embedding).

What is HunyuanVideo's, as the core needs it:
- the transformer (`models.hunyuan_video`): a token refiner over the text, dual-stream blocks (video
  and text with their own weights, joint attention), then single-stream blocks over the joint
  sequence in [video; text] order; latents laid out (B, C, F, H, W);
- the text side (`hunyuan_text.HunyuanText`): a Llama decoder used as an encoder over the prompt in
  the pipeline's template (the hidden states two layers before the end, the template's tokens cropped,
  256 tokens with their mask) and CLIP-L's pooled output; the conditioning is the dict
  {"text", "mask", "pooled", "guidance"};
- guidance as an embedding ("embedding"): the sampler runs one conditional pass and the guidance scale
  reaches the model as `cond["guidance"] = 1000 * scale` (`with_guidance`), for sampling and for every
  pass of the erasure step (docs/METHOD.md §9: v_u is the empty prompt at the same guidance);
- the VAE (`models.hunyuan_vae`): latents / scaling_factor, causal 3D VAE with spatial and temporal
  tiling; 129 frames at 720x1280 by default;
- sampling as the pipeline: flow-matching Euler with the scheduler's shift over the pipeline's own
  sigmas (linspace(1, 0, N + 1)[:-1]), 50 steps, guidance 6;
- erasers: the adapter on the video part of each single-stream block's attention output, before the
  block's proj_out (the published files' `single_transformer_blocks.{i}.attn.adapter`); the localization
  mask from the same attention (video queries over the text keys, with the text mask); LoRA on that
  attention's q/k/v projections.

Image-to-video pipelines (HunyuanVideoImageToVideoPipeline, SkyReels, FramePack) are refused.
"""
from __future__ import annotations

from pathlib import Path

from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.families.base import EraserSite, Family, SamplerDefaults, VideoShape

CLASS_NAME = "HunyuanVideoTransformer3DModel"
LORA_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v"}  # single-stream attention: no to_out
DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH = 129, 720, 1280  # HunyuanVideoPipeline.__call__'s defaults
DEFAULT_GUIDANCE = 6.0
GUIDANCE_FACTOR = 1000.0  # the pipeline passes guidance_scale * 1000 to the model
IMAGE_TO_VIDEO = ("HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline",
                  "HunyuanVideoFramepackPipeline")


def _positive(name: str, value) -> int:
    from unlearn_jax.checks import positive_int

    return positive_int(name, value)


class HunyuanVideoFamily(Family):
    name = "hunyuan_video"
    title = "HunyuanVideo"
    transformer_class = CLASS_NAME
    pipeline_classes = ("HunyuanVideoPipeline",) + IMAGE_TO_VIDEO  # recognised, so that the refusal can say why
    pipeline_parts = ("transformer", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    samplers = ("flow_euler",)
    guidance = "embedding"
    latent_layout = "CFHW"
    published_prefix = "single_transformer_blocks.{layer}.attn.adapter"

    # ---- the folder ----------------------------------------------------------------------------
    def check_folder(self, root: Path) -> None:
        from unlearn_jax.jsonfiles import read_json_object

        index = Path(root) / "model_index.json"
        if not index.is_file():
            return
        d = read_json_object(index, "pipeline index")
        if d.get("_class_name") in IMAGE_TO_VIDEO:
            raise ModelFamilyError(f"{root}: a {d['_class_name']} folder; only HunyuanVideo's text-to-video pipeline "
                                   "(HunyuanVideoPipeline) is supported")

    # ---- the transformer -------------------------------------------------------------------
    def recognises(self, config) -> bool:
        return "num_single_layers" in config and "num_refiner_layers" in config

    def owns(self, config) -> bool:
        from unlearn_jax.models.hunyuan_video import HunyuanVideoConfig

        return isinstance(config, HunyuanVideoConfig)

    def transformer_config(self, d, where: str = "config"):
        from unlearn_jax.models.hunyuan_video import HunyuanVideoConfig

        return HunyuanVideoConfig.from_dict(dict(d), where)

    def abstract_transformer(self, cfg, **runtime):
        from unlearn_jax.models.hunyuan_video import abstract_model

        return abstract_model(cfg, **runtime)

    def build_transformer(self, cfg, seed: int = 0, **runtime):
        from flax import nnx

        from unlearn_jax.models.hunyuan_video import HunyuanVideoTransformer

        return HunyuanVideoTransformer(cfg, rngs=nnx.Rngs(seed), **runtime)

    def transformer_rules(self, cfg):
        from unlearn_jax.models.hunyuan_video import rule_table

        return rule_table(cfg)

    def token_grid(self, model, latent_shape):
        _, f, h, w = latent_shape
        return model.token_grid(f, h, w)

    def eraser_site_from_dict(self, config) -> EraserSite:
        d = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 128))
        return EraserSite(stack="single_blocks", num_layers=int(config.get("num_single_layers", 40)), dim=d,
                          attention="attn", lora_targets={t: (d, d) for t in LORA_MODULES},
                          torch_blocks="single_transformer_blocks", torch_attention="attn",
                          torch_lora_modules=LORA_MODULES, torch_output="tuple_first")

    # ---- text ------------------------------------------------------------------------------
    def text(self, pipeline_dir: Path, cache=None):
        from unlearn_jax.hunyuan_text import HunyuanText

        return HunyuanText(pipeline_dir, cache=cache)

    # ---- guidance ----------------------------------------------------------------------------
    def with_guidance(self, cond, guidance_scale):
        """`cond["guidance"]` = 1000 x the scale for every row, as the pipeline's `guidance` tensor."""
        import jax.numpy as jnp

        if not isinstance(cond, dict) or "guidance" not in cond:
            raise UnlearnError("a HunyuanVideo conditioning is a dict with text, mask, pooled and guidance entries")
        g = cond["guidance"]
        return {**cond, "guidance": jnp.full(jnp.shape(g), GUIDANCE_FACTOR * guidance_scale, jnp.float32)}

    # ---- VAE and shapes --------------------------------------------------------------------
    def vae_config(self, vae_dir: Path):
        from unlearn_jax.models.hunyuan_vae import HunyuanVAEConfig

        return HunyuanVAEConfig.from_json(Path(vae_dir) / "config.json")

    def load_vae(self, vae_dir: Path, dtype=None, mesh=None):
        from unlearn_jax.models.hunyuan_vae import load_hunyuan_vae

        return load_hunyuan_vae(vae_dir, dtype=dtype, mesh=mesh)

    def check_tiling(self, vae_tiling) -> None:
        if vae_tiling is None or isinstance(vae_tiling, bool):
            return
        from unlearn_jax.models.hunyuan_vae import HunyuanTileSpec

        if not isinstance(vae_tiling, HunyuanTileSpec):
            raise UnlearnError(f"vae_tiling = {vae_tiling!r} is invalid; expected None, true, false or a "
                               "HunyuanTileSpec")

    def video_shape(self, model_cfg, vae_cfg, num_frames=None, height=None, width=None) -> VideoShape:
        """HunyuanVideoPipeline's sizes: 129 frames of 720x1280 unless given; frames 1 + a multiple of the
        VAE's temporal factor, height and width multiples of its spatial factor times the patch."""
        pt, p = model_cfg.patch_size_t, model_cfg.patch_size
        if vae_cfg is not None:
            spatial, temporal = vae_cfg.spatial_compression_ratio, vae_cfg.temporal_compression_ratio
            if vae_cfg.latent_channels != model_cfg.in_channels:
                raise ModelFamilyError(f"the VAE makes {vae_cfg.latent_channels}-channel latents but the transformer "
                                       f"takes in_channels {model_cfg.in_channels}: the vae/ and transformer/ "
                                       "folders belong to different models")
            num_frames = DEFAULT_FRAMES if num_frames is None else num_frames
            height = DEFAULT_HEIGHT if height is None else height
            width = DEFAULT_WIDTH if width is None else width
        else:  # pixel space: the latents are the frames
            spatial, temporal = 1, 1
            num_frames, height, width = num_frames or 5, height or 16, width or 16
        num_frames, height, width = _positive("num_frames", num_frames), _positive("height", height), \
            _positive("width", width)
        if (num_frames - 1) % temporal:
            lo = (num_frames - 1) // temporal * temporal + 1
            raise UnlearnError(f"num_frames = {num_frames} does not fit the VAE (temporal compression {temporal}): "
                               f"use 1 + a multiple of {temporal}, e.g. {lo} or {lo + temporal}")
        f = (num_frames - 1) // temporal + 1
        if f % pt:
            raise UnlearnError(f"num_frames = {num_frames} gives {f} latent frames, not a multiple of the temporal "
                               f"patch {pt}")
        for name, v in (("height", height), ("width", width)):
            if v % (spatial * p):
                raise UnlearnError(f"{name} = {v} is not a multiple of {spatial * p} (the VAE's {spatial}x "
                                   f"compression times patch {p})")
        return VideoShape(num_frames, height, width, f, model_cfg.in_channels, height // spatial, width // spatial,
                          layout="CFHW")

    def decode(self, vae, latents, shape: VideoShape, tiling, warn=None):
        """Final latents (1, C, F, h, w) -> frames (F', H, W, 3) in [0, 1], as
        `HunyuanVideoPipeline(output_type="np")`: latents / scaling_factor, decoded, `(x / 2 + 0.5).clip(0, 1)`."""
        import jax.numpy as jnp
        import numpy as np

        lat = np.asarray(latents, np.float32)
        if vae is None:
            frames = np.clip((lat[0] + 1.0) / 2.0, 0.0, 1.0)  # (C, F, H, W) pixels in [-1, 1]
            return np.ascontiguousarray(frames.transpose(1, 2, 3, 0))
        z = vae.unscale(jnp.asarray(lat, vae.dtype))  # latents.to(vae.dtype) / scaling_factor
        video = jnp.clip(vae.decode(z, tiling=tiling) / 2 + 0.5, 0, 1)  # (1, 3, T, H, W)
        return np.ascontiguousarray(np.asarray(video[0].astype(jnp.float32)).transpose(1, 2, 3, 0))

    def noise_dtype(self, dtype: str) -> str:
        return "float32"  # prepare_latents draws float32 latents whatever the model's dtype

    # ---- sampling ----------------------------------------------------------------------------
    def sampler_defaults(self, model_cfg) -> SamplerDefaults:
        return SamplerDefaults("flow_euler", 50, DEFAULT_GUIDANCE, dynamic_cfg=False)

    def scheduler_config(self, config):
        return config.replace(flow_sigmas="linspace") if config.kind == "flow_euler" else config


FAMILY = HunyuanVideoFamily()
