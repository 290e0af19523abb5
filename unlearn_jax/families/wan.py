"""The Wan family: Wan 2.1 T2V (1.3B, 14B) and Wan 2.2 TI2V-5B used for text-to-video.

What is Wan's, as the core needs it:
- the transformer (`models.wan`): self-attention over the video tokens only, cross-attention to the
  text; latents laid out (B, C, F, H, W);
- the text side (`text_encoding.WanT5Text`): UMT5 with the mask, 512 tokens, each prompt's states
  kept to its length and zero after it; the conditioning is that embeddings array;
- the VAE (`models.wan_vae`): latents normalised by the VAE's `latents_mean` / `latents_std`, decoded
  one latent frame at a time with the causal cache, spatial tiling as `enable_tiling()`;
- sampling as `WanPipeline`: UniPC with flow sigmas and the scheduler config's `flow_shift`, 50
  steps, guidance 5, batched CFG; 81 frames at 480x832 by default;
- erasers: the adapter on every block's self-attention (`attn1`) output, where every token is a
  video token; the localization mask from the cross-attention (`attn2`, the video queries over the
  text keys, after its q/k norms, as the model's softmax sees them); LoRA on `attn1`'s projections,
  in the keys `WanPipeline.load_lora_weights` reads.

The two-expert Wan 2.2 T2V-A14B (`transformer_2` and `boundary_ratio` in model_index.json) loads
as one `models.wan_experts.WanExperts`: the high-noise expert at timesteps >= boundary_ratio *
num_train_timesteps, the low-noise one below, each with its own guidance scale (the pipeline's
`guidance_scale` / `guidance_scale_2`). Its erasers are 2 x num_layers rows (the high expert's
first), adapters or LoRA (attn / full erasers would fine-tune both experts' blocks through one
stack and are refused). Image-to-video pipelines are refused with one line (`check_folder`).
"""
from __future__ import annotations

from pathlib import Path

from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.families.base import EraserSite, Family, SamplerDefaults, VideoShape

CLASS_NAME = "WanTransformer3DModel"
LORA_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH = 81, 480, 832  # WanPipeline.__call__'s defaults
# the two-expert pipeline's components, in eraser-row order: the high-noise expert, then the low-noise one
EXPERTS = ("transformer", "transformer_2")
IMAGE_TO_VIDEO = ("WanImageToVideoPipeline", "WanVACEPipeline", "WanVideoToVideoPipeline", "WanAnimatePipeline")


def _two_experts(root: Path) -> float | None:
    """The boundary_ratio of a two-expert pipeline folder (transformer_2 named in model_index.json and a
    boundary set), else None: without a boundary WanPipeline never calls transformer_2."""
    from unlearn_jax.jsonfiles import read_json_object

    index = Path(root) / "model_index.json"
    if not index.is_file():
        return None
    d = read_json_object(index, "pipeline index")
    entry = d.get("transformer_2")
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1] is not None):
        return None
    ratio = d.get("boundary_ratio")
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ModelFamilyError(f"{index}: boundary_ratio = {ratio!r} must be a number in (0, 1) (the share of the "
                               "timesteps above which transformer/ runs)")
    return float(ratio)


def _num_train_timesteps(root: Path) -> int:
    """The scheduler's num_train_timesteps (the boundary's scale); 1000, diffusers' default, without one."""
    from unlearn_jax.jsonfiles import read_json_object

    path = Path(root) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return 1000
    n = read_json_object(path, "scheduler config").get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ModelFamilyError(f"{path}: num_train_timesteps = {n!r} must be an integer >= 2")
    return n


def _is_experts(cfg) -> bool:
    from unlearn_jax.models.wan_experts import WanExpertsConfig

    return isinstance(cfg, WanExpertsConfig)


def _positive(name: str, value) -> int:
    from unlearn_jax.checks import positive_int

    return positive_int(name, value)


class WanFamily(Family):
    name = "wan"
    title = "Wan"
    transformer_class = CLASS_NAME
    pipeline_classes = ("WanPipeline",) + IMAGE_TO_VIDEO  # recognised, so that the refusal can say why
    samplers = ("unipc", "flow_euler")
    guidance = "cfg"
    latent_layout = "CFHW"
    published_prefix = "blocks.{layer}.attn1.adapter"

    # ---- the folder ----------------------------------------------------------------------------
    def check_folder(self, root: Path) -> None:
        from unlearn_jax.jsonfiles import read_json_object

        index = Path(root) / "model_index.json"
        if not index.is_file():
            return
        d = read_json_object(index, "pipeline index")
        if d.get("_class_name") in IMAGE_TO_VIDEO:
            raise ModelFamilyError(f"{root}: a {d['_class_name']} folder; only Wan's text-to-video pipelines "
                                   "(WanPipeline) are supported")
        ratio = _two_experts(root)
        if ratio is not None and not (Path(root) / "transformer_2").is_dir():
            raise ModelFamilyError(f"{root}: a two-expert Wan pipeline (transformer + transformer_2, boundary_ratio "
                                   f"{ratio}); its transformer_2/ folder is missing")

    def pipeline_transformer_config(self, root: Path, read_one):
        ratio = _two_experts(root)
        if ratio is None:
            return read_one(Path(root) / "transformer")
        from unlearn_jax.models.wan_experts import HIGH, LOW, WanExpertsConfig

        self.check_folder(root)
        return WanExpertsConfig(read_one(Path(root) / HIGH), read_one(Path(root) / LOW), ratio,
                                _num_train_timesteps(root))

    def load_pipeline_transformer(self, root: Path, load_one):
        ratio = _two_experts(root)
        if ratio is None:
            return load_one(Path(root) / "transformer")
        from unlearn_jax.models.wan_experts import HIGH, LOW, WanExperts

        self.check_folder(root)
        return WanExperts(load_one(Path(root) / HIGH), load_one(Path(root) / LOW), ratio, _num_train_timesteps(root))

    # ---- the transformer -------------------------------------------------------------------
    def recognises(self, config) -> bool:
        return "ffn_dim" in config and "freq_dim" in config

    def owns(self, config) -> bool:
        from unlearn_jax.models.wan import WanConfig

        return isinstance(config, WanConfig) or _is_experts(config)

    def transformer_config(self, d, where: str = "config"):
        """One transformer's config.json, or both experts' (`WanExpertsConfig.to_dict`'s shape)."""
        from unlearn_jax.models.wan import WanConfig
        from unlearn_jax.models.wan_experts import WanExpertsConfig

        if WanExpertsConfig.is_experts_dict(dict(d)):
            return WanExpertsConfig.from_dict(dict(d), where, self.transformer_config)
        cfg = WanConfig.from_dict(dict(d), where)
        if cfg.in_channels == 2 * cfg.out_channels + 4:  # I2V: noise + image latents + a 4-channel frame mask
            raise ModelFamilyError(f"{where}: in_channels {cfg.in_channels} = 2 x {cfg.out_channels} + 4, the input "
                                   "of an image-to-video Wan transformer; only text-to-video is supported")
        return cfg

    def abstract_transformer(self, cfg, **runtime):
        if _is_experts(cfg):
            from unlearn_jax.models.wan_experts import abstract_experts

            return abstract_experts(cfg, **runtime)
        from unlearn_jax.models.wan import abstract_model

        return abstract_model(cfg, **runtime)

    def build_transformer(self, cfg, seed: int = 0, **runtime):
        if _is_experts(cfg):
            from unlearn_jax.models.wan_experts import build_experts

            return build_experts(cfg, seed, **runtime)
        from flax import nnx

        from unlearn_jax.models.wan import WanTransformer

        return WanTransformer(cfg, rngs=nnx.Rngs(seed), **runtime)

    def transformer_rules(self, cfg):
        if _is_experts(cfg):  # each expert is its own diffusers folder, with its own table
            raise UnlearnError("the two Wan experts are two diffusers transformers: take the rule table of each "
                               "(model.experts())")
        from unlearn_jax.models.wan import rule_table

        return rule_table(cfg)

    def token_grid(self, model, latent_shape):
        _, f, h, w = latent_shape
        return model.token_grid(f, h, w)

    def eraser_site_from_dict(self, config) -> EraserSite:
        if isinstance(config.get(EXPERTS[1]), dict):  # both experts: one stack of 2 x num_layers rows, high first
            import dataclasses

            one = self.eraser_site_from_dict(config[EXPERTS[0]])
            return dataclasses.replace(one, num_layers=2 * one.num_layers, kinds=("adapter", "lora"),
                                       kinds_reason="the two-expert Wan 2.2 A14B takes adapter or lora erasers "
                                                    "(attn / full erasers would copy both experts' blocks)")
        d = int(config.get("num_attention_heads", 40)) * int(config.get("attention_head_dim", 128))
        return EraserSite(stack="blocks", num_layers=int(config.get("num_layers", 40)), dim=d, attention="attn1",
                          lora_targets={t: (d, d) for t in LORA_MODULES}, torch_blocks="blocks",
                          torch_attention="attn1", torch_lora_modules=LORA_MODULES, torch_output="tensor")

    # ---- text ------------------------------------------------------------------------------
    def text(self, pipeline_dir: Path, cache=None):
        from unlearn_jax.text_encoding import WanT5Text

        return WanT5Text(pipeline_dir, cache=cache)

    # ---- VAE and shapes --------------------------------------------------------------------
    def vae_config(self, vae_dir: Path):
        from unlearn_jax.models.wan_vae import WanVAEConfig

        return WanVAEConfig.from_json(Path(vae_dir) / "config.json")

    def load_vae(self, vae_dir: Path, dtype=None, mesh=None):
        from unlearn_jax.models.wan_vae import load_wan_vae

        return load_wan_vae(vae_dir, dtype=dtype, mesh=mesh)

    def check_tiling(self, vae_tiling) -> None:
        if vae_tiling is None or isinstance(vae_tiling, bool):
            return
        from unlearn_jax.models.wan_vae import WanTileSpec

        if not isinstance(vae_tiling, WanTileSpec):
            raise UnlearnError(f"vae_tiling = {vae_tiling!r} is invalid; expected None, true, false or a WanTileSpec")

    def video_shape(self, model_cfg, vae_cfg, num_frames=None, height=None, width=None) -> VideoShape:
        """WanPipeline's sizes: 81 frames of 480x832 unless given; frames 1 + a multiple of the VAE's
        temporal factor, height and width multiples of its spatial factor times the patch."""
        pt, ph, pw = model_cfg.patch_size
        if vae_cfg is not None:
            spatial, temporal = vae_cfg.spatial_ratio, vae_cfg.temporal_ratio
            if vae_cfg.z_dim != model_cfg.in_channels:
                raise ModelFamilyError(f"the VAE makes {vae_cfg.z_dim}-channel latents but the transformer takes "
                                       f"in_channels {model_cfg.in_channels}: the vae/ and transformer/ folders "
                                       "belong to different Wan models")
            num_frames = DEFAULT_FRAMES if num_frames is None else num_frames
            height = DEFAULT_HEIGHT if height is None else height
            width = DEFAULT_WIDTH if width is None else width
        else:  # pixel space (a toy model): the latents are the frames
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
        for name, v, p in (("height", height, ph), ("width", width, pw)):
            if v % (spatial * p):
                raise UnlearnError(f"{name} = {v} is not a multiple of {spatial * p} (the VAE's {spatial}x "
                                   f"compression times patch {p})")
        return VideoShape(num_frames, height, width, f, model_cfg.in_channels, height // spatial, width // spatial,
                          layout="CFHW")

    def decode(self, vae, latents, shape: VideoShape, tiling, warn=None):
        """Final latents (1, C, F, h, w) -> frames (F', H, W, 3) in [0, 1], as `WanPipeline(output_type="np")`:
        the latents denormalised by the VAE's mean / std, decoded, `(x / 2 + 0.5).clip(0, 1)`."""
        import jax.numpy as jnp
        import numpy as np

        lat = np.asarray(latents, np.float32)
        if vae is None:
            frames = np.clip((lat[0] + 1.0) / 2.0, 0.0, 1.0)  # (C, F, H, W) pixels in [-1, 1]
            return np.ascontiguousarray(frames.transpose(1, 2, 3, 0))
        z = vae.denormalize(jnp.asarray(lat, vae.dtype))
        video = jnp.clip(vae.decode(z, tiling=tiling) / 2 + 0.5, 0, 1)  # (1, 3, T, H, W)
        return np.ascontiguousarray(np.asarray(video[0].astype(jnp.float32)).transpose(1, 2, 3, 0))

    def noise_dtype(self, dtype: str) -> str:
        return "float32"  # WanPipeline draws its latents in float32 whatever the model's dtype

    # ---- sampling ----------------------------------------------------------------------------
    def guidance_boundary(self, model_cfg) -> float | None:
        return model_cfg.boundary if _is_experts(model_cfg) else None

    def sampler_defaults(self, model_cfg) -> SamplerDefaults:
        return SamplerDefaults("unipc", 50, 5.0, dynamic_cfg=False)

    def training_sampler(self, model_cfg) -> str:
        return "unipc"


FAMILY = WanFamily()
