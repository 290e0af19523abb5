"""Wan transformer (diffusers' `WanTransformer3DModel`, text-to-video) in Flax NNX.

Covers every text-to-video configuration: Wan 2.1 T2V-1.3B / 14B, Wan 2.2 TI2V-5B (48 latent
channels, per-token timesteps) and each expert of Wan 2.2 T2V-A14B (one transformer each; the
switch between the two experts belongs to the sampler). Image conditioning (`image_dim`,
`added_kv_proj_dim`) is refused.

Block layout (as diffusers): per-block `scale_shift_table` + time projection give six
modulations; [LayerNorm -> modulate -> self-attention `attn1` (RMS norm of q/k across heads,
3D RoPE) -> gated residual], [optional affine LayerNorm `norm2` -> cross-attention `attn2` over
the text -> residual], [LayerNorm -> modulate -> gelu-tanh FFN -> gated residual]. The blocks
are one stacked module run with one `jax.lax.scan` under a remat policy.

Called like diffusers' forward: `model(hidden_states (B, C, F, H, W), timestep (B,) | (B, S) |
scalar, encoder_hidden_states (B, L, text_dim))` -> velocity (B, C_out, F, H, W). The model
attends over all L text positions (WanPipeline zero-pads the prompt embeddings to 512; no mask).
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

CLASS_NAME = "WanTransformer3DModel"
ROPE_THETA = 10000.0

__all__ = ["CLASS_NAME", "Runtime", "WanConfig", "WanTransformer", "abstract_model", "rope_tables", "rule_table"]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WanConfig:
    """The fields of diffusers' `WanTransformer3DModel` config.json (same names, same defaults)."""

    patch_size: tuple = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        # JSON gives a list; the config is a static (hashed) part of the module graph.
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch_numel(self) -> int:
        return self.in_channels * int(np.prod(self.patch_size))

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim split of the 3D RoPE between frames, height and width (WanRotaryPosEmbed)."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "WanConfig":
        name = d.get("_class_name")
        if name is not None and name != CLASS_NAME:
            raise ModelFamilyError(f"{where}: holds a {name}, not a {CLASS_NAME} (Wan transformer)")
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in fields})
        cfg.validate(where)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "WanConfig":
        return cls.from_dict(read_json_object(path, "transformer config"), str(path))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return {"_class_name": CLASS_NAME, **d}

    def validate(self, where: str = "config"):
        if self.image_dim is not None or self.added_kv_proj_dim is not None:
            raise UnlearnError(f"{where}: image_dim / added_kv_proj_dim is set: image-to-video Wan models "
                               "(image-embedding cross-attention) are not supported")
        p = self.patch_size
        if not (isinstance(p, tuple) and len(p) == 3 and all(isinstance(v, int) and v > 0 for v in p)):
            raise UnlearnError(f"{where}: patch_size {p!r} must be three positive integers (t, h, w)")
        if self.qk_norm != "rms_norm_across_heads":
            raise UnlearnError(f"{where}: qk_norm {self.qk_norm!r} is not supported (rms_norm_across_heads)")
        if self.attention_head_dim % 2:
            raise UnlearnError(f"{where}: attention_head_dim {self.attention_head_dim} must be even (3D RoPE)")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim",
                     "ffn_dim", "num_layers", "rope_max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise UnlearnError(f"{where}: {name} = {v!r} must be a positive integer")
        if self.freq_dim % 2:
            raise UnlearnError(f"{where}: freq_dim {self.freq_dim} must be even")


# --------------------------------------------------------------------------------------------
# 3D rotary embedding, computed on the host for static shapes
# --------------------------------------------------------------------------------------------
def _rope_1d(dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    # float64 angles cast to float32, as WanRotaryPosEmbed builds its buffers (off MPS).
    freqs = 1.0 / (ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    ang = np.outer(np.arange(n, dtype=np.float64), freqs)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope_tables(cfg: WanConfig, frames: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (frames * grid_h * grid_w, head_dim // 2): one angle per rotated pair.

    `frames`, `grid_h`, `grid_w` count tokens (after patching); the pair order is [frame; height;
    width] parts of the head, as diffusers' `freqs_cos[..., 0::2]`."""
    grid = (frames, grid_h, grid_w)
    parts = [_rope_1d(d, n) for d, n in zip(cfg.rope_dims, grid)]
    out = []
    for k in range(2):
        t, h, w = (p[k] for p in parts)
        full = np.concatenate([
            np.broadcast_to(t[:, None, None], grid + t.shape[-1:]),
            np.broadcast_to(h[None, :, None], grid + h.shape[-1:]),
            np.broadcast_to(w[None, None, :], grid + w.shape[-1:]),
        ], axis=-1)
        out.append(np.ascontiguousarray(full.reshape(frames * grid_h * grid_w, -1)))
    return tuple(out)


def apply_rope(x, cos, sin):
    """Rotates interleaved pairs (x[2i], x[2i+1]) of x (B, S, N, H) by cos/sin (S, H/2), in fp32."""
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[None, :, None], sin[None, :, None]
    return jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(xf.shape).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
def _param(init, axes, shape, dtype, rngs):
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    """torch.nn.RMSNorm over the last axis (all heads together), computed in fp32."""

    def __init__(self, dim: int, eps: float, axis_name: str, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(nnx.initializers.ones_init(), (axis_name,), (dim,), param_dtype, rngs)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """WanAttention: q from the video tokens, k/v from `context` (itself for self-attention)."""

    def __init__(self, cfg: WanConfig, rt: Runtime, rngs: nnx.Rngs):
        dim, kw = cfg.inner_dim, dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.heads, self.head_dim, self.impl, self.chunk = (cfg.num_attention_heads, cfg.attention_head_dim,
                                                            rt.attention, rt.attention_chunk)
        self.to_q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_v = Dense(dim, dim, ("embed", "heads"), **kw)
        self.norm_q = RMSNorm(dim, cfg.eps, "heads", param_dtype=rt.param_dtype, rngs=rngs)
        self.norm_k = RMSNorm(dim, cfg.eps, "heads", param_dtype=rt.param_dtype, rngs=rngs)
        self.to_out = Dense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x, context=None, rope=None, concept_hook=None):
        context = x if context is None else context
        split = lambda y: y.reshape(*y.shape[:2], self.heads, self.head_dim)  # noqa: E731
        q = split(self.norm_q(self.to_q(x)))
        k = split(self.norm_k(self.to_k(context)))
        v = split(self.to_v(context))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # The concept hook sees the q/k whose softmax the model computes (after norm_q / norm_k).
        concept_aux = None if concept_hook is None else concept_hook(
            ConceptAttention(video_queries=q, keys=k, text_start=0, text_len=k.shape[1], key_mask=None))
        o = attention(q, k, v, self.impl, self.chunk)
        o = checkpoint_name(o, "attn_out")
        return self.to_out(o.reshape(*x.shape[:2], -1)), concept_aux


class FeedForward(nnx.Module):
    def __init__(self, cfg: WanConfig, rt: Runtime, rngs: nnx.Rngs):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.proj_in = Dense(cfg.inner_dim, cfg.ffn_dim, ("embed", "mlp"), **kw)
        self.proj_out = Dense(cfg.ffn_dim, cfg.inner_dim, ("mlp", "embed"), **kw)

    def __call__(self, x):
        h = self.proj_in(x)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(x.dtype)
        return self.proj_out(h)


def _no_affine_norm(cfg: WanConfig, rt: Runtime, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(cfg.inner_dim, cfg.eps, affine=False, param_dtype=rt.param_dtype, rngs=rngs)


class Block(nnx.Module):
    """One WanTransformerBlock."""

    def __init__(self, cfg: WanConfig, rt: Runtime, rngs: nnx.Rngs):
        dim = cfg.inner_dim
        self.norm1 = _no_affine_norm(cfg, rt, rngs)
        self.attn1 = Attention(cfg, rt, rngs)
        self.norm2 = (LayerNorm(dim, cfg.eps, affine=True, param_dtype=rt.param_dtype, rngs=rngs)
                      if cfg.cross_attn_norm else None)
        self.attn2 = Attention(cfg, rt, rngs)
        self.norm3 = _no_affine_norm(cfg, rt, rngs)
        self.ffn = FeedForward(cfg, rt, rngs)
        self.scale_shift_table = _param(nnx.initializers.normal(dim**-0.5), (None, "norm"), (6, dim),
                                        rt.param_dtype, rngs)

    def __call__(self, h, context, tproj, rope, hooks: Hooks = NO_HOOKS, extra=None):
        """h (B, S, D); context (B, L, D) embedded text; tproj (B, S or 1, 6, D) fp32 time projection."""
        f32, dt = jnp.float32, h.dtype
        mod = self.scale_shift_table[...].astype(f32) + tproj
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))
        n = (self.norm1(h.astype(f32)) * (1 + scale) + shift).astype(dt)
        a, _ = self.attn1(n, rope=rope)
        a, attn_aux = hooks.video_attn(a, extra)
        h = (h.astype(f32) + a.astype(f32) * gate).astype(dt)

        n = h if self.norm2 is None else self.norm2(h.astype(f32)).astype(dt)
        concept_hook = None
        if hooks.on_concept_attention is not None:
            concept_hook = lambda view: hooks.concept(view, extra)  # noqa: E731
        a, concept_aux = self.attn2(n, context, concept_hook=concept_hook)
        h = h + a.astype(dt)

        n = (self.norm3(h.astype(f32)) * (1 + c_scale) + c_shift).astype(dt)
        h = (h.astype(f32) + self.ffn(n).astype(f32) * c_gate).astype(dt)
        return h, {"concept": concept_aux, "attn": attn_aux}


class WanTransformer(nnx.Module):
    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs | None = None, runtime: Runtime = Runtime(), **kw):
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
            # Time embedding and modulation in fp32 (diffusers keeps time_embedder in fp32).
            self.time_linear_1 = Dense(cfg.freq_dim, dim, ("freq", "temb"), dtype=jnp.float32, **pk)
            self.time_linear_2 = Dense(dim, dim, ("temb", "temb"), dtype=jnp.float32, **pk)
            self.time_proj = Dense(dim, 6 * dim, ("temb", "adaln"), dtype=jnp.float32, **pk)
            self.text_linear_1 = Dense(cfg.text_dim, dim, ("text_embed", "embed"), dtype=rt.dtype, **pk)
            self.text_linear_2 = Dense(dim, dim, ("embed", "embed"), dtype=rt.dtype, **pk)

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return Block(cfg, rt, r)

            self.blocks = make_blocks(rngs)
            self.norm_out = _no_affine_norm(cfg, rt, rngs)
            self.scale_shift_table = _param(nnx.initializers.normal(dim**-0.5), (None, "norm"), (2, dim),
                                            rt.param_dtype, rngs)
            self.proj_out = Dense(dim, cfg.out_dim * int(np.prod(cfg.patch_size)), ("embed", "out"),
                                  dtype=rt.dtype, **pk)

    # ---- shapes ------------------------------------------------------------------------------
    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(frames, grid_h, grid_w) of video tokens for latents of this size."""
        pt, ph, pw = self.config.patch_size
        return num_frames // pt, height // ph, width // pw

    def check_inputs(self, x_shape, cond_shape, timestep_shape=None):
        """One-line `UnlearnError`s for inputs the model cannot take (shapes only, no tracing)."""
        cfg = self.config
        x_shape, cond_shape = tuple(x_shape), tuple(cond_shape)
        if len(x_shape) != 5:
            raise UnlearnError(f"hidden_states must be (batch, channels, frames, height, width), got shape {x_shape}")
        b, c, f, h, w = x_shape
        if c != cfg.in_channels:
            raise UnlearnError(f"hidden_states has {c} channels (axis 1), the model takes "
                               f"in_channels={cfg.in_channels}")
        for name, n, p in zip(("frames", "height", "width"), (f, h, w), cfg.patch_size):
            if n % p or n == 0:
                raise UnlearnError(f"latent {name} {n} must be a positive multiple of patch_size {cfg.patch_size}")
        grid = self.token_grid(f, h, w)
        if max(grid) > cfg.rope_max_seq_len:
            raise UnlearnError(f"token grid {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len} positions")
        if len(cond_shape) != 3 or cond_shape[0] != b or cond_shape[2] != cfg.text_dim or cond_shape[1] < 1:
            raise UnlearnError(f"encoder_hidden_states must be ({b}, text_len, {cfg.text_dim}), got {cond_shape}")
        if timestep_shape is not None:
            t = tuple(timestep_shape)
            tokens = int(np.prod(grid))
            if t not in ((), (b,), (1,), (b, tokens)):
                raise UnlearnError(f"timestep must be a scalar, ({b},) or per token ({b}, {tokens}); got shape {t}")

    # ---- forward -----------------------------------------------------------------------------
    def embed(self, x, ctx, timestep):
        """Patch, text and time embeddings: (video tokens, text tokens, temb (B, S|1, D),
        time projection (B, S|1, 6, D), rope)."""
        cfg, rt = self.config, self.runtime
        b, c, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        gf, gh, gw = self.token_grid(f, h, w)
        patches = x.astype(rt.dtype).reshape(b, c, gf, pt, gh, ph, gw, pw).transpose(0, 2, 4, 6, 1, 3, 5, 7)
        video = self.patch_proj(patches.reshape(b, gf * gh * gw, cfg.patch_numel))

        t = jnp.asarray(timestep)
        t = t if t.ndim == 2 else jnp.broadcast_to(t.reshape(-1), (b,))[:, None]  # (B, S) or (B, 1)
        feats = timestep_embedding(t.reshape(-1), cfg.freq_dim, True, 0).reshape(b, t.shape[1], cfg.freq_dim)
        temb = self.time_linear_2(jax.nn.silu(self.time_linear_1(feats)))
        tproj = self.time_proj(jax.nn.silu(temb)).reshape(b, t.shape[1], 6, cfg.inner_dim)

        text = self.text_linear_1(ctx.astype(rt.dtype))
        text = self.text_linear_2(jax.nn.gelu(text.astype(jnp.float32), approximate=True).astype(rt.dtype))
        cos, sin = rope_tables(cfg, gf, gh, gw)
        return video, text, temb, tproj, (jnp.asarray(cos), jnp.asarray(sin))

    def run_blocks(self, h, text, tproj, rope, hooks: Hooks | None = None, extras=None):
        """All blocks in one `lax.scan`; `extras` is a pytree with a leading layer axis fed to the hooks.

        Returns (video tokens, per-layer aux of the hooks stacked on a leading axis)."""
        rt = self.runtime
        hooks = NO_HOOKS if hooks is None else hooks
        graphdef, state = nnx.split(self.blocks)

        def body(hh, xs):
            layer_state, extra = xs
            layer_state = hooks.layer(layer_state, extra, "attn1")
            block = nnx.merge(graphdef, layer_state)
            hh = logical_constraint(hh, ("batch", "length", "embed"), rt.mesh, rt.rules)
            return block(hh, text, tproj, rope, hooks, extra)

        h, aux = jax.lax.scan(remat(body, rt.remat), h, (state, extras), unroll=rt.scan_unroll)
        return h, aux

    def head(self, h, temb, x_shape):
        cfg = self.config
        b, _, f, hh, ww = x_shape
        pt, ph, pw = cfg.patch_size
        gf, gh, gw = self.token_grid(f, hh, ww)
        mod = self.scale_shift_table[...].astype(jnp.float32) + temb[:, :, None, :]  # (B, S|1, 2, D)
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        h = (self.norm_out(h.astype(jnp.float32)) * (1 + scale) + shift).astype(h.dtype)
        out = self.proj_out(h).reshape(b, gf, gh, gw, pt, ph, pw, cfg.out_dim)
        return out.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_dim, f, hh, ww)

    def forward(self, latents, cond, timestep, hooks: Hooks | None = None, extras=None):
        """The velocity (B, C_out, F, H, W), plus the per-layer aux of the hooks ({"concept": ...,
        "attn": ...}, each None where that hook is absent), stacked over layers (`models.hooks`).

        latents (B, C, F, H, W); cond: the prompt embeddings (B, L, text_dim); timestep: scalar,
        (B,), or (B, S) per video token (Wan 2.2 TI2V's expand_timesteps)."""
        self.check_inputs(latents.shape, cond.shape, jnp.shape(timestep))
        video, text, temb, tproj, rope = self.embed(latents, cond, timestep)
        video, aux = self.run_blocks(video, text, tproj, rope, hooks, extras)
        return self.head(video, temb, latents.shape), aux

    def forward_inputs(self, hidden_states, timestep, encoder_hidden_states):
        """diffusers' call arguments (its order) -> (latents, conditioning, timestep) of `forward`, checked."""
        self.check_inputs(jnp.shape(hidden_states), jnp.shape(encoder_hidden_states), jnp.shape(timestep))
        return jnp.asarray(hidden_states), jnp.asarray(encoder_hidden_states), jnp.asarray(timestep)

    def __call__(self, hidden_states, timestep, encoder_hidden_states):
        """diffusers' argument order: (B, C, F, H, W), timestep, (B, L, text_dim) -> velocity."""
        x, cond, t = self.forward_inputs(hidden_states, timestep, encoder_hidden_states)
        graphdef, state = nnx.split(self)
        return jitted_forward(graphdef, state, x, cond, t)




# --------------------------------------------------------------------------------------------
# The weight-name rule table (diffusers <-> JAX), used in both directions
# --------------------------------------------------------------------------------------------
def rule_table(cfg: WanConfig) -> RuleTable:
    rules = []

    def dense(torch_name: str, jax_name: str, stacked: bool = False):
        pre, jpre = ("blocks.{layer}.", "blocks.") if stacked else ("", "")
        rules.append(Rule(f"{pre}{torch_name}.weight", f"{jpre}{jax_name}.kernel", LINEAR))
        rules.append(Rule(f"{pre}{torch_name}.bias", f"{jpre}{jax_name}.bias", IDENTITY))

    rules.append(Rule("patch_embedding.weight", "patch_proj.kernel", flatten_in((cfg.in_channels, *cfg.patch_size))))
    rules.append(Rule("patch_embedding.bias", "patch_proj.bias"))
    dense("condition_embedder.time_embedder.linear_1", "time_linear_1")
    dense("condition_embedder.time_embedder.linear_2", "time_linear_2")
    dense("condition_embedder.time_proj", "time_proj")
    dense("condition_embedder.text_embedder.linear_1", "text_linear_1")
    dense("condition_embedder.text_embedder.linear_2", "text_linear_2")
    for attn in ("attn1", "attn2"):
        for n in ("to_q", "to_k", "to_v"):
            dense(f"{attn}.{n}", f"{attn}.{n}", stacked=True)
        dense(f"{attn}.to_out.0", f"{attn}.to_out", stacked=True)
        for n in ("norm_q", "norm_k"):
            rules.append(Rule(f"blocks.{{layer}}.{attn}.{n}.weight", f"blocks.{attn}.{n}.scale"))
    if cfg.cross_attn_norm:
        rules.append(Rule("blocks.{layer}.norm2.weight", "blocks.norm2.scale"))
        rules.append(Rule("blocks.{layer}.norm2.bias", "blocks.norm2.bias"))
    dense("ffn.net.0.proj", "ffn.proj_in", stacked=True)
    dense("ffn.net.2", "ffn.proj_out", stacked=True)
    rules.append(Rule("blocks.{layer}.scale_shift_table", "blocks.scale_shift_table", squeeze_leading(1)))
    rules.append(Rule("scale_shift_table", "scale_shift_table", squeeze_leading(1)))
    dense("proj_out", "proj_out")
    return RuleTable(rules, cfg.num_layers, family="Wan transformer")


def abstract_model(cfg: WanConfig, **runtime) -> WanTransformer:
    """The model with shapes only (no memory), for planning loads and shardings."""
    return nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0), **runtime))
