"""The Wan video VAE (diffusers' ``AutoencoderKLWan``) as a Flax NNX model.

Both published variants are covered: the Wan 2.1 VAE (z_dim 16, 8x spatial / 4x temporal) and the
Wan 2.2 VAE of TI2V-5B (z_dim 48, residual down/up blocks with average-down / duplicate-up
shortcuts, a 2x2 pixel (un)shuffle around the encoder/decoder, 16x spatial). The computation
follows diffusers step by step, including the parts that make results depend on the chunking:

* every 3x3x3 convolution is causal in time with *zero* padding in the past; a chunk is preceded
  by the last CACHE_T = 2 input frames of the previous chunk (the feature cache), zeros before the
  first chunk (equivalent to diffusers' shorter first-chunk cache plus zero padding);
* videos are encoded first frame alone, then 4 frames at a time (trailing frames that do not fill
  a chunk are dropped, as in diffusers); latents are decoded one latent frame at a time;
* the temporal upsampler skips its time convolution on the first chunk (diffusers' "Rep" cache
  state) and the temporal downsampler keeps the first chunk's frame as it is, so the first latent
  frame stands for one video frame and every other one for four;
* norms are per pixel over channels (RMS), attention is per frame, so nothing else crosses frames;
* decoded videos are clamped to [-1, 1], as diffusers always does (the ``clip_output`` key that
  diffusers' conversion script writes into the Wan 2.2 config is ignored by diffusers, and here);
* optional spatial tiling (`WanTileSpec`, diffusers' ``enable_tiling`` arguments) cuts the latents
  (or video) into overlapping tiles, each with a fresh cache, and blends the seams linearly.

Arrays are channels-last inside the model, (B, T, H, W, C). The public `decode` / `encode` take and
return diffusers' layout (B, C, F, H, W) for latents and videos. Each chunk runs as one compiled
function; chunks after the first share one compilation (their cache shapes are fixed).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.conversion import IDENTITY, Rule, RuleTable, SafetensorsReader, Target, Transform, flatten_in, \
    load_params
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.jsonfiles import read_json_object
from unlearn_jax.models import layers
from unlearn_jax.models.video_vae import (CONV2D, CONV3D, LatentDistribution, _blend, _decode_chunk_jit,
                                          _encode_chunk_jit)

FAMILY = "Wan VAE"
CLASS_NAME = "AutoencoderKLWan"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

CACHE_T = 2  # frames of the previous chunk a causal convolution sees (diffusers' CACHE_T)
ENCODE_CHUNK_FRAMES = 4  # diffusers encodes the first frame alone, then 4 frames at a time

# diffusers' AutoencoderKLWan defaults (the Wan 2.1 VAE's statistics).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Keys of published configs that diffusers' AutoencoderKLWan no longer reads (ignored there too).
IGNORED_KEYS = frozenset({"clip_output"})


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """The fields of diffusers' ``vae/config.json`` for ``AutoencoderKLWan`` (same names and defaults)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0  # inference only: unused
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self):
        # lists (a config built by hand) become tuples: the config is part of the jit-static graph
        for f in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent along height and width."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def temporal_ratio(self) -> int:
        """Video frames per latent frame (after the first, which stands for one)."""
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def video_channels(self) -> int:
        """Channels of the pixel video `encode` takes (before the pixel unshuffle)."""
        return self.in_channels // self.patch ** 2

    @property
    def output_channels(self) -> int:
        """Channels of the pixel video `decode` returns (after the pixel shuffle)."""
        return self.out_channels // self.patch ** 2

    def decoded_frames(self, latent_frames: int) -> int:
        return decoded_frames(latent_frames, self.temporal_ratio)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames `encode` makes of `num_frames` video frames (a partial last chunk is dropped)."""
        return 1 + (num_frames - 1) // ENCODE_CHUNK_FRAMES * (ENCODE_CHUNK_FRAMES // self.temporal_ratio)

    # ---- checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        w = "Wan VAE config"
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UnlearnError(f"{w}: {name} = {v!r} must be a positive integer")
        if self.decoder_base_dim is not None and (not isinstance(self.decoder_base_dim, int)
                                                  or self.decoder_base_dim < 1):
            raise UnlearnError(f"{w}: decoder_base_dim = {self.decoder_base_dim!r} must be a positive integer or null")
        if not self.dim_mult or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise UnlearnError(f"{w}: dim_mult = {list(self.dim_mult)} must be a non-empty list of positive integers")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise UnlearnError(f"{w}: temperal_downsample has {len(self.temperal_downsample)} entries; "
                               f"{len(self.dim_mult)} dim_mult entries need {len(self.dim_mult) - 1}")
        if sum(bool(t) for t in self.temperal_downsample) > 2:
            raise UnlearnError(f"{w}: temperal_downsample = {list(self.temperal_downsample)} compresses time more "
                               f"than the {ENCODE_CHUNK_FRAMES}-frame encoder chunks allow (at most two True)")
        if self.patch_size is not None:
            p = self.patch_size
            if not isinstance(p, int) or p < 1:
                raise UnlearnError(f"{w}: patch_size = {p!r} must be a positive integer or null")
            for name in ("in_channels", "out_channels"):
                if getattr(self, name) % (p * p):
                    raise UnlearnError(f"{w}: {name} = {getattr(self, name)} is not divisible by "
                                       f"patch_size**2 = {p * p} (the pixel unshuffle's channels)")
        if self.scale_factor_spatial is not None and self.scale_factor_spatial != self.spatial_ratio:
            raise UnlearnError(f"{w}: scale_factor_spatial = {self.scale_factor_spatial} does not match the "
                               f"structure's {self.spatial_ratio} (2**(len(dim_mult) - 1) * patch_size); fix the "
                               "config")
        if self.scale_factor_temporal is not None and self.scale_factor_temporal != self.temporal_ratio:
            raise UnlearnError(f"{w}: scale_factor_temporal = {self.scale_factor_temporal} does not match the "
                               f"structure's {self.temporal_ratio} (2**sum(temperal_downsample)); fix the config")
        if self.is_residual:
            _, enc = _encoder_plan(self)
            for _, cin, cout, temporal, down in enc:
                f = (2 if temporal else 1) * (4 if down else 1)
                if cin * f % cout:
                    raise UnlearnError(f"{w}: a residual down block {cin}->{cout} channels cannot average its "
                                       f"shortcut ({cin} x {f} is not divisible by {cout}); change base_dim/dim_mult")
            _, dec = _decoder_plan(self)
            for cin, cout, mode in dec:
                f = (2 if mode == "upsample3d" else 1) * 4
                if mode is not None and cout * f % cin:
                    raise UnlearnError(f"{w}: a residual up block {cin}->{cout} channels cannot duplicate its "
                                       f"shortcut ({cout} x {f} is not divisible by {cin}); change decoder_base_dim")

    def latent_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the latents, float32 (z_dim,) each."""
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is None or len(v) != self.z_dim:
                raise UnlearnError(f"Wan VAE config: {name} has {0 if v is None else len(v)} entries, "
                                   f"z_dim = {self.z_dim} needs as many")
        return np.asarray(self.latents_mean, np.float32), np.asarray(self.latents_std, np.float32)

    # ---- dict / JSON ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "Wan VAE config") -> "WanVAEConfig":
        name = d.get("_class_name")
        if name is not None and name != CLASS_NAME:
            raise ModelFamilyError(f"{where}: a {name} config, not a Wan VAE ({CLASS_NAME})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields and k not in IGNORED_KEYS)
        if unknown:
            raise UnlearnError(f"{where}: options {unknown} are not fields of diffusers' {CLASS_NAME}; remove them")
        kw = {}
        for k, v in d.items():
            if k in fields:
                kw[k] = tuple(v) if isinstance(v, list) else v
        if "temperal_downsample" in kw:
            kw["temperal_downsample"] = tuple(bool(t) for t in kw["temperal_downsample"])
        try:
            return cls(**kw)
        except TypeError as e:
            raise UnlearnError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "WanVAEConfig":
        return cls.from_dict(read_json_object(path, "Wan VAE config"), str(path))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"_class_name": CLASS_NAME}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def decoded_frames(latent_frames: int, temporal_ratio: int = 4) -> int:
    """Video frames decoded from `latent_frames` latent frames: the first gives one, the others `temporal_ratio`."""
    return 1 + temporal_ratio * (latent_frames - 1)


@dataclasses.dataclass(frozen=True)
class WanTileSpec:
    """Spatial tiling, as diffusers' ``AutoencoderKLWan.enable_tiling`` arguments (pixels; its defaults)."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    def check(self, config: WanVAEConfig) -> None:
        r = config.spatial_ratio
        for axis in ("height", "width"):
            size, stride = getattr(self, f"tile_sample_min_{axis}"), getattr(self, f"tile_sample_stride_{axis}")
            if stride < r or size < stride:
                raise UnlearnError(f"tiling {self}: the {axis} stride {stride} must be at least the VAE's "
                                   f"{r}x compression and at most the tile size {size}")


# --------------------------------------------------------------------------------------------
# Block structure (shared by the model and its rule table)
# --------------------------------------------------------------------------------------------
def _encoder_plan(c: WanVAEConfig):
    """Channel widths and the encoder's down_blocks entries.

    Wan 2.1: a flat list of ("res", cin, cout) / ("attn", dim) / ("resample", dim, mode);
    Wan 2.2: one ("resdown", cin, cout, temporal, down) per level.
    """
    dims = [c.base_dim * u for u in (1, *c.dim_mult)]
    n = len(c.dim_mult)
    plan: list[tuple] = []
    scale = 1.0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == n - 1
        if c.is_residual:
            plan.append(("resdown", cin, cout, bool(c.temperal_downsample[i]) if not last else False, not last))
            continue
        for _ in range(c.num_res_blocks):
            plan.append(("res", cin, cout))
            if scale in c.attn_scales:
                plan.append(("attn", cout))
            cin = cout
        if not last:
            plan.append(("resample", cout, "downsample3d" if c.temperal_downsample[i] else "downsample2d"))
            scale /= 2.0
    return dims, plan


def _decoder_plan(c: WanVAEConfig):
    """Channel widths and one (cin, cout, upsample mode or None) per decoder up block."""
    dims = [c.decoder_dim * u for u in (c.dim_mult[-1], *reversed(c.dim_mult))]
    up_time = tuple(reversed(c.temperal_downsample))
    n = len(c.dim_mult)
    plan = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0 and not c.is_residual:
            cin //= 2  # Wan 2.1's upsamplers halve the channels
        mode = None if i == n - 1 else ("upsample3d" if up_time[i] else "upsample2d")
        plan.append((cin, cout, mode))
    return dims, plan


# --------------------------------------------------------------------------------------------
# Building blocks (channels-last: (B, T, H, W, C))
# --------------------------------------------------------------------------------------------
_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")
_CONV_AXES3 = (None, None, None, "vae_in", "vae_out")


def _param(init, rngs: nnx.Rngs, shape, dtype, axes):
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


def _get(cache, key):
    return None if cache is None else cache[key]


class CausalConv3d(nnx.Module):
    """diffusers' WanCausalConv3d: zero padding in space ("same" size) and only in the past along time.

    With `causal`, the time axis is extended in front by the previous chunk's cache (its last
    CACHE_T input frames), or by zeros for the first chunk; the new cache is the last CACHE_T frames
    of the extended input. Without, the caller provides the time context (the downsampler).
    """

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), *, stride_t: int = 1, causal: bool = True,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kernel = tuple(kernel)
        self.kernel = _param(nnx.initializers.lecun_normal(), rngs, (*kernel, cin, cout), param_dtype, _CONV_AXES3)
        self.bias = _param(nnx.initializers.zeros_init(), rngs, (cout,), param_dtype, ("vae_out",))
        self.time_pad = kernel[0] - 1 if causal else 0
        assert self.time_pad in (0, CACHE_T), "the feature cache holds CACHE_T frames"
        self.space_pad = ((kernel[1] - 1) // 2, (kernel[2] - 1) // 2)
        self.stride_t = stride_t
        self.dtype = dtype

    def __call__(self, x, cache=None):
        new_cache = None
        if self.time_pad:
            front = cache if cache is not None else jnp.zeros((x.shape[0], self.time_pad, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([front.astype(x.dtype), x], axis=1)
            new_cache = x[:, -CACHE_T:]
        ph, pw = self.space_pad
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                         window_strides=(self.stride_t, 1, 1),
                                         padding=((0, 0), (ph, ph), (pw, pw)), dimension_numbers=_DN3)
        return y + self.bias[...].astype(self.dtype), new_cache


def _pointwise(cin: int, cout: int, *, dtype, param_dtype, rngs) -> layers.Dense:
    """A 1x1(x1) convolution: a dense layer over channels (kernel (I, O))."""
    return layers.Dense(cin, cout, ("vae_in", "vae_out"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class FrameConv2d(nnx.Module):
    """A 3x3 2D convolution applied to every frame, kernel (3, 3, I, O), explicit zero padding."""

    def __init__(self, cin: int, cout: int, *, stride: int, padding, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = _param(nnx.initializers.lecun_normal(), rngs, (3, 3, cin, cout), param_dtype,
                             (None, None, "vae_in", "vae_out"))
        self.bias = _param(nnx.initializers.zeros_init(), rngs, (cout,), param_dtype, ("vae_out",))
        self.stride = stride
        self.padding = tuple(tuple(p) for p in padding)
        self.dtype = dtype

    def __call__(self, x):
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(x.reshape(b * t, *x.shape[2:]).astype(self.dtype),
                                         self.kernel[...].astype(self.dtype), (self.stride,) * 2, self.padding,
                                         dimension_numbers=_DN2)
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class RMSNorm(nnx.Module):
    """diffusers' WanRMS_norm (no bias): x / max(|x|_2, 1e-12) * sqrt(C) * gamma over channels, in fp32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.scale = _param(nnx.initializers.ones_init(), rngs, (dim,), jnp.float32, ("vae_norm",))
        self.dim = dim

    def __call__(self, x):
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * (self.dim ** 0.5) * self.scale[...].astype(jnp.float32)
        return y.astype(dtype)


class ResidualBlock(nnx.Module):
    """WanResidualBlock: RMS norm, SiLU, causal conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cin, rngs=rngs)
        self.conv1 = CausalConv3d(cin, cout, **kw)
        self.norm2 = RMSNorm(cout, rngs=rngs)
        self.conv2 = CausalConv3d(cout, cout, **kw)
        self.conv_shortcut = _pointwise(cin, cout, **kw) if cin != cout else None

    def __call__(self, x, cache=None):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), _get(cache, "conv1"))
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), _get(cache, "conv2"))  # dropout: inference, none
        return y + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nnx.Module):
    """WanAttentionBlock: single-head self-attention within each frame, with a residual connection."""

    def __init__(self, dim: int, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(dim, rngs=rngs)
        self.to_qkv = _pointwise(dim, 3 * dim, **kw)
        self.proj = _pointwise(dim, dim, **kw)
        self.attention = attention

    def __call__(self, x):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(b * t, h * w, 1, c))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = layers.attention(q, k, v, self.attention)
        return self.proj(out).reshape(b, t, h, w, c) + x


class Resample(nnx.Module):
    """WanResample: 2x nearest upsampling + 3x3 conv (and a time conv that doubles the frames), or a
    stride-2 3x3 conv (and a stride-2 time conv over the previous chunk's last frame and this chunk)."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.conv = FrameConv2d(dim, dim // 2 if out_dim is None else out_dim, stride=1,
                                    padding=((1, 1), (1, 1)), **kw)
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw) if mode == "upsample3d" else None
        elif mode in ("downsample2d", "downsample3d"):
            # diffusers pads one zero row/column at the bottom/right, then convolves with stride 2
            self.conv = FrameConv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), **kw)
            self.time_conv = (CausalConv3d(dim, dim, (3, 1, 1), stride_t=2, causal=False, **kw)
                              if mode == "downsample3d" else None)
        else:
            raise ValueError(f"resample mode {mode!r}")

    def __call__(self, x, cache=None):
        new_cache = None
        if self.mode == "upsample3d":
            if cache is None:
                # First chunk: diffusers marks the cache "Rep" and leaves time alone; the next chunk's
                # time conv then starts from zero padding.
                new_cache = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
            else:
                b, t, h, w, c = x.shape
                y, new_cache = self.time_conv(x, cache)
                # channels (2, C) -> frames 2t, 2t+1
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact at scale 2
        x = self.conv(x)
        if self.mode == "downsample3d":
            new_cache = x[:, -1:]
            if cache is not None:  # the first chunk's frame passes as it is
                x, _ = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
        return x, new_cache


def _avg_down(x, cout: int, ft: int, fs: int):
    """diffusers' AvgDown3D: (t, h, w) blocks folded into channels, averaged in groups down to `cout`;
    an odd chunk is zero-padded in front along time."""
    pad = (ft - x.shape[1] % ft) % ft
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, t // ft, h // fs, w // fs, cout, c * ft * fs * fs // cout)
    return jnp.mean(x, axis=-1)


def _dup_up(x, cout: int, ft: int, fs: int, first_chunk: bool):
    """diffusers' DupUp3D: channels repeated and unfolded into (t, h, w) blocks; the first chunk drops
    the leading ft - 1 frames."""
    b, t, h, w, c = x.shape
    reps = cout * ft * fs * fs // c
    x = jnp.repeat(x, reps, axis=-1).reshape(b, t, h, w, cout, ft, fs, fs)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * ft, h * fs, w * fs, cout)
    return x[:, ft - 1:] if first_chunk else x


def _run_list(mods, x, cache):
    new = {}
    for i, m in enumerate(mods):
        x, new[str(i)] = m(x, _get(cache, str(i)))
    return x, new


class ResidualDownBlock(nnx.Module):
    """Wan 2.2's WanResidualDownBlock: residual blocks and a downsampler, plus an averaged shortcut."""

    def __init__(self, cin: int, cout: int, num_res: int, temporal: bool, down: bool, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(cin if j == 0 else cout, cout, **kw) for j in range(num_res)])
        self.downsampler = Resample(cout, "downsample3d" if temporal else "downsample2d", **kw) if down else None
        self.shortcut = (cout, 2 if temporal else 1, 2 if down else 1)

    def __call__(self, x, cache=None):
        short = _avg_down(x, *self.shortcut)
        new = {}
        x, new["resnets"] = _run_list(self.resnets, x, _get(cache, "resnets"))
        if self.downsampler is not None:
            x, new["downsampler"] = self.downsampler(x, _get(cache, "downsampler"))
        return x + short, new


class MidBlock(nnx.Module):
    """WanMidBlock: residual block, attention, residual block."""

    def __init__(self, dim: int, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, attention=attention, **kw)])

    def __call__(self, x, cache=None):
        x, c0 = self.resnets[0](x, _get(cache, "0"))
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, _get(cache, "1"))
        return x, {"0": c0, "1": c1}


class UpBlock(nnx.Module):
    """An up block: residual blocks, an optional upsampler, and (Wan 2.2) a duplicated shortcut."""

    def __init__(self, cin: int, cout: int, num_res: int, mode: str | None, residual: bool, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(cin if j == 0 else cout, cout, **kw) for j in range(num_res + 1)])
        # Wan 2.2's upsamplers keep the width; Wan 2.1's halve it.
        self.upsampler = (Resample(cout, mode, out_dim=cout if residual else None, **kw)
                          if mode is not None else None)
        self.shortcut = (cout, 2 if mode == "upsample3d" else 1, 2) if residual and mode is not None else None

    def __call__(self, x, cache=None):
        first_chunk = cache is None
        short = None if self.shortcut is None else _dup_up(x, *self.shortcut, first_chunk=first_chunk)
        new = {}
        x, new["resnets"] = _run_list(self.resnets, x, _get(cache, "resnets"))
        if self.upsampler is not None:
            x, new["upsampler"] = self.upsampler(x, _get(cache, "upsampler"))
        return (x if short is None else x + short), new


class Encoder3d(nnx.Module):
    def __init__(self, c: WanVAEConfig, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims, plan = _encoder_plan(c)
        self.conv_in = CausalConv3d(c.in_channels, dims[0], **kw)
        blocks = []
        for entry in plan:
            kind = entry[0]
            if kind == "res":
                blocks.append(ResidualBlock(entry[1], entry[2], **kw))
            elif kind == "attn":
                blocks.append(AttentionBlock(entry[1], attention=attention, **kw))
            elif kind == "resample":
                blocks.append(Resample(entry[1], entry[2], **kw))
            else:
                blocks.append(ResidualDownBlock(*entry[1:3], c.num_res_blocks, *entry[3:], **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], attention=attention, **kw)
        self.norm_out = RMSNorm(dims[-1], rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim, **kw)

    def __call__(self, x, cache=None):
        new = {}
        x, new["conv_in"] = self.conv_in(x, _get(cache, "conv_in"))
        down, blocks = _get(cache, "down_blocks"), {}
        for i, layer in enumerate(self.down_blocks):
            if isinstance(layer, AttentionBlock):
                x = layer(x)
            else:
                x, blocks[str(i)] = layer(x, _get(down, str(i)))
        new["down_blocks"] = blocks
        x, new["mid_block"] = self.mid_block(x, _get(cache, "mid_block"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), _get(cache, "conv_out"))
        return x, new


class Decoder3d(nnx.Module):
    def __init__(self, c: WanVAEConfig, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims, plan = _decoder_plan(c)
        self.conv_in = CausalConv3d(c.z_dim, dims[0], **kw)
        self.mid_block = MidBlock(dims[0], attention=attention, **kw)
        self.up_blocks = nnx.List([UpBlock(cin, cout, c.num_res_blocks, mode, c.is_residual, **kw)
                                   for cin, cout, mode in plan])
        self.norm_out = RMSNorm(dims[-1], rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], c.out_channels, **kw)

    def __call__(self, z, cache=None):
        new = {}
        x, new["conv_in"] = self.conv_in(z, _get(cache, "conv_in"))
        x, new["mid_block"] = self.mid_block(x, _get(cache, "mid_block"))
        x, new["up_blocks"] = _run_list(self.up_blocks, x, _get(cache, "up_blocks"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), _get(cache, "conv_out"))
        return x, new


def _patchify(x, p: int):
    """(B, T, H, W, C) -> (B, T, H/p, W/p, C*p*p), channel c*p*p + dw*p + dh (diffusers' order)."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def _unpatchify(x, p: int):
    """The inverse of `_patchify`."""
    if p == 1:
        return x
    b, t, h, w, cp = x.shape
    c = cp // (p * p)
    x = x.reshape(b, t, h, w, c, p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, c)


# --------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------
class AutoencoderKLWan(nnx.Module):
    """`dtype`: computation; `param_dtype`: weights (norm scales stay fp32); `attention`: the mid
    blocks' attention path (`layers.attention`: reference | chunked | xla | cudnn | auto)."""

    def __init__(self, config: WanVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "reference", rngs: nnx.Rngs):
        if attention not in layers.ATTENTION_IMPLS:
            raise UnlearnError(f"attention = {attention!r} is not one of {layers.ATTENTION_IMPLS}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder3d(config, attention=attention, **kw)
        self.quant_conv = _pointwise(2 * config.z_dim, 2 * config.z_dim, **kw)
        self.post_quant_conv = _pointwise(config.z_dim, config.z_dim, **kw)
        self.decoder = Decoder3d(config, attention=attention, **kw)

    # ---- one chunk of frames (called under jit) ---------------------------------------------
    def decode_chunk(self, z, cache=None):
        """(B, 1, h, w, z_dim) latents + the previous chunk's cache (None: the first) -> (frames before
        the pixel shuffle, new cache)."""
        return self.decoder(self.post_quant_conv(z), cache)

    def encode_chunk(self, x, cache=None):
        """(B, T, H/p, W/p, in_channels) frames + cache -> (moments (B, F, h, w, 2 z_dim), new cache)."""
        h, cache = self.encoder(x, cache)
        return self.quant_conv(h), cache

    # ---- latent statistics (WanPipeline) -----------------------------------------------------
    def _stats(self, z):
        mean, std = self.config.latent_stats()
        shape = (1, self.config.z_dim, 1, 1, 1)
        return jnp.asarray(mean).reshape(shape), (1.0 / jnp.asarray(std)).reshape(shape)

    def normalize(self, z) -> jax.Array:
        """Posterior latents (B, C, F, h, w) -> the transformer's latents: (z - mean) / std, computed as
        diffusers' Wan pipelines do, (z - mean) * (1 / std)."""
        mean, inv_std = self._stats(z)
        return ((jnp.asarray(z, jnp.float32) - mean) * inv_std).astype(jnp.asarray(z).dtype)

    def denormalize(self, z) -> jax.Array:
        """The transformer's latents -> what `decode` takes: z * std + mean, computed as WanPipeline
        does, z / (1 / std) + mean."""
        mean, inv_std = self._stats(z)
        return (jnp.asarray(z, jnp.float32) / inv_std + mean).astype(jnp.asarray(z).dtype)

    # ---- public API --------------------------------------------------------------------------
    def decode(self, latents, tiling: "WanTileSpec | Mapping | bool | None" = None) -> jax.Array:
        """Latents (B, z_dim, F, h, w), already denormalized -> video (B, C, 1 + 4 (F - 1), H, W) in [-1, 1].

        Equals diffusers' ``vae.decode(latents).sample``; with `tiling` (a `WanTileSpec`, a dict of its
        fields, or True for diffusers' default tiles) its tiled decode (``enable_tiling``).
        """
        c = self.config
        shape = tuple(jnp.shape(latents))
        if len(shape) != 5 or shape[1] != c.z_dim:
            raise UnlearnError(f"Wan VAE decode: latents of shape {shape} are not (B, {c.z_dim}, F, h, w)")
        z = jnp.transpose(jnp.asarray(latents), (0, 2, 3, 4, 1))
        spec = _tile_spec(c, tiling)
        graphdef, state = nnx.split(self)
        run = functools.partial(_decode_chunk_jit, graphdef, state)
        chunks = [(i, i + 1) for i in range(z.shape[1])]
        p, r = c.patch, c.spatial_ratio
        if spec is not None and (z.shape[2] > spec.tile_sample_min_height // r
                                 or z.shape[3] > spec.tile_sample_min_width // r):
            keep = (spec.tile_sample_stride_height // p, spec.tile_sample_stride_width // p)
            out = _tiled(run, z, chunks,
                         tile=(spec.tile_sample_min_height // r, spec.tile_sample_min_width // r),
                         stride=(spec.tile_sample_stride_height // r, spec.tile_sample_stride_width // r),
                         blend=(spec.tile_sample_min_height // p - keep[0], spec.tile_sample_min_width // p - keep[1]),
                         keep=keep, size=(z.shape[2] * r // p, z.shape[3] * r // p))
        else:
            out = _chunked(run, z, chunks)
        out = jnp.clip(_unpatchify(out, p), -1.0, 1.0)
        return jnp.transpose(out, (0, 4, 1, 2, 3))

    def encode(self, video, tiling: "WanTileSpec | Mapping | bool | None" = None) -> LatentDistribution:
        """Video (B, C, T, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, z_dim, F, h, w).

        Equals diffusers' ``vae.encode(video).latent_dist``; with `tiling`, its tiled encode.
        """
        c = self.config
        shape = tuple(jnp.shape(video))
        if len(shape) != 5 or shape[1] != c.video_channels:
            raise UnlearnError(f"Wan VAE encode: a video of shape {shape} is not (B, {c.video_channels}, T, H, W)")
        x = jnp.transpose(jnp.asarray(video), (0, 2, 3, 4, 1))
        if any(isinstance(m, AttentionBlock) for m in self.encoder.down_blocks):
            # diffusers' (and the original Wan) encoder passes the feature cache to these blocks, which
            # do not take it: it cannot encode, so there is nothing to match
            raise UnlearnError(f"Wan VAE encode: attn_scales = {list(c.attn_scales)} puts attention blocks in the "
                               "encoder, which diffusers' AutoencoderKLWan cannot run; only decoding is supported")
        height, width = x.shape[2], x.shape[3]
        need = c.spatial_ratio if c.is_residual else c.patch
        if height % need or width % need:
            raise UnlearnError(f"Wan VAE encode: {height}x{width} frames; height and width must be multiples "
                               f"of {need}")
        x = _patchify(x, c.patch)
        n = 1 + (x.shape[1] - 1) // ENCODE_CHUNK_FRAMES
        chunks = [(0, 1)] + [(1 + ENCODE_CHUNK_FRAMES * (i - 1), 1 + ENCODE_CHUNK_FRAMES * i) for i in range(1, n)]
        spec = _tile_spec(c, tiling)
        graphdef, state = nnx.split(self)
        run = functools.partial(_encode_chunk_jit, graphdef, state)
        if spec is not None and (width > spec.tile_sample_min_width or height > spec.tile_sample_min_height):
            # diffusers tiles the unshuffled frames with the pixel tile sizes as they are
            er = c.spatial_ratio // c.patch
            tile_h, tile_w = spec.tile_sample_min_height // er, spec.tile_sample_min_width // er
            keep = (spec.tile_sample_stride_height // er, spec.tile_sample_stride_width // er)
            h = _tiled(run, x, chunks, tile=(spec.tile_sample_min_height, spec.tile_sample_min_width),
                       stride=(spec.tile_sample_stride_height, spec.tile_sample_stride_width),
                       blend=(tile_h - keep[0], tile_w - keep[1]), keep=keep,
                       size=(x.shape[2] // er, x.shape[3] // er))
        else:
            h = _chunked(run, x, chunks)
        h = jnp.transpose(h, (0, 4, 1, 2, 3))
        mean, logvar = jnp.split(h, 2, axis=1)
        return LatentDistribution(mean, jnp.clip(logvar, -30.0, 20.0))


def _tile_spec(config: WanVAEConfig, tiling) -> WanTileSpec | None:
    if tiling is None or tiling is False:
        return None
    if tiling is True:
        spec = WanTileSpec()
    elif isinstance(tiling, WanTileSpec):
        spec = tiling
    elif isinstance(tiling, Mapping):
        try:
            spec = WanTileSpec(**tiling)
        except TypeError as e:
            raise UnlearnError(f"tiling {dict(tiling)}: {e}") from None
    else:
        raise UnlearnError(f"tiling must be a WanTileSpec, a dict of its fields, True, False or None, "
                           f"not {type(tiling).__name__}")
    spec.check(config)
    return spec


def _chunked(run, x, chunks):
    """Runs `run(frames, cache)` over the frame chunks of x (B, T, H, W, C), carrying the cache."""
    cache, outs = None, []
    for start, end in chunks:
        y, cache = run(x[:, start:end], cache)
        outs.append(y)
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _tiled(run, x, chunks, *, tile, stride, blend, keep, size):
    """diffusers' tiled decode/encode on channels-last x (B, T, H, W, C).

    Input tiles of `tile` start every `stride`; each is run over all frame chunks with a fresh cache,
    blended with the (already blended) tile above and to the left over `blend` output rows/columns,
    cut to `keep`, and the whole is cut to `size`.
    """
    height, width = x.shape[2], x.shape[3]
    rows = [[_chunked(run, x[:, :, i:i + tile[0], j:j + tile[1]], chunks) for j in range(0, width, stride[1])]
            for i in range(0, height, stride[0])]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j in range(len(row)):
            t = row[j]
            if i > 0:
                t = _blend(rows[i - 1][j], t, blend[0], axis=2)
            if j > 0:
                t = _blend(row[j - 1], t, blend[1], axis=3)
            row[j] = t  # diffusers blends in place: later tiles see this one blended
            kept.append(t[:, :, :keep[0], :keep[1]])
        out_rows.append(jnp.concatenate(kept, axis=3))
    return jnp.concatenate(out_rows, axis=2)[:, :, :size[0], :size[1]]


def build_vae(config: WanVAEConfig, seed: int = 0, *, dtype=jnp.float32, param_dtype=None,
              attention: str = "reference") -> AutoencoderKLWan:
    """A randomly initialised model (tests); parameters keep their logical axes as metadata only."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return AutoencoderKLWan(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                rngs=nnx.Rngs(seed))


def abstract_vae(config: WanVAEConfig, *, dtype=jnp.float32, param_dtype=None, attention: str = "reference"):
    """The model with shapes only (no memory)."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: AutoencoderKLWan(config, dtype=dtype, param_dtype=param_dtype,
                                                       attention=attention, rngs=nnx.Rngs(0)))


def param_shapes(config: WanVAEConfig, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """Dotted parameter path -> shape/dtype of the JAX model, without allocating it."""
    abstract = abstract_vae(config, dtype=dtype)
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


# --------------------------------------------------------------------------------------------
# Weight conversion
# --------------------------------------------------------------------------------------------
def _squeeze_trailing(n: int) -> Transform:
    """A norm gamma stored broadcastable, (C, 1, ..., 1) with n ones, <-> (C,)."""

    def jax_shape(s):
        return (s[0],) if len(s) == n + 1 and tuple(s[1:]) == (1,) * n else ("mismatch",) + tuple(s)

    return Transform(f"squeeze_trailing{n}", lambda a: a.reshape(a.shape[0]),
                     lambda a: a.reshape(a.shape + (1,) * n), jax_shape, lambda s: tuple(s) + (1,) * n)


GAMMA3 = _squeeze_trailing(3)  # WanRMS_norm(images=False): (C, 1, 1, 1)
GAMMA2 = _squeeze_trailing(2)  # WanRMS_norm(images=True), in attention: (C, 1, 1)


def _conv(torch_name: str, jax_name: str, transform: Transform = CONV3D) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{jax_name}.kernel", transform),
            Rule(f"{torch_name}.bias", f"{jax_name}.bias", IDENTITY)]


def _res_rules(name: str, cin: int, cout: int) -> list[Rule]:
    rules = [Rule(f"{name}.norm1.gamma", f"{name}.norm1.scale", GAMMA3), *_conv(f"{name}.conv1", f"{name}.conv1"),
             Rule(f"{name}.norm2.gamma", f"{name}.norm2.scale", GAMMA3), *_conv(f"{name}.conv2", f"{name}.conv2")]
    if cin != cout:
        rules += _conv(f"{name}.conv_shortcut", f"{name}.conv_shortcut", flatten_in((cin, 1, 1, 1)))
    return rules


def _attn_rules(name: str, dim: int) -> list[Rule]:
    t = flatten_in((dim, 1, 1))
    return [Rule(f"{name}.norm.gamma", f"{name}.norm.scale", GAMMA2),
            *_conv(f"{name}.to_qkv", f"{name}.to_qkv", t), *_conv(f"{name}.proj", f"{name}.proj", t)]


def _resample_rules(torch_name: str, jax_name: str, mode: str) -> list[Rule]:
    rules = _conv(f"{torch_name}.resample.1", f"{jax_name}.conv", CONV2D)
    if mode.endswith("3d"):
        rules += _conv(f"{torch_name}.time_conv", f"{jax_name}.time_conv")
    return rules


def _mid_rules(name: str, dim: int) -> list[Rule]:
    return (_res_rules(f"{name}.resnets.0", dim, dim) + _attn_rules(f"{name}.attentions.0", dim)
            + _res_rules(f"{name}.resnets.1", dim, dim))


def vae_rule_table(config: WanVAEConfig) -> RuleTable:
    """Every tensor of diffusers' AutoencoderKLWan for `config`, generated from the block structure."""
    c = config
    rules = _conv("encoder.conv_in", "encoder.conv_in")
    dims, plan = _encoder_plan(c)
    for k, entry in enumerate(plan):
        name = f"encoder.down_blocks.{k}"
        kind = entry[0]
        if kind == "res":
            rules += _res_rules(name, entry[1], entry[2])
        elif kind == "attn":
            rules += _attn_rules(name, entry[1])
        elif kind == "resample":
            rules += _resample_rules(name, name, entry[2])
        else:
            _, cin, cout, temporal, down = entry
            for j in range(c.num_res_blocks):
                rules += _res_rules(f"{name}.resnets.{j}", cin if j == 0 else cout, cout)
            if down:
                rules += _resample_rules(f"{name}.downsampler", f"{name}.downsampler",
                                         "downsample3d" if temporal else "downsample2d")
    rules += _mid_rules("encoder.mid_block", dims[-1])
    rules += [Rule("encoder.norm_out.gamma", "encoder.norm_out.scale", GAMMA3)]
    rules += _conv("encoder.conv_out", "encoder.conv_out")
    rules += _conv("quant_conv", "quant_conv", flatten_in((2 * c.z_dim, 1, 1, 1)))
    rules += _conv("post_quant_conv", "post_quant_conv", flatten_in((c.z_dim, 1, 1, 1)))
    dims, plan = _decoder_plan(c)
    rules += _conv("decoder.conv_in", "decoder.conv_in")
    rules += _mid_rules("decoder.mid_block", dims[0])
    for i, (cin, cout, mode) in enumerate(plan):
        name = f"decoder.up_blocks.{i}"
        for j in range(c.num_res_blocks + 1):
            rules += _res_rules(f"{name}.resnets.{j}", cin if j == 0 else cout, cout)
        if mode is not None:
            # Wan 2.1's up blocks hold their upsampler in a list (upsamplers.0), Wan 2.2's directly
            torch_up = f"{name}.upsampler" if c.is_residual else f"{name}.upsamplers.0"
            rules += _resample_rules(torch_up, f"{name}.upsampler", mode)
    rules += [Rule("decoder.norm_out.gamma", "decoder.norm_out.scale", GAMMA3)]
    rules += _conv("decoder.conv_out", "decoder.conv_out")
    return RuleTable(rules, num_layers=0, family=FAMILY)


# --------------------------------------------------------------------------------------------
# Loading a diffusers folder
# --------------------------------------------------------------------------------------------
def resolve_wan_vae_folder(path: str | Path) -> Path:
    """A diffusers AutoencoderKLWan folder, or a pipeline folder (its `vae/`); other models are refused."""
    path = Path(path)
    if not path.is_dir():
        raise UnlearnError(f"{path}: no such folder")
    if (path / "config.json").exists():
        cls = read_json_object(path / "config.json").get("_class_name")
        if cls != CLASS_NAME:
            raise ModelFamilyError(f"{path}: holds a {cls or 'unknown'} model, not a Wan VAE ({CLASS_NAME})")
        return path
    if (path / "model_index.json").exists():
        index = read_json_object(path / "model_index.json")
        entry = index.get("vae")
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if cls != CLASS_NAME:
            raise ModelFamilyError(f"{path}: a {index.get('_class_name', 'pipeline')} folder whose VAE is "
                                   f"{cls or 'absent'}, not {CLASS_NAME}")
        return resolve_wan_vae_folder(path / "vae")
    if (path / "vae" / "config.json").exists():
        return resolve_wan_vae_folder(path / "vae")
    raise UnlearnError(f"{path}: neither a diffusers VAE folder (config.json) nor a pipeline folder "
                       "(model_index.json)")


def _checkpoint_dtype(reader: SafetensorsReader):
    floats = [reader.dtype(k) for k in reader.keys()
              if np.issubdtype(reader.dtype(k), np.floating) or reader.dtype(k).name == "bfloat16"]
    dtype = floats[0] if floats else np.dtype(np.float32)
    return jnp.dtype(np.float32 if dtype == np.float64 else dtype)


def load_wan_vae(path: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None,
                 attention: str = "reference") -> AutoencoderKLWan:
    """Reads a diffusers Wan VAE (its folder or a pipeline folder) into the JAX model.

    `dtype` sets the weights and the computation (norm scales and norms stay fp32); None keeps the
    checkpoint's floating dtype. With a `mesh`, parameters are replicated over it.
    """
    folder = resolve_wan_vae_folder(path)
    config = WanVAEConfig.from_json(folder / "config.json")
    reader = SafetensorsReader(folder, prefer=WEIGHTS_NAME)
    try:
        dtype = _checkpoint_dtype(reader) if dtype is None else jnp.dtype(dtype)
        abstract = abstract_vae(config, dtype=dtype, attention=attention)
        graphdef, state = nnx.split(abstract)
        flat = nnx.to_flat_state(state)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
        targets = {".".join(map(str, k)): Target(tuple(v.get_value().shape), np.dtype(v.get_value().dtype), sharding)
                   for k, v in flat}
        leaves = load_params(reader, vae_rule_table(config), targets, str(folder))
    finally:
        reader.close()
    state = nnx.from_flat_state([(k, v.replace(leaves[".".join(map(str, k))])) for k, v in flat])
    return nnx.merge(graphdef, state)
