"""The toy text-to-video model: a small CogVideoX transformer over pixels, a tiny T5 with a
word-level tokenizer, CogVideoX-2B's DDIM scheduler, saved as a diffusers pipeline folder.

- "Latents" are the world's pixels in [-1, 1], layout (B, frames, 3, size, size): no VAE.
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


@dataclasses.dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the toy model (the world's size/frames come from `WorldConfig`)."""

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
    the identity and the velocity as zero), as DiT initialises its adaLN-Zero blocks."""
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


def save_pipeline(folder, transformer: CogVideoXTransformer, text_encoder: T5Encoder, tokenizer, world_info: dict,
                  *, overwrite: bool = False):
    """Writes the diffusers pipeline folder layout (plus `toy_world.json`) into `folder` (`overwrite`:
    replace an earlier toy pipeline written by this project, nothing else)."""
    from unlearn_jax.atomic import atomic_dir
    from unlearn_jax.loading import save_transformer

    with atomic_dir(folder, overwrite, flag="--overwrite") as tmp:
        save_transformer(transformer, tmp / "transformer")
        save_text_encoder(text_encoder, tmp / "text_encoder")
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "CogVideoXPipeline",
            "_diffusers_version": "0.32.0",
            "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": [None, None],
        }, indent=2) + "\n")
        (tmp / "toy_world.json").write_text(json.dumps(world_info, indent=2) + "\n")
    return Path(folder)


def read_world_info(folder) -> dict:
    path = Path(folder) / "toy_world.json"
    return json.loads(path.read_text())


__all__ = ["SCHEDULER_CONFIG", "ToyModelConfig", "build_text_encoder", "build_tokenizer", "create_transformer",
           "read_world_info", "save_pipeline", "save_text_encoder", "text_encoder_config", "transformer_config"]
