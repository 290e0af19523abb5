"""CogVideoX transformer (diffusers' `CogVideoXTransformer3DModel`) in Flax NNX.

Covers every text-to-video configuration diffusers supports: CogVideoX-2B (sin-cos positions),
CogVideoX-5B (3D RoPE), CogVideoX1.5 (temporal patching, `patch_size_t`) and learned positional
embeddings. The blocks are one stacked module run with `jax.lax.scan` (one compiled block,
compile time independent of depth) under a configurable remat policy.

Called like diffusers' forward: `model(hidden_states (B, F, C, H, W), encoder_hidden_states
(B, L, D), timestep (B,))` -> velocity (B, F, C, H, W). `model.forward(x, cond, t, hooks, extras)` is
the family-neutral contract of `models.hooks` (CogVideoX's conditioning pytree is the prompt
embeddings array itself). Unlike diffusers' bare transformer, the
rotary embedding is computed here exactly as `CogVideoXPipeline` computes it, so the model alone
gives the pipeline's velocity.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from unlearn_jax.conversion import IDENTITY, LINEAR, Rule, RuleTable, flatten_in, squeeze_leading
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.jsonfiles import read_json_object
from unlearn_jax.models.hooks import NO_HOOKS, ConceptAttention, Hooks
from unlearn_jax.models.layers import (ATTENTION_IMPLS, Dense, LayerNorm, Runtime, attention, jitted_forward,
                                      logical_constraint, remat, timestep_embedding)

CLASS_NAME = "CogVideoXTransformer3DModel"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CogVideoXConfig:
    """The fields of diffusers' transformer `config.json` (same names, same defaults)."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def patch_numel(self) -> int:
        return self.in_channels * self.patch_size**2 * (self.patch_size_t or 1)

    @property
    def has_patch_bias(self) -> bool:
        # With temporal patching the patch projection is a Linear, which diffusers always gives a bias.
        return self.patch_bias or self.patch_size_t is not None

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "CogVideoXConfig":
        name = d.get("_class_name")
        if name is not None and name != CLASS_NAME:
            raise ModelFamilyError(f"{where}: holds a {name}, not a {CLASS_NAME} (CogVideoX transformer)")
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in fields})
        cfg.validate(where)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "CogVideoXConfig":
        return cls.from_dict(read_json_object(path, "transformer config"), str(path))

    def to_dict(self) -> dict:
        return {"_class_name": CLASS_NAME, **dataclasses.asdict(self)}

    def validate(self, where: str = "config"):
        if self.ofs_embed_dim:
            raise UnlearnError(f"{where}: ofs_embed_dim is set: image-to-video CogVideoX1.5 models are not supported")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise UnlearnError(f"{where}: learned positional embeddings without rotary embeddings exist in no "
                               "CogVideoX checkpoint (diffusers rejects this combination too)")
        if self.activation_fn not in ("gelu-approximate", "gelu"):
            raise UnlearnError(f"{where}: activation_fn {self.activation_fn!r} is not supported (gelu-approximate, gelu)")
        if self.timestep_activation_fn != "silu":
            raise UnlearnError(f"{where}: timestep_activation_fn {self.timestep_activation_fn!r} is not supported (silu)")
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 8:
            raise UnlearnError(f"{where}: attention_head_dim must be a multiple of 8 for the 3D rotary embedding")


# --------------------------------------------------------------------------------------------
# Fixed (non-learned) embeddings, computed on the host for static shapes
# --------------------------------------------------------------------------------------------
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    out = np.outer(pos.reshape(-1).astype(np.float64), 1.0 / 10000**omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_3d(dim: int, grid_w: int, grid_h: int, frames: int, s_scale: float, t_scale: float):
    """(frames * grid_h * grid_w, dim) fixed 3D sin-cos table, diffusers' `get_3d_sincos_pos_embed`."""
    d_s, d_t = 3 * dim // 4, dim // 4
    gh = np.arange(grid_h, dtype=np.float32) / s_scale
    gw = np.arange(grid_w, dtype=np.float32) / s_scale
    ww, hh = np.meshgrid(gw, gh, indexing="xy")  # (grid_h, grid_w) each
    spatial = np.concatenate([_sincos_1d(d_s // 2, ww), _sincos_1d(d_s // 2, hh)], axis=1)  # (H*W, d_s)
    temporal = _sincos_1d(d_t, np.arange(frames, dtype=np.float32) / t_scale)  # (T, d_t)
    spatial = np.broadcast_to(spatial[None], (frames,) + spatial.shape)
    temporal = np.broadcast_to(temporal[:, None], (frames, grid_h * grid_w, d_t))
    return np.concatenate([temporal, spatial], axis=-1).reshape(frames * grid_h * grid_w, dim)


def _crop_region(grid_h: int, grid_w: int, base_w: int, base_h: int):
    """The pipeline's `get_resize_crop_region_for_grid`: where the latent grid sits in the base grid."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rw, rh = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def _rope_1d(dim: int, pos: np.ndarray, theta: float = 10000.0):
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim))
    ang = np.outer(pos.astype(np.float32), freqs.astype(np.float32)).astype(np.float32)
    return np.repeat(np.cos(ang), 2, axis=1), np.repeat(np.sin(ang), 2, axis=1)


def rotary_embed_3d(cfg: CogVideoXConfig, frames: int, grid_h: int, grid_w: int):
    """(cos, sin), each (frames * grid_h * grid_w, head_dim), as `CogVideoXPipeline` prepares them.

    `frames`, `grid_h`, `grid_w` count tokens (after patching).
    """
    d = cfg.attention_head_dim
    d_t, d_hw = d // 4, d // 8 * 3
    if cfg.patch_size_t is None:
        (t0, l0), (t1, l1) = _crop_region(grid_h, grid_w, cfg.sample_width // cfg.patch_size,
                                          cfg.sample_height // cfg.patch_size)
        pos_h = np.linspace(t0, t1 * (grid_h - 1) / grid_h, grid_h)
        pos_w = np.linspace(l0, l1 * (grid_w - 1) / grid_w, grid_w)
        pos_t = np.linspace(0, frames * (frames - 1) / frames, frames)
    else:  # "slice" grid: plain integer positions
        pos_h, pos_w, pos_t = np.arange(grid_h), np.arange(grid_w), np.arange(frames)
    parts = [_rope_1d(d_t, pos_t), _rope_1d(d_hw, pos_h), _rope_1d(d_hw, pos_w)]
    out = []
    for k in range(2):
        t, h, w = (p[k] for p in parts)
        full = np.concatenate([
            np.broadcast_to(t[:, None, None], (frames, grid_h, grid_w, d_t)),
            np.broadcast_to(h[None, :, None], (frames, grid_h, grid_w, d_hw)),
            np.broadcast_to(w[None, None, :], (frames, grid_h, grid_w, d_hw)),
        ], axis=-1)
        out.append(full.reshape(frames * grid_h * grid_w, d).astype(np.float32))
    return tuple(out)


def apply_rope(x, cos, sin):
    """Rotates interleaved pairs of x (B, S, N, H) by the angles of cos/sin (S, H), in fp32."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class AdaNormZero(nnx.Module):
    """CogVideoXLayerNormZero: shared LayerNorm, separate shift/scale/gate for video and text tokens."""

    def __init__(self, cfg: CogVideoXConfig, rt: Runtime, rngs: nnx.Rngs):
        self.linear = Dense(cfg.time_embed_dim, 6 * cfg.inner_dim, ("temb", "adaln"), dtype=jnp.float32,
                            param_dtype=rt.param_dtype, rngs=rngs)
        self.norm = LayerNorm(cfg.inner_dim, cfg.norm_eps, affine=cfg.norm_elementwise_affine,
                              param_dtype=rt.param_dtype, rngs=rngs)

    def __call__(self, h, e, temb):
        mod = self.linear(jax.nn.silu(temb.astype(jnp.float32)))
        shift, scale, gate, e_shift, e_scale, e_gate = jnp.split(mod[:, None, :], 6, axis=-1)
        nh = (self.norm(h).astype(jnp.float32) * (1 + scale) + shift).astype(h.dtype)
        ne = (self.norm(e).astype(jnp.float32) * (1 + e_scale) + e_shift).astype(e.dtype)
        return nh, ne, gate, e_gate


class JointAttention(nnx.Module):
    """Self-attention over [text; video] tokens with per-head QK LayerNorm and RoPE on video tokens."""

    def __init__(self, cfg: CogVideoXConfig, rt: Runtime, rngs: nnx.Rngs):
        dim, kw = cfg.inner_dim, dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.heads, self.head_dim, self.impl = cfg.num_attention_heads, cfg.attention_head_dim, rt.attention
        self.chunk = rt.attention_chunk
        self.to_q = Dense(dim, dim, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.to_k = Dense(dim, dim, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.to_v = Dense(dim, dim, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.norm_q = LayerNorm(cfg.attention_head_dim, 1e-6, axis_name="kv", param_dtype=rt.param_dtype, rngs=rngs)
        self.norm_k = LayerNorm(cfg.attention_head_dim, 1e-6, axis_name="kv", param_dtype=rt.param_dtype, rngs=rngs)
        self.to_out = Dense(dim, dim, ("heads", "embed"), **kw)

    def project_qk(self, x):
        """Query and key over the joint sequence, before QK norm and RoPE: (B, S, N, H) each."""
        split = lambda y: y.reshape(*y.shape[:2], self.heads, self.head_dim)  # noqa: E731
        return split(self.to_q(x)), split(self.to_k(x))

    def __call__(self, x, text_len: int, rope, concept_hook=None):
        q, k = self.project_qk(x)
        # The localization mask reads q and k before the QK norm and RoPE (the method's specification).
        concept_aux = None if concept_hook is None else concept_hook(
            ConceptAttention(q[:, text_len:], k, text_start=0, text_len=text_len))
        v = self.to_v(x).reshape(*x.shape[:2], self.heads, self.head_dim)
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            cos, sin = rope
            q = jnp.concatenate([q[:, :text_len], apply_rope(q[:, text_len:], cos, sin)], axis=1)
            k = jnp.concatenate([k[:, :text_len], apply_rope(k[:, text_len:], cos, sin)], axis=1)
        o = attention(q, k, v, self.impl, self.chunk)
        o = checkpoint_name(o, "attn_out")
        return self.to_out(o.reshape(*x.shape[:2], -1)), concept_aux


class FeedForward(nnx.Module):
    def __init__(self, cfg: CogVideoXConfig, rt: Runtime, rngs: nnx.Rngs):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.proj_in = Dense(cfg.inner_dim, 4 * cfg.inner_dim, ("embed", "mlp"), **kw)
        self.proj_out = Dense(4 * cfg.inner_dim, cfg.inner_dim, ("mlp", "embed"), **kw)
        self.approximate = cfg.activation_fn == "gelu-approximate"

    def __call__(self, x):
        h = self.proj_in(x)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=self.approximate).astype(x.dtype)
        return self.proj_out(h)


class Block(nnx.Module):
    """One CogVideoXBlock (diffusers' layout: gated attention residual, then gated feed-forward)."""

    def __init__(self, cfg: CogVideoXConfig, rt: Runtime, rngs: nnx.Rngs):
        self.norm1 = AdaNormZero(cfg, rt, rngs)
        self.attn1 = JointAttention(cfg, rt, rngs)
        self.norm2 = AdaNormZero(cfg, rt, rngs)
        self.ff = FeedForward(cfg, rt, rngs)

    def __call__(self, h, e, temb, rope, hooks: Hooks = NO_HOOKS, extra=None):
        text_len = e.shape[1]
        concept_hook = None
        if hooks.on_concept_attention is not None:
            concept_hook = lambda view: hooks.concept(view, extra)  # noqa: E731
        nh, ne, gate, e_gate = self.norm1(h, e, temb)
        a, concept_aux = self.attn1(jnp.concatenate([ne, nh], axis=1), text_len, rope, concept_hook)
        a_e, a_h = a[:, :text_len], a[:, text_len:]
        a_h, attn_aux = hooks.video_attn(a_h, extra)
        h = (h + gate * a_h).astype(h.dtype)
        e = (e + e_gate * a_e).astype(e.dtype)
        nh, ne, gate, e_gate = self.norm2(h, e, temb)
        f = self.ff(jnp.concatenate([ne, nh], axis=1))
        h = (h + gate * f[:, text_len:]).astype(h.dtype)
        e = (e + e_gate * f[:, :text_len]).astype(e.dtype)
        return h, e, {"concept": concept_aux, "attn": attn_aux}


class CogVideoXTransformer(nnx.Module):
    def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs | None = None, runtime: Runtime = Runtime(), **kw):
        """`kw` overrides fields of `runtime` (dtype=..., param_dtype=..., attention=..., remat=...)."""
        rt = dataclasses.replace(runtime, **kw)
        if rt.attention not in ATTENTION_IMPLS:
            raise UnlearnError(f"attention={rt.attention!r}: choose one of {ATTENTION_IMPLS}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.runtime = cfg, rt
        dim, pk = cfg.inner_dim, dict(param_dtype=rt.param_dtype, rngs=rngs)
        with nnx.use_eager_sharding(False):
            self.patch_proj = Dense(cfg.patch_numel, dim, ("patch", "embed"), use_bias=cfg.has_patch_bias,
                                    dtype=rt.dtype, **pk)
            self.text_proj = Dense(cfg.text_embed_dim, dim, ("text_embed", "embed"), dtype=rt.dtype, **pk)
            if cfg.use_learned_positional_embeddings:
                n = cfg.max_text_seq_length + self._num_patches(cfg.sample_frames, cfg.sample_height, cfg.sample_width)
                self.pos_embedding = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("pos", "embed"))(
                    rngs.params(), (n, dim), rt.param_dtype))
            else:
                self.pos_embedding = None
            self.time_linear_1 = Dense(dim, cfg.time_embed_dim, ("freq", "temb"), dtype=jnp.float32, **pk)
            self.time_linear_2 = Dense(cfg.time_embed_dim, cfg.time_embed_dim, ("temb", "temb"), dtype=jnp.float32, **pk)

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return Block(cfg, rt, r)

            self.blocks = make_blocks(rngs)
            self.norm_final = LayerNorm(dim, cfg.norm_eps, affine=cfg.norm_elementwise_affine, **pk)
            self.norm_out_linear = Dense(cfg.time_embed_dim, 2 * dim, ("temb", "adaln"), dtype=jnp.float32, **pk)
            self.norm_out = LayerNorm(dim, cfg.norm_eps, affine=cfg.norm_elementwise_affine, **pk)
            out = cfg.patch_size**2 * (cfg.patch_size_t or 1) * cfg.out_dim
            self.proj_out = Dense(dim, out, ("embed", "out"), dtype=rt.dtype, **pk)

    # ---- shapes ------------------------------------------------------------------------------
    def _num_patches(self, sample_frames: int, height: int, width: int) -> int:
        cfg = self.config
        frames = (sample_frames - 1) // cfg.temporal_compression_ratio + 1
        return (height // cfg.patch_size) * (width // cfg.patch_size) * frames

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(frames, grid_h, grid_w) of video tokens for latents of this size."""
        cfg = self.config
        return num_frames // (cfg.patch_size_t or 1), height // cfg.patch_size, width // cfg.patch_size

    def check_inputs(self, x_shape, ctx_shape):
        cfg = self.config
        if len(x_shape) != 5:
            raise UnlearnError(f"hidden_states must be (batch, frames, channels, height, width), got shape {x_shape}")
        b, f, c, h, w = x_shape
        if c != cfg.in_channels:
            raise UnlearnError(f"hidden_states has {c} channels, the model takes in_channels={cfg.in_channels}")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise UnlearnError(f"latent height/width {h}x{w} must be multiples of patch_size={cfg.patch_size}")
        if cfg.patch_size_t and f % cfg.patch_size_t:
            raise UnlearnError(f"{f} latent frames: must be a multiple of patch_size_t={cfg.patch_size_t} "
                               "(the pipeline pads the latents)")
        if len(ctx_shape) != 3 or ctx_shape[0] != b or ctx_shape[2] != cfg.text_embed_dim:
            raise UnlearnError(f"encoder_hidden_states must be ({b}, text_len, {cfg.text_embed_dim}), got {ctx_shape}")
        fixed_text = not cfg.use_rotary_positional_embeddings or self.pos_embedding is not None
        if fixed_text and ctx_shape[1] != cfg.max_text_seq_length:
            raise UnlearnError(f"this model adds positions over max_text_seq_length={cfg.max_text_seq_length} "
                               f"text tokens; got {ctx_shape[1]} (pad the prompt embeddings to that length)")
        if self.pos_embedding is not None and (h != cfg.sample_height or w != cfg.sample_width):
            raise UnlearnError(f"learned positional embeddings fix the latent size to {cfg.sample_height}x"
                               f"{cfg.sample_width}; got {h}x{w}")

    def positional_table(self, text_len: int, f: int, h: int, w: int):
        """The additive position table over [text; video] tokens, or None for RoPE-only models."""
        cfg = self.config
        if not cfg.use_rotary_positional_embeddings or self.pos_embedding is not None:
            pre_frames = (f - 1) * cfg.temporal_compression_ratio + 1
            if self.pos_embedding is not None and pre_frames == cfg.sample_frames:
                return self.pos_embedding[...]
            # Fixed table; diffusers also falls back to it for learned tables at another frame count.
            table = sincos_pos_embed_3d(cfg.inner_dim, w // cfg.patch_size, h // cfg.patch_size, f,
                                        cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale)
            return jnp.asarray(np.concatenate([np.zeros((text_len, cfg.inner_dim)), table]), jnp.float32)
        return None

    # ---- forward -----------------------------------------------------------------------------
    def embed(self, x, ctx, timestep):
        """Patch/text embedding and time embedding: returns (video tokens, text tokens, temb, rope)."""
        cfg, rt = self.config, self.runtime
        b, f, c, h, w = x.shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        t = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        temb = timestep_embedding(t, cfg.inner_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_linear_2(jax.nn.silu(self.time_linear_1(temb.astype(rt.dtype))))
        x = x.astype(rt.dtype)
        if pt is None:
            patches = x.reshape(b, f, c, h // p, p, w // p, p).transpose(0, 1, 3, 5, 2, 4, 6)
        else:
            patches = x.reshape(b, f // pt, pt, c, h // p, p, w // p, p).transpose(0, 1, 4, 6, 3, 2, 5, 7)
        video = self.patch_proj(patches.reshape(b, -1, cfg.patch_numel))
        text = self.text_proj(ctx.astype(rt.dtype))
        table = self.positional_table(text.shape[1], f, h, w)
        if table is not None:
            table = table.astype(rt.dtype)
            text, video = text + table[None, : text.shape[1]], video + table[None, text.shape[1]:]
        rope = None
        if cfg.use_rotary_positional_embeddings:
            cos, sin = rotary_embed_3d(cfg, *self.token_grid(f, h, w))
            rope = (jnp.asarray(cos), jnp.asarray(sin))
        return video, text, temb, rope

    def run_blocks(self, h, e, temb, rope, hooks: Hooks | None = None, extras=None):
        """All blocks in one `lax.scan`; `extras` is a pytree with a leading layer axis fed to the hooks.

        Returns (video tokens, text tokens, per-layer aux of the hooks stacked on a leading axis)."""
        rt = self.runtime
        hooks = NO_HOOKS if hooks is None else hooks
        graphdef, state = nnx.split(self.blocks)

        def body(carry, xs):
            layer_state, extra = xs
            layer_state = hooks.layer(layer_state, extra, "attn1")
            block = nnx.merge(graphdef, layer_state)
            hh, ee = carry
            hh = logical_constraint(hh, ("batch", "length", "embed"), rt.mesh, rt.rules)
            hh, ee, aux = block(hh, ee, temb, rope, hooks, extra)
            return (hh, ee), aux

        (h, e), aux = jax.lax.scan(remat(body, rt.remat), (h, e), (state, extras), unroll=rt.scan_unroll)
        return h, e, aux

    def head(self, h, temb, x_shape):
        cfg = self.config
        b, f, c, hh, ww = x_shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        h = self.norm_final(h)
        shift, scale = jnp.split(self.norm_out_linear(jax.nn.silu(temb.astype(jnp.float32)))[:, None], 2, axis=-1)
        h = (self.norm_out(h).astype(jnp.float32) * (1 + scale) + shift).astype(h.dtype)
        out = self.proj_out(h)
        co = cfg.out_dim
        if pt is None:
            out = out.reshape(b, f, hh // p, ww // p, co, p, p).transpose(0, 1, 4, 2, 5, 3, 6)
            return out.reshape(b, f, co, hh, ww)
        out = out.reshape(b, f // pt, hh // p, ww // p, co, pt, p, p).transpose(0, 1, 5, 4, 2, 6, 3, 7)
        return out.reshape(b, f, co, hh, ww)

    def forward(self, hidden_states, encoder_hidden_states, timestep, hooks: Hooks | None = None, extras=None):
        """The velocity, plus the per-layer aux of the hooks ({"concept": ..., "attn": ...}, each None
        where that hook is absent), stacked over layers (the contract of `models.hooks`)."""
        self.check_inputs(hidden_states.shape, encoder_hidden_states.shape)
        video, text, temb, rope = self.embed(hidden_states, encoder_hidden_states, timestep)
        video, text, aux = self.run_blocks(video, text, temb, rope, hooks, extras)
        return self.head(video, temb, hidden_states.shape), aux

    def forward_inputs(self, hidden_states, encoder_hidden_states, timestep):
        """diffusers' call arguments -> (latents, conditioning pytree, timestep) of `forward`, checked."""
        self.check_inputs(jnp.shape(hidden_states), jnp.shape(encoder_hidden_states))
        return jnp.asarray(hidden_states), jnp.asarray(encoder_hidden_states), jnp.asarray(timestep)

    def __call__(self, hidden_states, encoder_hidden_states, timestep):
        """diffusers-style forward: (B, F, C, H, W), (B, L, D), (B,) or scalar -> velocity (B, F, C, H, W)."""
        x, cond, t = self.forward_inputs(hidden_states, encoder_hidden_states, timestep)
        graphdef, state = nnx.split(self)
        return jitted_forward(graphdef, state, x, cond, t)




# --------------------------------------------------------------------------------------------
# The weight-name rule table (diffusers <-> JAX), used in both directions
# --------------------------------------------------------------------------------------------
def rule_table(cfg: CogVideoXConfig) -> RuleTable:
    B = "transformer_blocks.{layer}."
    rules = []

    def dense(torch_name: str, jax_name: str, bias: bool = True, stacked: bool = False):
        pre = B if stacked else ""
        jpre = "blocks." if stacked else ""
        rules.append(Rule(f"{pre}{torch_name}.weight", f"{jpre}{jax_name}.kernel", LINEAR))
        if bias:
            rules.append(Rule(f"{pre}{torch_name}.bias", f"{jpre}{jax_name}.bias", IDENTITY))

    def norm(torch_name: str, jax_name: str, stacked: bool = False, affine: bool = True):
        if affine:
            pre, jpre = (B, "blocks.") if stacked else ("", "")
            rules.append(Rule(f"{pre}{torch_name}.weight", f"{jpre}{jax_name}.scale", IDENTITY))
            rules.append(Rule(f"{pre}{torch_name}.bias", f"{jpre}{jax_name}.bias", IDENTITY))

    affine = cfg.norm_elementwise_affine
    if cfg.patch_size_t is None:
        patch = flatten_in((cfg.in_channels, cfg.patch_size, cfg.patch_size))
    else:
        patch = LINEAR
    rules.append(Rule("patch_embed.proj.weight", "patch_proj.kernel", patch))
    if cfg.has_patch_bias:
        rules.append(Rule("patch_embed.proj.bias", "patch_proj.bias"))
    dense("patch_embed.text_proj", "text_proj")
    if cfg.use_learned_positional_embeddings:
        rules.append(Rule("patch_embed.pos_embedding", "pos_embedding", squeeze_leading(1)))
    dense("time_embedding.linear_1", "time_linear_1")
    dense("time_embedding.linear_2", "time_linear_2")
    for n in ("norm1", "norm2"):
        dense(f"{n}.linear", f"{n}.linear", stacked=True)
        norm(f"{n}.norm", f"{n}.norm", stacked=True, affine=affine)
    for n in ("to_q", "to_k", "to_v"):
        dense(f"attn1.{n}", f"attn1.{n}", bias=cfg.attention_bias, stacked=True)
    norm("attn1.norm_q", "attn1.norm_q", stacked=True)
    norm("attn1.norm_k", "attn1.norm_k", stacked=True)
    dense("attn1.to_out.0", "attn1.to_out", stacked=True)
    dense("ff.net.0.proj", "ff.proj_in", stacked=True)
    dense("ff.net.2", "ff.proj_out", stacked=True)
    norm("norm_final", "norm_final", affine=affine)
    dense("norm_out.linear", "norm_out_linear")
    norm("norm_out.norm", "norm_out", affine=affine)
    dense("proj_out", "proj_out")
    return RuleTable(rules, cfg.num_layers, family="CogVideoX transformer")


def abstract_model(cfg: CogVideoXConfig, **runtime) -> CogVideoXTransformer:
    """The model with shapes only (no memory), for planning loads and shardings."""
    return nnx.eval_shape(lambda: CogVideoXTransformer(cfg, rngs=nnx.Rngs(0), **runtime))
