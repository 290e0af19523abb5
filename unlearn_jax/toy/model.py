"""The toy text-to-video model: a small CogVideoX transformer over pixels, a tiny T5 with a
word-level tokenizer, CogVideoX-2B's DDIM scheduler, saved as a diffusers pipeline folder.
The same world also has a Wan-architecture toy (`WanToyModelConfig`, `arch="wan"`): a small
`WanTransformer3DModel` over pixels, the same frozen T5 read the Wan way (`text_encoding.WanT5Text`:
with the attention mask, states zero after each prompt), flow matching and Wan's UniPC scheduler,
saved as a `WanPipeline` folder.

- "Latents" are the world's pixels in [-1, 1], layout (B, frames, 3, size, size) for CogVideoX,
  (B, 3, frames, size, size) for Wan: no VAE.
- The text encoder stands in for a *pretrained* T5: its token embeddings are built so that the
  synonyms of an attribute value sit together (a shared direction per value plus a
  word-specific part, cosine ~ 1 - synonym_spread^2), which is what lets held-out synonyms,
  never in any training caption, reach the same concept. Its blocks are random and frozen.
  It is never trained: the video model learns to read it, as a real one learns to read T5-XXL.
- Prompts are encoded exactly as `CogVideoXPipeline` does (`text_encoding.encode_prompts`), so
  every project tool reads the folder like a real CogVideoX pipeline folder.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from unlearn_jax.models.t5 import T5Encoder, T5EncoderConfig, create_text_encoder, param_leaves

# diffusers' CogVideoX-2B scheduler config (CogVideoXDDIMScheduler, v-prediction, zero terminal SNR)
SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
ARCHS = ("cogvideox", "wan")


def wan_scheduler_config(flow_shift: float) -> dict:
    """The Wan pipelines' scheduler (`UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=...)`, as diffusers' conversion script
    builds it) with the toy's shift: every key diffusers 0.42 writes for that call."""
    return {
        "_class_name": "UniPCMultistepScheduler",
        "_diffusers_version": "0.42.1",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "disable_corrector": [],
        "dynamic_thresholding_ratio": 0.995,
        "final_sigmas_type": "zero",
        "flow_shift": float(flow_shift),
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "predict_x0": True,
        "prediction_type": "flow_prediction",
        "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0,
        "shift_terminal": None,
        "sigma_max": None,
        "sigma_min": None,
        "solver_order": 2,
        "solver_p": None,
        "solver_type": "bh2",
        "steps_offset": 0,
        "thresholding": False,
        "time_shift_type": "exponential",
        "timestep_spacing": "linspace",
        "trained_betas": None,
        "use_beta_sigmas": False,
        "use_dynamic_shifting": False,
        "use_exponential_sigmas": False,
        "use_flow_sigmas": True,
        "use_karras_sigmas": False,
    }


@dataclasses.dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the toy model (the world's size/frames come from `WorldConfig`)."""

    arch: ClassVar[str] = "cogvideox"

    width_heads: int = 3
    head_dim: int = 32
    num_layers: int = 4
    time_embed_dim: int = 96
    patch_size: int = 4
    max_text_seq_length: int = 12
    adaln_zero_init: bool = True     # DiT's adaLN-Zero: modulations and output start at zero (trains much faster)
    # text encoder
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 128
    synonym_spread: float = 0.35     # word-specific share of a concept word's embedding
    text_block_scale: float = 0.5    # scales the encoder blocks' output projections (keeps words legible)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class WanToyModelConfig:
    """Sizes of the Wan-architecture toy model. The text-encoder fields are `ToyModelConfig`'s (same
    names, same defaults): both toys read the same frozen encoder."""

    arch: ClassVar[str] = "wan"

    num_attention_heads: int = 3
    attention_head_dim: int = 32     # 3D RoPE over (frames, height, width): 12 + 10 + 10 of it
    num_layers: int = 4
    ffn_dim: int = 384
    freq_dim: int = 64
    patch_size: tuple = (1, 4, 4)
    # Text positions the transformer sees, written into transformer/config.json as
    # `max_text_seq_length`. The family's text side (`families.wan` -> `text_encoding.WanT5Text`)
    # pads every prompt to 512 (WanPipeline's max_sequence_length) whatever that field says, and
    # Wan's cross-attention has no mask, so the zero padding is part of what the model reads: the
    # model must be trained at the length the family encodes at (checked when the folder is saved).
    max_text_seq_length: int = 512
    flow_shift: float = 3.0          # the scheduler config's flow_shift (sampling)
    adaln_zero_init: bool = True     # gates, cross-attention output and output projection start at zero
    # text encoder (ToyModelConfig's)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 128
    synonym_spread: float = 0.35
    text_block_scale: float = 0.5

    def __post_init__(self):
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return {"arch": self.arch, **d}


def model_config(arch: str = "cogvideox", **changes):
    """The default toy model config of an architecture ("cogvideox" | "wan"), with `changes`."""
    if arch not in ARCHS:
        from unlearn_jax.errors import UnlearnError

        raise UnlearnError(f"toy model arch {arch!r} is unknown; expected one of {', '.join(ARCHS)}")
    cls = WanToyModelConfig if arch == "wan" else ToyModelConfig
    return cls(**changes)


def wan_transformer_config(cfg: WanToyModelConfig):
    from unlearn_jax.models.wan import WanConfig

    return WanConfig(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_attention_heads,
                     attention_head_dim=cfg.attention_head_dim, in_channels=3, out_channels=3, text_dim=cfg.text_dim,
                     freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True)


def create_wan_transformer(cfg: WanToyModelConfig, seed: int = 0):
    """A freshly initialised Wan transformer; with `adaln_zero_init` every block starts as the
    identity (its modulation table and time projection zero, so every gate is zero; the ungated
    cross-attention's output projection zero) and the velocity as zero (output projection zero),
    the Wan counterpart of DiT's adaLN-Zero."""
    from flax import nnx

    from unlearn_jax.models.wan import WanTransformer

    model = WanTransformer(wan_transformer_config(cfg), rngs=nnx.Rngs(seed))
    if cfg.adaln_zero_init:
        for mod in (model.time_proj, model.blocks.attn2.to_out, model.proj_out):
            mod.kernel[...] = jnp.zeros_like(mod.kernel[...])
            mod.bias[...] = jnp.zeros_like(mod.bias[...])
        model.blocks.scale_shift_table[...] = jnp.zeros_like(model.blocks.scale_shift_table[...])
    return model


def transformer_config(cfg: ToyModelConfig, size: int, frames: int) -> CogVideoXConfig:
    return CogVideoXConfig(
        num_attention_heads=cfg.width_heads, attention_head_dim=cfg.head_dim, in_channels=3, out_channels=3,
        time_embed_dim=cfg.time_embed_dim, text_embed_dim=cfg.text_dim, num_layers=cfg.num_layers,
        sample_width=size, sample_height=size, sample_frames=(frames - 1) * 4 + 1, patch_size=cfg.patch_size,
        max_text_seq_length=cfg.max_text_seq_length, spatial_interpolation_scale=1.0,
        temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False)


def create_transformer(cfg: ToyModelConfig, size: int, frames: int, seed: int = 0) -> CogVideoXTransformer:
    """A freshly initialised transformer; with `adaln_zero_init` the shift/scale/gate projections of
    every block, the output modulation and the output projection are zero (every block starts as
    the identity and the velocity as zero), as DiT initialises its adaLN-Zero blocks.
    A `WanToyModelConfig` gives the Wan transformer (`create_wan_transformer`; any size)."""
    if isinstance(cfg, WanToyModelConfig):
        return create_wan_transformer(cfg, seed)
    model = CogVideoXTransformer(transformer_config(cfg, size, frames), rngs=nnx.Rngs(seed))
    if cfg.adaln_zero_init:
        for mod in (model.blocks.norm1.linear, model.blocks.norm2.linear, model.norm_out_linear, model.proj_out):
            mod.kernel[...] = jnp.zeros_like(mod.kernel[...])
            mod.bias[...] = jnp.zeros_like(mod.bias[...])
    return model


# --------------------------------------------------------------------------------------------
# Tokenizer and text encoder
# --------------------------------------------------------------------------------------------
def tokenizer_vocab(words) -> list[tuple[str, float]]:
    """A Unigram vocabulary where every caption word is one token ('▁word'); single letters are a
    fallback that spells out unknown words."""
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + [("▁" + w, -1.0) for w in words]
    vocab += [("▁", -8.0)] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return vocab


def build_tokenizer(words):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=tokenizer_vocab(words), extra_ids=0)


def text_encoder_config(cfg: ToyModelConfig, vocab_size: int) -> T5EncoderConfig:
    return T5EncoderConfig(variant="t5", vocab_size=vocab_size, d_model=cfg.text_dim,
                           d_kv=cfg.text_dim // cfg.text_heads, d_ff=cfg.text_ff, num_layers=cfg.text_layers,
                           num_heads=cfg.text_heads, relative_attention_num_buckets=8,
                           relative_attention_max_distance=20, activation="gelu_new", gated=True)


def transformers_t5_config(enc: T5EncoderConfig) -> dict:
    """The text encoder's config.json, as transformers' T5Config writes it for a T5EncoderModel."""
    from transformers import T5Config

    c = T5Config(vocab_size=enc.vocab_size, d_model=enc.d_model, d_kv=enc.d_kv, d_ff=enc.d_ff,
                 num_layers=enc.num_layers, num_heads=enc.num_heads,
                 relative_attention_num_buckets=enc.relative_attention_num_buckets,
                 relative_attention_max_distance=enc.relative_attention_max_distance,
                 feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    d = c.to_dict()
    d["architectures"] = ["T5EncoderModel"]
    return d


def build_text_encoder(cfg: ToyModelConfig, tokenizer, groups: dict[str, list[str]], seed: int = 0) -> T5Encoder:
    """The frozen "pretrained" encoder: synonyms of a concept get nearby token embeddings."""
    enc_cfg = text_encoder_config(cfg, len(tokenizer))
    model = create_text_encoder(enc_cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    d = cfg.text_dim

    def unit(n):
        x = rng.standard_normal((n, d))
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    table = unit(len(tokenizer)) * np.sqrt(d)
    vocab = tokenizer.get_vocab()
    s = cfg.synonym_spread
    for name in sorted(groups):
        centre = unit(1)[0]
        for word in groups[name]:
            own = unit(1)[0]
            e = np.sqrt(1 - s * s) * centre + s * own
            table[vocab["▁" + word]] = e / np.linalg.norm(e) * np.sqrt(d)
    model.shared[...] = jnp.asarray(table, jnp.float32)
    blocks = model.blocks
    blocks.attn.o.kernel[...] = blocks.attn.o.kernel[...] * cfg.text_block_scale
    blocks.ffn.wo.kernel[...] = blocks.ffn.wo.kernel[...] * cfg.text_block_scale
    return model


# --------------------------------------------------------------------------------------------
# The pipeline folder
# --------------------------------------------------------------------------------------------
def save_text_encoder(model: T5Encoder, folder: Path):
    from unlearn_jax.conversion import iter_torch_tensors, write_safetensors
    from unlearn_jax.models.t5 import rule_table

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(transformers_t5_config(model.config), indent=2) + "\n")
    specs, tensors = iter_torch_tensors(rule_table(model.config), param_leaves(model))
    write_safetensors(folder / "model.safetensors", tensors, specs)


WAN_MODEL_INDEX = {
    "_class_name": "WanPipeline",
    "_diffusers_version": "0.42.1",
    "boundary_ratio": None,
    "expand_timesteps": False,
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": [None, None],
    "vae": [None, None],
}


def save_pipeline(folder, transformer, text_encoder: T5Encoder, tokenizer, world_info: dict,
                  *, overwrite: bool = False, model_cfg=None):
    """Writes the diffusers pipeline folder layout (plus `toy_world.json`) into `folder` (`overwrite`:
    replace an earlier toy pipeline written by this project, nothing else). A Wan transformer
    (`model_cfg` its `WanToyModelConfig`) gives a `WanPipeline` folder: UniPC with the config's
    flow_shift, `max_text_seq_length` in transformer/config.json; checked to be read back by the
    Wan family at that text length."""
    from unlearn_jax.atomic import atomic_dir
    from unlearn_jax.loading import save_transformer

    wan = isinstance(model_cfg, WanToyModelConfig)
    if not wan and not isinstance(transformer, CogVideoXTransformer):
        raise TypeError("save_pipeline: a Wan toy transformer needs model_cfg=WanToyModelConfig(...)")
    with atomic_dir(folder, overwrite, flag="--overwrite") as tmp:
        save_transformer(transformer, tmp / "transformer")
        if wan:
            path = tmp / "transformer" / "config.json"
            config = json.loads(path.read_text())
            config["max_text_seq_length"] = int(model_cfg.max_text_seq_length)
            path.write_text(json.dumps(config, indent=2) + "\n")
        save_text_encoder(text_encoder, tmp / "text_encoder")
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "scheduler").mkdir()
        scheduler = wan_scheduler_config(model_cfg.flow_shift) if wan else SCHEDULER_CONFIG
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index = WAN_MODEL_INDEX if wan else {
            "_class_name": "CogVideoXPipeline",
            "_diffusers_version": "0.32.0",
            "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": [None, None],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "toy_world.json").write_text(json.dumps(world_info, indent=2) + "\n")
        if wan:
            check_text_length(tmp, model_cfg.max_text_seq_length)
    return Path(folder)


def check_text_length(folder, trained: int):
    """Refuses a Wan toy folder whose family text side encodes at another length than the model was
    trained at (the zero padding is part of what a Wan transformer reads)."""
    from unlearn_jax import families
    from unlearn_jax.errors import UnlearnError

    used = families.of_folder(folder).text(Path(folder)).max_length
    if used != trained:
        raise UnlearnError(f"the Wan toy was trained with {trained} text positions but the Wan family encodes its "
                           f"prompts at {used}; train with max_text_seq_length {used}")


def read_world_info(folder) -> dict:
    path = Path(folder) / "toy_world.json"
    return json.loads(path.read_text())


__all__ = ["ARCHS", "SCHEDULER_CONFIG", "ToyModelConfig", "WAN_MODEL_INDEX", "WanToyModelConfig", "build_text_encoder",
           "build_tokenizer", "check_text_length", "create_transformer", "create_wan_transformer", "model_config",
           "read_world_info", "save_pipeline", "save_text_encoder", "text_encoder_config", "transformer_config",
           "wan_scheduler_config", "wan_transformer_config"]
