"""HunyuanVideo transformer (diffusers' `HunyuanVideoTransformer3DModel`, text-to-video) in Flax NNX.

Covers the text-to-video checkpoints: the guidance-distilled HunyuanVideo ("HYVideo-T/2-cfgdistill",
`guidance_embeds=True`) and configs without the guidance embedding. Image-to-video
(`image_condition_type`: "latent_concat" / "token_replace") is refused.

Layout (as diffusers):
- the video latents are patched by a strided 3D convolution (here a Dense over flattened patches);
- the token refiner embeds the text: its own time + mean-pooled-text conditioning and
  `num_refiner_layers` self-attention blocks over the text alone (padded tokens masked);
- the modulation vector is time + (guidance) + pooled CLIP projection;
- `num_layers` dual-stream blocks: separate video / text weights, one joint attention over
  [video; text] with per-head RMS q/k norms, 3D RoPE on the video tokens only;
- `num_single_layers` single-stream blocks on the joint [video; text] sequence: one modulated
  norm feeds both the attention (no output projection) and an MLP; their concatenation goes
  through `proj_out`, gated, residual;
- the final modulated norm and projection on the video tokens, unpatchified.
The joint attention masks the text keys after each prompt's length (`mask.sum()`), as diffusers
builds it from `encoder_attention_mask`; queries are not masked.

The three block stacks are stacked modules, each run with one `jax.lax.scan` under a remat policy.
The erasers' stack is `single_blocks`: the hooks (`models.hooks`) are called only there.

`forward(latents (B, C, F, H, W), cond, timestep)` with the conditioning pytree
`cond = {"text": (B, L, text_embed_dim), "mask": (B, L) int (1 = real token), "pooled": (B,
pooled_projection_dim), "guidance": (B,)}` ("guidance" is the pipeline's `guidance_scale * 1000`,
ignored without `guidance_embeds`). `model(...)` takes diffusers' forward arguments in their order.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from unlearn_jax.conversion import IDENTITY, LINEAR, Rule, RuleTable, flatten_in
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.jsonfiles import read_json_object
from unlearn_jax.models.hooks import NO_HOOKS, ConceptAttention, Hooks
from unlearn_jax.models.layers import (ATTENTION_IMPLS, Dense, LayerNorm, Runtime, attention, jitted_forward,
                                      logical_constraint, remat, timestep_embedding)
from unlearn_jax.models.wan import RMSNorm, apply_rope

CLASS_NAME = "HunyuanVideoTransformer3DModel"
FREQ_DIM = 256  # sinusoidal features of the timestep and guidance embedders (fixed in diffusers)
REFINER_MLP_RATIO = 4.0  # diffusers builds the token refiner with its default ratio, not the config's
EPS = 1e-6
COND_KEYS = ("text", "mask", "pooled")

__all__ = ["CLASS_NAME", "HunyuanVideoConfig", "HunyuanVideoTransformer", "Runtime", "abstract_model", "key_mask",
           "rope_tables", "rule_table"]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig:
    """The fields of diffusers' `HunyuanVideoTransformer3DModel` config.json (same names, same defaults)."""

    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple = (16, 56, 56)
    image_condition_type: str | None = None

    def __post_init__(self):
        # JSON gives a list; the config is a static (hashed) part of the module graph.
        if isinstance(self.rope_axes_dim, list):
            object.__setattr__(self, "rope_axes_dim", tuple(self.rope_axes_dim))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.patch_size_t, self.patch_size, self.patch_size

    @property
    def patch_numel(self) -> int:
        return self.in_channels * int(np.prod(self.patch))

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def refiner_mlp_dim(self) -> int:
        return int(self.inner_dim * REFINER_MLP_RATIO)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "HunyuanVideoConfig":
        name = d.get("_class_name")
        if name is not None and name != CLASS_NAME:
            raise ModelFamilyError(f"{where}: holds a {name}, not a {CLASS_NAME} (HunyuanVideo transformer)")
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in fields})
        cfg.validate(where)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "HunyuanVideoConfig":
        return cls.from_dict(read_json_object(path, "transformer config"), str(path))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_axes_dim"] = list(self.rope_axes_dim)
        return {"_class_name": CLASS_NAME, **d}

    def validate(self, where: str = "config"):
        if self.image_condition_type is not None:
            raise UnlearnError(f"{where}: image_condition_type {self.image_condition_type!r}: image-to-video "
                               "HunyuanVideo models are not supported (text-to-video only)")
        if self.qk_norm != "rms_norm":
            raise UnlearnError(f"{where}: qk_norm {self.qk_norm!r} is not supported (rms_norm)")
        for name in ("in_channels", "num_attention_heads", "attention_head_dim", "num_layers", "num_single_layers",
                     "num_refiner_layers", "patch_size", "patch_size_t", "text_embed_dim", "pooled_projection_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UnlearnError(f"{where}: {name} = {v!r} must be a positive integer")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels <= 0):
            raise UnlearnError(f"{where}: out_channels = {self.out_channels!r} must be a positive integer or null")
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0 or self.mlp_dim <= 0:
            raise UnlearnError(f"{where}: mlp_ratio = {self.mlp_ratio!r} must be a positive number")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise UnlearnError(f"{where}: rope_theta = {self.rope_theta!r} must be a positive number")
        r = self.rope_axes_dim
        if not (isinstance(r, tuple) and len(r) == 3 and all(isinstance(v, int) and v > 0 and v % 2 == 0 for v in r)):
            raise UnlearnError(f"{where}: rope_axes_dim {r!r} must be three positive even integers (t, h, w)")
        if sum(r) != self.attention_head_dim:
            raise UnlearnError(f"{where}: rope_axes_dim {list(r)} sums to {sum(r)}, not attention_head_dim "
                               f"{self.attention_head_dim}")


# --------------------------------------------------------------------------------------------
# 3D rotary embedding (video tokens only), computed on the host for static shapes
# --------------------------------------------------------------------------------------------
def _rope_1d(dim: int, n: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    # float32 throughout, as HunyuanVideoRotaryPosEmbed computes its angles.
    freqs = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    ang = np.outer(np.arange(n, dtype=np.float32), freqs)
    return np.cos(ang), np.sin(ang)


def rope_tables(cfg: HunyuanVideoConfig, frames: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (frames * grid_h * grid_w, head_dim // 2) float32: one angle per rotated pair.

    `frames`, `grid_h`, `grid_w` count tokens (after patching); each head is split into
    `rope_axes_dim` parts rotated by the frame, row and column index, in that order."""
    grid = (frames, grid_h, grid_w)
    parts = [_rope_1d(d, n, cfg.rope_theta) for d, n in zip(cfg.rope_axes_dim, grid)]
    out = []
    for k in range(2):
        t, h, w = (p[k] for p in parts)
        full = np.concatenate([
            np.broadcast_to(t[:, None, None], grid + t.shape[-1:]),
            np.broadcast_to(h[None, :, None], grid + h.shape[-1:]),
            np.broadcast_to(w[None, None, :], grid + w.shape[-1:]),
        ], axis=-1)
        out.append(np.ascontiguousarray(full.reshape(frames * grid_h * grid_w, -1), dtype=np.float32))
    return tuple(out)


def _rope_video_part(x, rope, n_video: int):
    """RoPE on the first `n_video` tokens of x (B, S, N, H); the text tokens after them are left as they are."""
    if n_video == x.shape[1]:
        return apply_rope(x, *rope)
    return jnp.concatenate([apply_rope(x[:, :n_video], *rope), x[:, n_video:]], axis=1)


def key_mask(text_mask, n_video: int):
    """The joint attention's (B, n_video + L) bool key mask, as diffusers builds it: every video key, then
    the first `text_mask.sum()` text keys of each row (the count, not the positions: right padding)."""
    text_mask = jnp.asarray(text_mask)
    length = n_video + jnp.sum(text_mask.astype(jnp.int32), axis=1)
    return jnp.arange(n_video + text_mask.shape[1])[None, :] < length[:, None]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
def _split_heads(y, heads: int):
    return y.reshape(*y.shape[:2], heads, -1)


def _affine_norm(dim: int, rt: Runtime, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(dim, EPS, affine=True, param_dtype=rt.param_dtype, rngs=rngs)


def _plain_norm(dim: int, rt: Runtime, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(dim, EPS, affine=False, param_dtype=rt.param_dtype, rngs=rngs)


def _head_norm(cfg: HunyuanVideoConfig, rt: Runtime, rngs: nnx.Rngs) -> RMSNorm:
    """qk_norm "rms_norm": one RMSNorm over each head's channels (weights shared by the heads)."""
    return RMSNorm(cfg.attention_head_dim, EPS, "kv", param_dtype=rt.param_dtype, rngs=rngs)


def _modulate(norm: LayerNorm, x, shift, scale):
    """norm(x) * (1 + scale) + shift in fp32; shift / scale (B, D) broadcast over the tokens."""
    return (norm(x.astype(jnp.float32)) * (1 + scale[:, None]) + shift[:, None]).astype(x.dtype)


def _gated(x, y, gate):
    """x + y * gate, the residual in fp32; gate (B, D)."""
    return (x.astype(jnp.float32) + y.astype(jnp.float32) * gate[:, None]).astype(x.dtype)


class FeedForward(nnx.Module):
    """diffusers' FeedForward: proj_in -> activation (gelu-tanh, or silu in the refiner) -> proj_out."""

    def __init__(self, dim: int, hidden: int, activation: str, rt: Runtime, rngs: nnx.Rngs):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.activation = activation
        self.proj_in = Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.proj_out = Dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x):
        h = self.proj_in(x).astype(jnp.float32)
        h = jax.nn.silu(h) if self.activation == "silu" else jax.nn.gelu(h, approximate=True)
        return self.proj_out(h.astype(x.dtype))


class TimeEmbedding(nnx.Module):
    """diffusers' TimestepEmbedding / PixArtAlphaTextProjection with silu: linear_1 -> silu -> linear_2, in fp32."""

    def __init__(self, din: int, dim: int, in_axis: str, rt: Runtime, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.float32, param_dtype=rt.param_dtype, rngs=rngs)
        self.linear_1 = Dense(din, dim, (in_axis, "temb"), **kw)
        self.linear_2 = Dense(dim, dim, ("temb", "temb"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x.astype(jnp.float32))))


class RefinerAttention(nnx.Module):
    """The token refiner's self-attention over the text (no q/k norm, no RoPE)."""

    def __init__(self, cfg: HunyuanVideoConfig, rt: Runtime, rngs: nnx.Rngs):
        dim, kw = cfg.inner_dim, dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.heads, self.impl, self.chunk = cfg.num_attention_heads, rt.attention, rt.attention_chunk
        self.to_q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_v = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_out = Dense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x, valid):
        """valid (B, L) bool, the real tokens. diffusers' mask: a real query sees the real keys and key 0,
        a padded query sees key 0 only (so its output is exactly v[0])."""
        q, k, v = (_split_heads(f(x), self.heads) for f in (self.to_q, self.to_k, self.to_v))
        keys = valid.at[:, 0].set(True)
        o = attention(q, k, v, self.impl, self.chunk, key_mask=keys)
        o = jnp.where(valid[:, :, None, None], o, v[:, :1])
        return self.to_out(o.reshape(*x.shape[:2], -1))


class RefinerBlock(nnx.Module):
    """One HunyuanVideoIndividualTokenRefinerBlock."""

    def __init__(self, cfg: HunyuanVideoConfig, rt: Runtime, rngs: nnx.Rngs):
        dim = cfg.inner_dim
        self.norm1 = _affine_norm(dim, rt, rngs)
        self.attn = RefinerAttention(cfg, rt, rngs)
        self.norm2 = _affine_norm(dim, rt, rngs)
        self.ff = FeedForward(dim, cfg.refiner_mlp_dim, "silu", rt, rngs)
        self.norm_out = Dense(dim, 2 * dim, ("temb", "adaln"), dtype=jnp.float32, param_dtype=rt.param_dtype,
                              rngs=rngs)

    def __call__(self, h, temb, valid):
        """h (B, L, D); temb (B, D) the refiner's conditioning (fp32); valid (B, L) bool."""
        f32, dt = jnp.float32, h.dtype
        gates = self.norm_out(jax.nn.silu(temb)).reshape(h.shape[0], 2, -1)
        a = self.attn(self.norm1(h.astype(f32)).astype(dt), valid)
        h = _gated(h, a, gates[:, 0])
        return _gated(h, self.ff(self.norm2(h.astype(f32)).astype(dt)), gates[:, 1])


def _stack(n: int, make, rngs: nnx.Rngs):
    """`n` blocks stacked on a leading "layers" axis (one module, scanned over)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


class TokenRefiner(nnx.Module):
    """HunyuanVideoTokenRefiner: the text embedding, conditioned on the timestep and the mean of the real tokens."""

    def __init__(self, cfg: HunyuanVideoConfig, rt: Runtime, rngs: nnx.Rngs):
        self.runtime = rt
        self.time_embed = TimeEmbedding(FREQ_DIM, cfg.inner_dim, "freq", rt, rngs)
        self.pooled_embed = TimeEmbedding(cfg.text_embed_dim, cfg.inner_dim, "text_embed", rt, rngs)
        self.proj_in = Dense(cfg.text_embed_dim, cfg.inner_dim, ("text_embed", "embed"), dtype=rt.dtype,
                             param_dtype=rt.param_dtype, rngs=rngs)
        self.blocks = _stack(cfg.num_refiner_layers, lambda r: RefinerBlock(cfg, rt, r), rngs)

    def __call__(self, text, mask, t_feats):
        """text (B, L, text_embed_dim), mask (B, L) (1 = real token), t_feats (B, FREQ_DIM) -> (B, L, D)."""
        rt = self.runtime
        m = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(text.astype(jnp.float32) * m, axis=1) / jnp.sum(m, axis=1)
        temb = self.time_embed(t_feats) + self.pooled_embed(pooled)
        valid = mask > 0
        h = self.proj_in(text.astype(rt.dtype))
        graphdef, state = nnx.split(self.blocks)

        def body(hh, layer_state):
            hh = logical_constraint(hh, ("batch", "length", "embed"), rt.mesh, rt.rules)
            return nnx.merge(graphdef, layer_state)(hh, temb, valid), None

        h, _ = jax.lax.scan(remat(body, rt.remat), h, state, unroll=rt.scan_unroll)
        return h


class JointAttention(nnx.Module):
    """The dual-stream blocks' attention: video projections (to_*) and text projections (add_*), one softmax
    over the [video; text] keys."""

    def __init__(self, cfg: HunyuanVideoConfig, rt: Runtime, rngs: nnx.Rngs):
        dim, kw = cfg.inner_dim, dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.heads, self.impl, self.chunk = cfg.num_attention_heads, rt.attention, rt.attention_chunk
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(self, name, Dense(dim, dim, ("embed", "heads"), **kw))
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            setattr(self, name, _head_norm(cfg, rt, rngs))
        self.to_out = Dense(dim, dim, ("heads", "embed"), **kw)
        self.to_add_out = Dense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x, ctx, rope, keys):
        split = lambda y: _split_heads(y, self.heads)  # noqa: E731
        q = apply_rope(self.norm_q(split(self.to_q(x))), *rope)
        k = apply_rope(self.norm_k(split(self.to_k(x))), *rope)
        v = split(self.to_v(x))
        q = jnp.concatenate([q, self.norm_added_q(split(self.add_q_proj(ctx)))], axis=1)
        k = jnp.concatenate([k, self.norm_added_k(split(self.add_k_proj(ctx)))], axis=1)
        v = jnp.concatenate([v, split(self.add_v_proj(ctx))], axis=1)
        o = checkpoint_name(attention(q, k, v, self.impl, self.chunk, key_mask=keys), "attn_out")
        o = o.reshape(*o.shape[:2], -1)
        n = x.shape[1]
        return self.to_out(o[:, :n]), self.to_add_out(o[:, n:])


class DualBlock(nnx.Module):
    """One HunyuanVideoTransformerBlock (video and text streams, joint attention)."""

    def __init__(self, cfg: HunyuanVideoConfig, rt: Runtime, rngs: nnx.Rngs):
        dim = cfg.inner_dim
        mk = dict(dtype=jnp.float32, param_dtype=rt.param_dtype, rngs=rngs)  # modulation in fp32, as the norms
        self.mod = Dense(dim, 6 * dim, ("temb", "adaln"), **mk)
        self.mod_context = Dense(dim, 6 * dim, ("temb", "adaln"), **mk)
        self.norm = _plain_norm(dim, rt, rngs)  # every LayerNorm of the block is affine-free: one module serves
        self.attn = JointAttention(cfg, rt, rngs)
        self.ff = FeedForward(dim, cfg.mlp_dim, "gelu_tanh", rt, rngs)
        self.ff_context = FeedForward(dim, cfg.mlp_dim, "gelu_tanh", rt, rngs)

    def __call__(self, h, e, svec, rope, keys):
        """h (B, N, D) video, e (B, L, D) text, svec (B, D) silu of the modulation vector (fp32)."""
        b = h.shape[0]
        m = self.mod(svec).reshape(b, 6, -1)  # shift, scale, gate (attention), shift, scale, gate (MLP)
        c = self.mod_context(svec).reshape(b, 6, -1)
        a, ca = self.attn(_modulate(self.norm, h, m[:, 0], m[:, 1]), _modulate(self.norm, e, c[:, 0], c[:, 1]),
                          rope, keys)
        h, e = _gated(h, a, m[:, 2]), _gated(e, ca, c[:, 2])
        h = _gated(h, self.ff(_modulate(self.norm, h, m[:, 3], m[:, 4])), m[:, 5])
        e = _gated(e, self.ff_context(_modulate(self.norm, e, c[:, 3], c[:, 4])), c[:, 5])
        return h, e


class SingleAttention(nnx.Module):
    """The single-stream blocks' attention over the joint sequence (pre_only: no output projection)."""

    def __init__(self, cfg: HunyuanVideoConfig, rt: Runtime, rngs: nnx.Rngs):
        dim, kw = cfg.inner_dim, dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.heads, self.impl, self.chunk = cfg.num_attention_heads, rt.attention, rt.attention_chunk
        self.to_q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_v = Dense(dim, dim, ("embed", "heads"), **kw)
        self.norm_q = _head_norm(cfg, rt, rngs)
        self.norm_k = _head_norm(cfg, rt, rngs)

    def __call__(self, x, rope, n_video: int, keys, concept_hook=None):
        q = _rope_video_part(self.norm_q(_split_heads(self.to_q(x), self.heads)), rope, n_video)
        k = _rope_video_part(self.norm_k(_split_heads(self.to_k(x), self.heads)), rope, n_video)
        v = _split_heads(self.to_v(x), self.heads)
        # The concept hook sees the q/k whose softmax the model computes (after the norms and RoPE).
        concept_aux = None if concept_hook is None else concept_hook(ConceptAttention(
            video_queries=q[:, :n_video], keys=k, text_start=n_video, text_len=x.shape[1] - n_video, key_mask=keys))
        o = checkpoint_name(attention(q, k, v, self.impl, self.chunk, key_mask=keys), "attn_out")
        return o.reshape(*x.shape[:2], -1), concept_aux


class SingleBlock(nnx.Module):
    """One HunyuanVideoSingleTransformerBlock (the erasers' block)."""

    def __init__(self, cfg: HunyuanVideoConfig, rt: Runtime, rngs: nnx.Rngs):
        dim, kw = cfg.inner_dim, dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.mod = Dense(dim, 3 * dim, ("temb", "adaln"), dtype=jnp.float32, param_dtype=rt.param_dtype, rngs=rngs)
        self.norm = _plain_norm(dim, rt, rngs)
        self.attn = SingleAttention(cfg, rt, rngs)
        self.proj_mlp = Dense(dim, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.proj_out = Dense(dim + cfg.mlp_dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x, svec, rope, n_video: int, keys, hooks: Hooks = NO_HOOKS, extra=None):
        """x (B, N_video + L, D) the joint sequence; returns (x', {"concept": ..., "attn": ...})."""
        m = self.mod(svec).reshape(x.shape[0], 3, -1)  # shift, scale, gate
        n = _modulate(self.norm, x, m[:, 0], m[:, 1])
        mlp = jax.nn.gelu(self.proj_mlp(n).astype(jnp.float32), approximate=True).astype(n.dtype)
        concept_hook = None
        if hooks.on_concept_attention is not None:
            concept_hook = lambda view: hooks.concept(view, extra)  # noqa: E731
        o, concept_aux = self.attn(n, rope, n_video, keys, concept_hook)
        # The adapter acts on the video tokens' attention output (diffusers' attn returns (video, text)).
        a, attn_aux = hooks.video_attn(o[:, :n_video], extra)
        o = jnp.concatenate([a.astype(o.dtype), o[:, n_video:]], axis=1)
        x = _gated(x, self.proj_out(jnp.concatenate([o, mlp], axis=-1)), m[:, 2])
        return x, {"concept": concept_aux, "attn": attn_aux}


class HunyuanVideoTransformer(nnx.Module):
    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs | None = None, runtime: Runtime = Runtime(), **kw):
        """`kw` overrides fields of `runtime` (dtype=..., param_dtype=..., attention=..., remat=...)."""
        cfg.validate()
        rt = dataclasses.replace(runtime, **kw)
        if rt.attention not in ATTENTION_IMPLS:
            raise UnlearnError(f"attention={rt.attention!r}: choose one of {ATTENTION_IMPLS}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.runtime = cfg, rt
        dim, pk = cfg.inner_dim, dict(param_dtype=rt.param_dtype, rngs=rngs)
        with nnx.use_eager_sharding(False):
            self.patch_proj = Dense(cfg.patch_numel, dim, ("patch", "embed"), dtype=rt.dtype, **pk)
            self.refiner = TokenRefiner(cfg, rt, rngs)
            # The modulation vector: time + guidance + pooled CLIP projection, in fp32.
            self.time_embed = TimeEmbedding(FREQ_DIM, dim, "freq", rt, rngs)
            self.guidance_embed = TimeEmbedding(FREQ_DIM, dim, "freq", rt, rngs) if cfg.guidance_embeds else None
            self.pooled_embed = TimeEmbedding(cfg.pooled_projection_dim, dim, "text_embed", rt, rngs)
            self.dual_blocks = _stack(cfg.num_layers, lambda r: DualBlock(cfg, rt, r), rngs)
            self.single_blocks = _stack(cfg.num_single_layers, lambda r: SingleBlock(cfg, rt, r), rngs)
            self.norm_out = _plain_norm(dim, rt, rngs)
            self.out_mod = Dense(dim, 2 * dim, ("temb", "adaln"), dtype=jnp.float32, **pk)
            self.proj_out = Dense(dim, cfg.out_dim * int(np.prod(cfg.patch)), ("embed", "out"), dtype=rt.dtype, **pk)

    # ---- shapes ------------------------------------------------------------------------------
    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(frames, grid_h, grid_w) of video tokens for latents of this size."""
        pt, ph, pw = self.config.patch
        return num_frames // pt, height // ph, width // pw

    def check_inputs(self, x_shape, cond_shapes: Mapping[str, tuple], timestep_shape=None):
        """One-line `UnlearnError`s for inputs the model cannot take (shapes only, no tracing).

        cond_shapes: the shape of each entry of the conditioning ("guidance" may be absent or None)."""
        cfg = self.config
        x_shape = tuple(x_shape)
        if len(x_shape) != 5:
            raise UnlearnError(f"hidden_states must be (batch, channels, frames, height, width), got shape {x_shape}")
        b, c, f, h, w = x_shape
        if c != cfg.in_channels:
            raise UnlearnError(f"hidden_states has {c} channels (axis 1), the model takes "
                               f"in_channels={cfg.in_channels}")
        for name, n, p in zip(("frames", "height", "width"), (f, h, w), cfg.patch):
            if n % p or n == 0:
                raise UnlearnError(f"latent {name} {n} must be a positive multiple of the patch {cfg.patch} (t, h, w)")
        missing = [k for k in COND_KEYS if cond_shapes.get(k) is None]
        if missing:
            raise UnlearnError(f"the conditioning lacks {missing}: it needs {list(COND_KEYS)} (and 'guidance' when "
                               "guidance_embeds)")
        text, mask, pooled = (tuple(cond_shapes[k]) for k in COND_KEYS)
        if len(text) != 3 or text[0] != b or text[2] != cfg.text_embed_dim or text[1] < 1:
            raise UnlearnError(f"encoder_hidden_states must be ({b}, text_len, {cfg.text_embed_dim}), got {text}")
        if mask != text[:2]:
            raise UnlearnError(f"encoder_attention_mask must be {text[:2]} (batch, text_len), got {mask}")
        if pooled != (b, cfg.pooled_projection_dim):
            raise UnlearnError(f"pooled_projections must be ({b}, {cfg.pooled_projection_dim}), got {pooled}")
        if cfg.guidance_embeds:
            g = cond_shapes.get("guidance")
            if g is None:
                raise UnlearnError("this model embeds the guidance scale (guidance_embeds): pass guidance "
                                   "(guidance_scale * 1000, one per batch row)")
            if tuple(g) not in ((), (1,), (b,)):
                raise UnlearnError(f"guidance must be a scalar or ({b},), got shape {tuple(g)}")
        if timestep_shape is not None and tuple(timestep_shape) not in ((), (1,), (b,)):
            raise UnlearnError(f"timestep must be a scalar or ({b},), got shape {tuple(timestep_shape)}")

    # ---- forward -----------------------------------------------------------------------------
    def embed(self, x, cond, timestep):
        """(video tokens (B, N, D), refined text (B, L, D), silu(modulation vector) (B, D) fp32, rope,
        joint key mask (B, N + L))."""
        cfg, rt = self.config, self.runtime
        b, c, f, h, w = x.shape
        pt, ph, pw = cfg.patch
        gf, gh, gw = self.token_grid(f, h, w)
        patches = x.astype(rt.dtype).reshape(b, c, gf, pt, gh, ph, gw, pw).transpose(0, 2, 4, 6, 1, 3, 5, 7)
        video = self.patch_proj(patches.reshape(b, gf * gh * gw, cfg.patch_numel))

        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        t_feats = timestep_embedding(t, FREQ_DIM, True, 0)
        vec = self.time_embed(t_feats)
        if self.guidance_embed is not None:
            g = jnp.broadcast_to(jnp.asarray(cond["guidance"], jnp.float32).reshape(-1), (b,))
            vec = vec + self.guidance_embed(timestep_embedding(g, FREQ_DIM, True, 0))
        vec = vec + self.pooled_embed(cond["pooled"])

        mask = jnp.asarray(cond["mask"])
        text = self.refiner(jnp.asarray(cond["text"]), mask, t_feats)
        cos, sin = rope_tables(cfg, gf, gh, gw)
        return video, text, jax.nn.silu(vec), (jnp.asarray(cos), jnp.asarray(sin)), key_mask(mask, video.shape[1])

    def run_dual_blocks(self, h, e, svec, rope, keys):
        """The dual-stream stack in one `lax.scan` -> (video tokens, text tokens)."""
        rt = self.runtime
        graphdef, state = nnx.split(self.dual_blocks)

        def body(carry, layer_state):
            hh, ee = carry
            hh = logical_constraint(hh, ("batch", "length", "embed"), rt.mesh, rt.rules)
            ee = logical_constraint(ee, ("batch", "length", "embed"), rt.mesh, rt.rules)
            return nnx.merge(graphdef, layer_state)(hh, ee, svec, rope, keys), None

        (h, e), _ = jax.lax.scan(remat(body, rt.remat), (h, e), state, unroll=rt.scan_unroll)
        return h, e

    def run_single_blocks(self, x, n_video: int, svec, rope, keys, hooks: Hooks | None = None, extras=None):
        """The single-stream stack (the erasers' stack) in one `lax.scan`; `extras` is a pytree with a leading
        layer axis fed to the hooks. Returns (joint sequence, per-layer aux of the hooks stacked)."""
        rt = self.runtime
        hooks = NO_HOOKS if hooks is None else hooks
        graphdef, state = nnx.split(self.single_blocks)

        def body(xx, xs):
            layer_state, extra = xs
            layer_state = hooks.layer(layer_state, extra, "attn")
            xx = logical_constraint(xx, ("batch", "length", "embed"), rt.mesh, rt.rules)
            return nnx.merge(graphdef, layer_state)(xx, svec, rope, n_video, keys, hooks, extra)

        return jax.lax.scan(remat(body, rt.remat), x, (state, extras), unroll=rt.scan_unroll)

    def head(self, h, svec, x_shape):
        """The final modulated norm and projection of the video tokens, unpatchified to (B, C_out, F, H, W)."""
        cfg = self.config
        b, _, f, hh, ww = x_shape
        pt, ph, pw = cfg.patch
        gf, gh, gw = self.token_grid(f, hh, ww)
        m = self.out_mod(svec).reshape(b, 2, -1)  # scale, then shift (AdaLayerNormContinuous)
        h = _modulate(self.norm_out, h, m[:, 1], m[:, 0])
        # each token's outputs are laid out (channels, pt, ph, pw)
        out = self.proj_out(h).reshape(b, gf, gh, gw, cfg.out_dim, pt, ph, pw)
        return out.transpose(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, cfg.out_dim, f, hh, ww)

    def forward(self, latents, cond, timestep, hooks: Hooks | None = None, extras=None):
        """The velocity (B, C_out, F, H, W), plus the per-layer aux of the hooks ({"concept": ..., "attn": ...},
        each None where that hook is absent), stacked over the single-stream layers (`models.hooks`).

        latents (B, C, F, H, W); cond: {"text", "mask", "pooled", "guidance"} (module docstring); timestep:
        scalar or (B,)."""
        self.check_inputs(latents.shape, _shapes(cond), jnp.shape(timestep))
        video, text, svec, rope, keys = self.embed(latents, cond, timestep)
        video, text = self.run_dual_blocks(video, text, svec, rope, keys)
        n_video = video.shape[1]
        x, aux = self.run_single_blocks(jnp.concatenate([video, text], axis=1), n_video, svec, rope, keys, hooks,
                                        extras)
        return self.head(x[:, :n_video], svec, latents.shape), aux

    def forward_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                       pooled_projections, guidance=None):
        """diffusers' call arguments (its order) -> (latents, conditioning, timestep) of `forward`, checked."""
        cond = {"text": encoder_hidden_states, "mask": encoder_attention_mask, "pooled": pooled_projections}
        if guidance is not None or not self.config.guidance_embeds:
            cond["guidance"] = guidance
        self.check_inputs(jnp.shape(hidden_states), _shapes(cond), jnp.shape(timestep))
        b = jnp.shape(hidden_states)[0]
        g = jnp.zeros((b,), jnp.float32) if guidance is None else jnp.asarray(guidance, jnp.float32)
        cond = {"text": jnp.asarray(encoder_hidden_states), "mask": jnp.asarray(encoder_attention_mask, jnp.int32),
                "pooled": jnp.asarray(pooled_projections), "guidance": jnp.broadcast_to(g.reshape(-1), (b,))}
        return jnp.asarray(hidden_states), cond, jnp.asarray(timestep)

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                 guidance=None):
        """diffusers' argument order -> velocity (B, C_out, F, H, W)."""
        x, cond, t = self.forward_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                         pooled_projections, guidance)
        graphdef, state = nnx.split(self)
        return jitted_forward(graphdef, state, x, cond, t)


def _shapes(cond) -> dict:
    if not isinstance(cond, Mapping):
        raise UnlearnError(f"the HunyuanVideo conditioning must be a dict with {list(COND_KEYS)} (+ 'guidance'), "
                           f"got {type(cond).__name__}")
    return {k: None if v is None else jnp.shape(v) for k, v in cond.items()}


# --------------------------------------------------------------------------------------------
# The weight-name rule table (diffusers <-> JAX), used in both directions
# --------------------------------------------------------------------------------------------
class _StackedRuleTable(RuleTable):
    """A rule table over stacks of different depths: a `{layer}` rule counts the layers of the stack its JAX
    path lies in (`depths`: JAX path prefix -> layers), not the table's one `num_layers`."""

    def __init__(self, rules, depths: Mapping[str, int], family: str):
        super().__init__(rules, max(depths.values()), family)
        self.depths = dict(depths)

    def _fits(self, e) -> bool:
        if e.layer is None:
            return True
        depth = next(d for prefix, d in self.depths.items() if e.jax_path.startswith(prefix))
        return e.layer < depth

    def match(self, torch_key: str):
        e = super().match(torch_key)
        return e if e is None or self._fits(e) else None

    def entries(self, jax_paths=None):
        return [e for e in super().entries(jax_paths) if self._fits(e)]


def rule_table(cfg: HunyuanVideoConfig) -> RuleTable:
    rules = []

    def dense(torch_name: str, jax_name: str):
        rules.append(Rule(f"{torch_name}.weight", f"{jax_name}.kernel", LINEAR))
        rules.append(Rule(f"{torch_name}.bias", f"{jax_name}.bias", IDENTITY))

    def embedder(torch_name: str, jax_name: str):
        dense(f"{torch_name}.linear_1", f"{jax_name}.linear_1")
        dense(f"{torch_name}.linear_2", f"{jax_name}.linear_2")

    rules.append(Rule("x_embedder.proj.weight", "patch_proj.kernel", flatten_in((cfg.in_channels, *cfg.patch))))
    rules.append(Rule("x_embedder.proj.bias", "patch_proj.bias"))

    ce = "context_embedder"
    embedder(f"{ce}.time_text_embed.timestep_embedder", "refiner.time_embed")
    embedder(f"{ce}.time_text_embed.text_embedder", "refiner.pooled_embed")
    dense(f"{ce}.proj_in", "refiner.proj_in")
    rb = f"{ce}.token_refiner.refiner_blocks.{{layer}}"
    for n in ("norm1", "norm2"):
        rules.append(Rule(f"{rb}.{n}.weight", f"refiner.blocks.{n}.scale"))
        rules.append(Rule(f"{rb}.{n}.bias", f"refiner.blocks.{n}.bias"))
    for n in ("to_q", "to_k", "to_v"):
        dense(f"{rb}.attn.{n}", f"refiner.blocks.attn.{n}")
    dense(f"{rb}.attn.to_out.0", "refiner.blocks.attn.to_out")
    dense(f"{rb}.ff.net.0.proj", "refiner.blocks.ff.proj_in")
    dense(f"{rb}.ff.net.2", "refiner.blocks.ff.proj_out")
    dense(f"{rb}.norm_out.linear", "refiner.blocks.norm_out")

    embedder("time_text_embed.timestep_embedder", "time_embed")
    if cfg.guidance_embeds:
        embedder("time_text_embed.guidance_embedder", "guidance_embed")
    embedder("time_text_embed.text_embedder", "pooled_embed")

    tb = "transformer_blocks.{layer}"
    dense(f"{tb}.norm1.linear", "dual_blocks.mod")
    dense(f"{tb}.norm1_context.linear", "dual_blocks.mod_context")
    for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        dense(f"{tb}.attn.{n}", f"dual_blocks.attn.{n}")
    dense(f"{tb}.attn.to_out.0", "dual_blocks.attn.to_out")
    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        rules.append(Rule(f"{tb}.attn.{n}.weight", f"dual_blocks.attn.{n}.scale"))
    for ff in ("ff", "ff_context"):
        dense(f"{tb}.{ff}.net.0.proj", f"dual_blocks.{ff}.proj_in")
        dense(f"{tb}.{ff}.net.2", f"dual_blocks.{ff}.proj_out")

    sb = "single_transformer_blocks.{layer}"
    dense(f"{sb}.norm.linear", "single_blocks.mod")
    for n in ("to_q", "to_k", "to_v"):
        dense(f"{sb}.attn.{n}", f"single_blocks.attn.{n}")
    for n in ("norm_q", "norm_k"):
        rules.append(Rule(f"{sb}.attn.{n}.weight", f"single_blocks.attn.{n}.scale"))
    dense(f"{sb}.proj_mlp", "single_blocks.proj_mlp")
    dense(f"{sb}.proj_out", "single_blocks.proj_out")

    dense("norm_out.linear", "out_mod")
    dense("proj_out", "proj_out")
    depths = {"refiner.blocks.": cfg.num_refiner_layers, "dual_blocks.": cfg.num_layers,
              "single_blocks.": cfg.num_single_layers}
    return _StackedRuleTable(rules, depths, family="HunyuanVideo transformer")


def abstract_model(cfg: HunyuanVideoConfig, **runtime) -> HunyuanVideoTransformer:
    """The model with shapes only (no memory), for planning loads and shardings."""
    return nnx.eval_shape(lambda: HunyuanVideoTransformer(cfg, rngs=nnx.Rngs(0), **runtime))
