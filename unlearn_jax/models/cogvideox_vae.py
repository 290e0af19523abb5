"""The CogVideoX video VAE (diffusers' ``AutoencoderKLCogVideoX``) as a Flax NNX model.

Decoding and encoding run entirely in JAX, so that videos can be produced on machines without
PyTorch. The computation follows diffusers step by step, including the parts that make results
depend on how the work is split:

* every 3x3x3 convolution is *causal* in time: a chunk of frames is preceded by the last two
  (padded) input frames of the previous chunk (the "conv cache"), or, for the very first chunk,
  by two copies of its own first frame;
* latents are decoded two latent frames at a time (the first chunk also takes the odd one out),
  videos are encoded eight frames at a time, and group norms see only the current chunk;
* the temporal down/upsampling keeps the first frame of an odd-length chunk apart;
* optional spatial tiling (`TileSpec`) cuts the latent (or video) into overlapping tiles,
  processes each one on its own and blends the seams linearly, as diffusers' ``tiled_decode``.

Arrays are channels-last inside the model, (B, T, H, W, C). The public `decode` takes latents in
the transformer's layout (B, F, C, h, w) and returns frames as diffusers does, (B, C, T, H, W).
Each chunk runs as one compiled function (one compilation per chunk shape).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.conversion import IDENTITY, Rule, RuleTable, SafetensorsReader, load_into
from unlearn_jax.models.video_vae import (CONV2D, CONV3D, LatentDistribution, _blend,  # noqa: F401  (re-exported)
                                          _decode_chunk_jit, _encode_chunk_jit)
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.jsonfiles import read_json_object

FAMILY = "CogVideoX VAE"
CLASS_NAME = "AutoencoderKLCogVideoX"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Frames processed per chunk (diffusers: num_latent_frames_batch_size / num_sample_frames_batch_size).
LATENT_FRAMES_PER_CHUNK = 2
SAMPLE_FRAMES_PER_CHUNK = 8


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' ``vae/config.json`` for ``AutoencoderKLCogVideoX`` (same defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise UnlearnError("VAE config: block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise UnlearnError(f"VAE config: {len(self.down_block_types)} down and {len(self.up_block_types)} up "
                               f"block types for {n} block_out_channels; they must match")
        bad = sorted({t for t in self.down_block_types if t != "CogVideoXDownBlock3D"}
                     | {t for t in self.up_block_types if t != "CogVideoXUpBlock3D"})
        if bad:
            raise UnlearnError(f"VAE config: unsupported block types {bad} (only CogVideoXDownBlock3D/UpBlock3D)")
        if self.act_fn not in _ACTIVATIONS:
            raise UnlearnError(f"VAE config: act_fn {self.act_fn!r} is not one of {sorted(_ACTIVATIONS)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise UnlearnError(f"VAE config: block_out_channels {self.block_out_channels} are not all "
                                   f"divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def temporal_compress_level(self) -> int:
        return int(np.log2(self.temporal_compression_ratio))

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "VAE config") -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            if k.startswith("_") or k not in names:
                continue  # diffusers bookkeeping (_class_name, _diffusers_version...) and unused extras
            kw[k] = tuple(v) if isinstance(v, list) else v
        try:
            return cls(**kw)
        except TypeError as e:
            raise UnlearnError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UnlearnError(f"{path}: not a readable JSON config ({e})") from None
        return cls.from_dict(d, str(path))


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Spatial tiling, as diffusers' ``enable_tiling`` arguments (sizes in pixels of the video)."""

    tile_sample_min_height: int
    tile_sample_min_width: int
    tile_overlap_factor_height: float = 1 / 6
    tile_overlap_factor_width: float = 1 / 5

    @classmethod
    def default(cls, config: VAEConfig) -> "TileSpec":
        return cls(config.sample_height // 2, config.sample_width // 2)

    def latent_size(self, config: VAEConfig) -> tuple[int, int]:
        r = config.spatial_ratio
        return int(self.tile_sample_min_height / r), int(self.tile_sample_min_width / r)


# --------------------------------------------------------------------------------------------
# Building blocks (channels-last: (B, T, H, W, C))
# --------------------------------------------------------------------------------------------
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}

_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def _param(init, rngs: nnx.Rngs, shape, dtype, axes):
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


def _conv(x, kernel, bias, strides, padding, dims, dtype):
    y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), window_strides=strides,
                                     padding=padding, dimension_numbers=dims)
    return y + bias.astype(dtype)


class CausalConv3d(nnx.Module):
    """A 3D convolution, causal in time; spatial zero padding keeps the size.

    The time axis is extended in front by `time_pad` frames: the cache of the previous chunk, or
    copies of the first frame. The new cache is the last `time_pad` frames of the extended input.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, *, dtype, param_dtype, rngs: nnx.Rngs):
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        self.kernel = _param(nnx.initializers.lecun_normal(), rngs, (*k, cin, cout), param_dtype,
                             (None, None, None, "vae_in", "vae_out"))
        self.bias = _param(nnx.initializers.zeros_init(), rngs, (cout,), param_dtype, ("vae_out",))
        self.time_pad = k[0] - 1
        # diffusers passes its (0, width_pad, height_pad) padding to a conv that reads it as (t, h, w):
        # H is padded by the width kernel's half size and W by the height kernel's (the same when square).
        self.spatial_pad = ((k[2] - 1) // 2, (k[1] - 1) // 2)
        self.dtype = dtype

    def __call__(self, x, cache=None):
        new_cache = None
        if self.time_pad:
            front = cache if cache is not None else jnp.repeat(x[:, :1], self.time_pad, axis=1)
            x = jnp.concatenate([front.astype(x.dtype), x], axis=1)
            new_cache = x[:, -self.time_pad:]
        ph, pw = self.spatial_pad
        y = _conv(x, self.kernel[...], self.bias[...], (1, 1, 1), ((0, 0), (ph, ph), (pw, pw)), _DN3, self.dtype)
        return y, new_cache


class PointConv3d(nnx.Module):
    """A 1x1x1 convolution (diffusers' resnet shortcut and quant convs), kernel (1, 1, 1, I, O)."""

    def __init__(self, cin: int, cout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = _param(nnx.initializers.lecun_normal(), rngs, (1, 1, 1, cin, cout), param_dtype,
                             (None, None, None, "vae_in", "vae_out"))
        self.bias = _param(nnx.initializers.zeros_init(), rngs, (cout,), param_dtype, ("vae_out",))
        self.dtype = dtype

    def __call__(self, x):
        return _conv(x, self.kernel[...], self.bias[...], (1, 1, 1), ((0, 0),) * 3, _DN3, self.dtype)


class FrameConv2d(nnx.Module):
    """A 2D convolution applied to every frame, kernel (kh, kw, I, O)."""

    def __init__(self, cin: int, cout: int, *, stride: int, padding, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = _param(nnx.initializers.lecun_normal(), rngs, (3, 3, cin, cout), param_dtype,
                             (None, None, "vae_in", "vae_out"))
        self.bias = _param(nnx.initializers.zeros_init(), rngs, (cout,), param_dtype, ("vae_out",))
        self.stride = stride
        self.padding = tuple(tuple(p) for p in padding)
        self.dtype = dtype

    def __call__(self, x):
        b, t = x.shape[:2]
        y = _conv(x.reshape(b * t, *x.shape[2:]), self.kernel[...], self.bias[...], (self.stride,) * 2,
                  self.padding, _DN2, self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over (T, H, W, C/G) per group, computed in fp32."""

    def __init__(self, groups: int, channels: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(nnx.initializers.ones_init(), rngs, (channels,), param_dtype, ("vae_norm",))
        self.bias = _param(nnx.initializers.zeros_init(), rngs, (channels,), param_dtype, ("vae_norm",))
        self.groups = groups
        self.eps = eps

    def __call__(self, x):
        dtype, shape = x.dtype, x.shape
        g = x.astype(jnp.float32).reshape(shape[0], -1, self.groups, shape[-1] // self.groups)
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)
        centered = g - mean
        var = jnp.mean(jnp.square(centered), axis=(1, 3), keepdims=True)
        y = (centered * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


def _nearest_axis(x, axis: int, size: int):
    """torch's `F.interpolate(mode="nearest")` along one axis: src = floor(dst * (in / out)), as float32."""
    n = x.shape[axis]
    if n == size:
        return x
    if size == 2 * n:
        idx = np.arange(size) >> 1
    else:
        scale = np.float32(np.float32(n) / np.float32(size))
        idx = np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int64), n - 1)
    if size % n == 0 and np.array_equal(idx, np.arange(size) // (size // n)):
        return jnp.repeat(x, size // n, axis=axis)
    return jnp.take(x, jnp.asarray(idx), axis=axis)


def _nearest(x, size):
    """Nearest resize of the (T, H, W) axes of a (B, T, H, W, C) array."""
    for axis, s in zip((1, 2, 3), size):
        x = _nearest_axis(x, axis, s)
    return x


class SpatialNorm3D(nnx.Module):
    """Group norm of `f` modulated by the latents `zq` resized to `f`: norm(f) * conv_y(zq) + conv_b(zq)."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.norm_layer = GroupNorm(groups, f_channels, 1e-6, param_dtype=param_dtype, rngs=rngs)
        self.conv_y = CausalConv3d(zq_channels, f_channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_b = CausalConv3d(zq_channels, f_channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, f, zq):
        # diffusers resizes zq to f and then applies the 1x1x1 convs; a pointwise conv commutes with
        # nearest resizing (which only repeats pixels), so the convs run at the latents' resolution.
        y, _ = self.conv_y(zq)
        b, _ = self.conv_b(zq)
        t, h, w = f.shape[1:4]

        def resize(a):
            if t > 1 and t % 2 == 1:  # the first frame is resized on its own
                return jnp.concatenate([_nearest(a[:, :1], (1, h, w)), _nearest(a[:, 1:], (t - 1, h, w))], axis=1)
            return _nearest(a, (t, h, w))

        return self.norm_layer(f) * resize(y) + resize(b)


class ResnetBlock3D(nnx.Module):
    def __init__(self, cin: int, cout: int, *, groups: int, eps: float, act: str, spatial_norm_dim: int | None,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if spatial_norm_dim is None:
            self.norm1 = GroupNorm(groups, cin, eps, param_dtype=param_dtype, rngs=rngs)
            self.norm2 = GroupNorm(groups, cout, eps, param_dtype=param_dtype, rngs=rngs)
        else:
            self.norm1 = SpatialNorm3D(cin, spatial_norm_dim, groups, **kw)
            self.norm2 = SpatialNorm3D(cout, spatial_norm_dim, groups, **kw)
        self.conv1 = CausalConv3d(cin, cout, 3, **kw)
        self.conv2 = CausalConv3d(cout, cout, 3, **kw)
        self.conv_shortcut = PointConv3d(cin, cout, **kw) if cin != cout else None
        self.spatial = spatial_norm_dim is not None
        self.act = act

    def __call__(self, x, zq=None, cache=None):
        cache = cache or {}
        act = _ACTIVATIONS[self.act]
        new = {}
        h = self.norm1(x, zq) if self.spatial else self.norm1(x)
        h, new["conv1"] = self.conv1(act(h), cache.get("conv1"))
        h = self.norm2(h, zq) if self.spatial else self.norm2(h)
        h, new["conv2"] = self.conv2(act(h), cache.get("conv2"))  # dropout: inference, none
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x, new


class Downsample3D(nnx.Module):
    """Optional 2x average pooling in time (first frame of an odd chunk kept), then a stride-2 3x3 conv."""

    def __init__(self, channels: int, compress_time: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = FrameConv2d(channels, channels, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x):
        if self.compress_time:
            first, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 == 1 else (None, x)
            if rest.shape[1]:
                b, t = rest.shape[:2]
                pairs = rest.reshape(b, t // 2, 2, *rest.shape[2:])
                rest = (pairs[:, :, 0] + pairs[:, :, 1]) / 2
            x = rest if first is None else jnp.concatenate([first, rest], axis=1)
        return self.conv(x)


class Upsample3D(nnx.Module):
    """2x nearest upsampling in space (and in time, first frame of an odd chunk kept), then a 3x3 conv."""

    def __init__(self, channels: int, compress_time: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = FrameConv2d(channels, channels, stride=1, padding=((1, 1), (1, 1)), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        t = x.shape[1]
        if self.compress_time and t > 1:
            if t % 2 == 1:
                x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
            else:
                x = jnp.repeat(x, 2, axis=1)
        return self.conv(x)


def _run_resnets(resnets, h, zq, cache):
    new = {}
    for i, resnet in enumerate(resnets):
        h, new[f"resnet_{i}"] = resnet(h, zq, cache.get(f"resnet_{i}"))
    return h, new


class Encoder3D(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rk = dict(groups=c.norm_num_groups, eps=c.norm_eps, act=c.act_fn, spatial_norm_dim=None, **kw)
        boc = c.block_out_channels
        self.conv_in = CausalConv3d(c.in_channels, boc[0], 3, **kw)
        self.down_blocks = nnx.List()
        cout = boc[0]
        for i in range(len(boc)):
            cin, cout = cout, boc[i]
            block = _Block()
            block.resnets = nnx.List([ResnetBlock3D(cin if j == 0 else cout, cout, **rk)
                                      for j in range(c.layers_per_block)])
            block.downsample = (Downsample3D(cout, i < c.temporal_compress_level, **kw)
                                if i < len(boc) - 1 else None)
            self.down_blocks.append(block)
        self.mid_block = _Block()
        self.mid_block.resnets = nnx.List([ResnetBlock3D(boc[-1], boc[-1], **rk) for _ in range(2)])
        self.norm_out = GroupNorm(c.norm_num_groups, boc[-1], 1e-6, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = CausalConv3d(boc[-1], 2 * c.latent_channels, 3, **kw)

    def __call__(self, x, cache=None):
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, block in enumerate(self.down_blocks):
            h, new[f"down_block_{i}"] = _run_resnets(block.resnets, h, None, cache.get(f"down_block_{i}") or {})
            if block.downsample is not None:
                h = block.downsample(h)
        h, new["mid_block"] = _run_resnets(self.mid_block.resnets, h, None, cache.get("mid_block") or {})
        h = jax.nn.silu(self.norm_out(h))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


class Decoder3D(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rk = dict(groups=c.norm_num_groups, eps=c.norm_eps, act=c.act_fn, spatial_norm_dim=c.latent_channels, **kw)
        rev = tuple(reversed(c.block_out_channels))
        self.conv_in = CausalConv3d(c.latent_channels, rev[0], 3, **kw)
        self.mid_block = _Block()
        self.mid_block.resnets = nnx.List([ResnetBlock3D(rev[0], rev[0], **rk) for _ in range(2)])
        self.up_blocks = nnx.List()
        cout = rev[0]
        for i in range(len(rev)):
            cin, cout = cout, rev[i]
            block = _Block()
            block.resnets = nnx.List([ResnetBlock3D(cin if j == 0 else cout, cout, **rk)
                                      for j in range(c.layers_per_block + 1)])
            block.upsample = Upsample3D(cout, i < c.temporal_compress_level, **kw) if i < len(rev) - 1 else None
            self.up_blocks.append(block)
        self.norm_out = SpatialNorm3D(rev[-1], c.latent_channels, c.norm_num_groups, **kw)
        self.conv_out = CausalConv3d(rev[-1], c.out_channels, 3, **kw)

    def __call__(self, z, cache=None):
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        h, new["mid_block"] = _run_resnets(self.mid_block.resnets, h, z, cache.get("mid_block") or {})
        for i, block in enumerate(self.up_blocks):
            h, new[f"up_block_{i}"] = _run_resnets(block.resnets, h, z, cache.get(f"up_block_{i}") or {})
            if block.upsample is not None:
                h = block.upsample(h)
        h = jax.nn.silu(self.norm_out(h, z))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


class _Block(nnx.Module):
    """A container (down/mid/up block): attributes are set by its owner."""


# --------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------
class AutoencoderKLCogVideoX(nnx.Module):
    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder3D(config, **kw)
        self.decoder = Decoder3D(config, **kw)
        # As in diffusers, these optional convs are sized by out_channels (unused by CogVideoX checkpoints).
        self.quant_conv = PointConv3d(2 * config.out_channels, 2 * config.out_channels, **kw) \
            if config.use_quant_conv else None
        self.post_quant_conv = PointConv3d(config.out_channels, config.out_channels, **kw) \
            if config.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    # ---- one chunk of frames (called under jit) ---------------------------------------------
    def decode_chunk(self, z, cache=None):
        """(B, F, h, w, C) latents of one chunk + the previous chunk's cache -> (frames, new cache)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, cache)

    def encode_chunk(self, x, cache=None):
        """(B, T, H, W, C) frames of one chunk + cache -> (moments (B, F, h, w, 2C), new cache)."""
        h, cache = self.encoder(x, cache)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h, cache

    # ---- public API --------------------------------------------------------------------------
    def decode(self, latents, tiling: "TileSpec | bool | None" = None) -> jax.Array:
        """Latents (B, F, C, h, w), already divided by `scaling_factor` -> frames (B, C, T, H, W).

        Equals diffusers' ``vae.decode(latents.permute(0, 2, 1, 3, 4)).sample``. `tiling` (a `TileSpec`,
        or True for the config's default tiles) decodes spatial tiles as diffusers' ``tiled_decode``
        when the latents are larger than one tile.
        """
        z = jnp.transpose(jnp.asarray(latents), (0, 1, 3, 4, 2))
        graphdef, state = nnx.split(self)
        run = functools.partial(_decode_chunk_jit, graphdef, state)
        spec = _tile_spec(self.config, tiling)
        if spec is not None:
            th, tw = spec.latent_size(self.config)
            if z.shape[2] > th or z.shape[3] > tw:
                out = _tiled(run, z, LATENT_FRAMES_PER_CHUNK, (th, tw), (spec.tile_sample_min_height,
                             spec.tile_sample_min_width), spec)
                return jnp.transpose(out, (0, 4, 1, 2, 3))
        return jnp.transpose(_chunked(run, z, LATENT_FRAMES_PER_CHUNK), (0, 4, 1, 2, 3))

    def encode(self, video, tiling: "TileSpec | bool | None" = None) -> LatentDistribution:
        """Video (B, C, T, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, C_latent, F, h, w).

        Equals diffusers' ``vae.encode(video).latent_dist`` (mean, logvar); with `tiling`, its tiled encode.
        """
        x = jnp.transpose(jnp.asarray(video), (0, 2, 3, 4, 1))
        graphdef, state = nnx.split(self)
        run = functools.partial(_encode_chunk_jit, graphdef, state)
        spec = _tile_spec(self.config, tiling)
        h = None
        if spec is not None:
            th, tw = spec.tile_sample_min_height, spec.tile_sample_min_width
            if x.shape[2] > th or x.shape[3] > tw:
                h = _tiled(run, x, SAMPLE_FRAMES_PER_CHUNK, (th, tw), spec.latent_size(self.config), spec)
        if h is None:
            h = _chunked(run, x, SAMPLE_FRAMES_PER_CHUNK)
        h = jnp.transpose(h, (0, 4, 1, 2, 3))
        mean, logvar = jnp.split(h, 2, axis=1)
        return LatentDistribution(mean, jnp.clip(logvar, -30.0, 20.0))


def _tile_spec(config: VAEConfig, tiling) -> TileSpec | None:
    if tiling is None or tiling is False:
        return None
    if tiling is True:
        return TileSpec.default(config)
    if not isinstance(tiling, TileSpec):
        raise UnlearnError(f"tiling must be a TileSpec, True or None, not {type(tiling).__name__}")
    return tiling


def frame_chunks(num_frames: int, per_chunk: int) -> list[tuple[int, int]]:
    """diffusers' frame batches: `per_chunk` frames each, the first one also takes the remainder."""
    rem = num_frames % per_chunk
    return [(per_chunk * i + (0 if i == 0 else rem), min(per_chunk * (i + 1) + rem, num_frames))
            for i in range(max(num_frames // per_chunk, 1))]


def _chunked(run, x, per_chunk):
    """Runs `run(chunk, cache)` over the frame chunks of x (B, T, H, W, C), carrying the conv cache."""
    cache, outs = None, []
    for start, end in frame_chunks(x.shape[1], per_chunk):
        y, cache = run(x[:, start:end], cache)
        outs.append(y)
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _tiled(run, x, per_chunk, tile_in, tile_out, spec: TileSpec):
    """diffusers' tiled decode/encode on channels-last x (B, T, H, W, C).

    `tile_in` is the tile size of the input (latent for decoding), `tile_out` the size of one tile's
    output; tiles start every int(tile_in * (1 - overlap)) and are blended over int(tile_out * overlap).
    """
    step_h = int(tile_in[0] * (1 - spec.tile_overlap_factor_height))
    step_w = int(tile_in[1] * (1 - spec.tile_overlap_factor_width))
    blend_h = int(tile_out[0] * spec.tile_overlap_factor_height)
    blend_w = int(tile_out[1] * spec.tile_overlap_factor_width)
    keep_h, keep_w = tile_out[0] - blend_h, tile_out[1] - blend_w
    if step_h <= 0 or step_w <= 0:
        raise UnlearnError(f"tiling {spec}: tiles of {tile_in} with this overlap do not advance")
    height, width = x.shape[2], x.shape[3]
    rows = []
    for i in range(0, height, step_h):
        rows.append([_chunked(run, x[:, :, i:i + tile_in[0], j:j + tile_in[1]], per_chunk)
                     for j in range(0, width, step_w)])
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend_h, axis=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend_w, axis=3)
            row[j] = tile  # later tiles blend with this one as blended (diffusers blends in place)
            kept.append(tile[:, :, :keep_h, :keep_w])
        out_rows.append(jnp.concatenate(kept, axis=3))
    return jnp.concatenate(out_rows, axis=2)


# --------------------------------------------------------------------------------------------
# Weight conversion
# --------------------------------------------------------------------------------------------
def _conv_rules(torch_name: str, jax_name: str, transform=CONV3D) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{jax_name}.kernel", transform),
            Rule(f"{torch_name}.bias", f"{jax_name}.bias", IDENTITY)]


def _norm_rules(name: str) -> list[Rule]:
    return [Rule(f"{name}.weight", f"{name}.scale"), Rule(f"{name}.bias", f"{name}.bias")]


def _causal_rules(name: str) -> list[Rule]:
    return _conv_rules(f"{name}.conv", name)


def _spatial_norm_rules(name: str) -> list[Rule]:
    return _norm_rules(f"{name}.norm_layer") + _causal_rules(f"{name}.conv_y") + _causal_rules(f"{name}.conv_b")


def _resnet_rules(name: str, cin: int, cout: int, spatial: bool) -> list[Rule]:
    norm = _spatial_norm_rules if spatial else _norm_rules
    rules = norm(f"{name}.norm1") + _causal_rules(f"{name}.conv1") + norm(f"{name}.norm2") \
        + _causal_rules(f"{name}.conv2")
    if cin != cout:
        rules += _conv_rules(f"{name}.conv_shortcut", f"{name}.conv_shortcut")
    return rules


def vae_rule_table(config: VAEConfig) -> RuleTable:
    """Every tensor of diffusers' AutoencoderKLCogVideoX for `config`, generated from the block structure."""
    boc = config.block_out_channels
    n = len(boc)
    rules: list[Rule] = []
    # encoder
    rules += _causal_rules("encoder.conv_in")
    cout = boc[0]
    for i in range(n):
        cin, cout = cout, boc[i]
        for j in range(config.layers_per_block):
            rules += _resnet_rules(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, False)
        if i < n - 1:
            rules += _conv_rules(f"encoder.down_blocks.{i}.downsamplers.0.conv",
                                 f"encoder.down_blocks.{i}.downsample.conv", CONV2D)
    for j in range(2):
        rules += _resnet_rules(f"encoder.mid_block.resnets.{j}", boc[-1], boc[-1], False)
    rules += _norm_rules("encoder.norm_out") + _causal_rules("encoder.conv_out")
    # decoder
    rev = tuple(reversed(boc))
    rules += _causal_rules("decoder.conv_in")
    for j in range(2):
        rules += _resnet_rules(f"decoder.mid_block.resnets.{j}", rev[0], rev[0], True)
    cout = rev[0]
    for i in range(n):
        cin, cout = cout, rev[i]
        for j in range(config.layers_per_block + 1):
            rules += _resnet_rules(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, True)
        if i < n - 1:
            rules += _conv_rules(f"decoder.up_blocks.{i}.upsamplers.0.conv",
                                 f"decoder.up_blocks.{i}.upsample.conv", CONV2D)
    rules += _spatial_norm_rules("decoder.norm_out") + _causal_rules("decoder.conv_out")
    if config.use_quant_conv:
        rules += _conv_rules("quant_conv", "quant_conv")
    if config.use_post_quant_conv:
        rules += _conv_rules("post_quant_conv", "post_quant_conv")
    return RuleTable(rules, num_layers=0, family=FAMILY)


def param_shapes(config: VAEConfig, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """Dotted parameter path -> shape/dtype of the JAX model, without allocating it."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: AutoencoderKLCogVideoX(config, dtype=dtype, param_dtype=dtype,
                                                                 rngs=nnx.Rngs(0)))
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


# --------------------------------------------------------------------------------------------
# Loading a diffusers folder
# --------------------------------------------------------------------------------------------
def resolve_vae_folder(path: str | Path) -> Path:
    """A diffusers VAE folder, or a pipeline folder (its `vae/`); other model families are refused."""
    path = Path(path)
    if not path.is_dir():
        raise UnlearnError(f"{path}: no such folder")
    if (path / "config.json").exists():
        cls = read_json_object(path / "config.json").get("_class_name")
        if cls != CLASS_NAME:
            raise ModelFamilyError(f"{path}: holds a {cls or 'unknown'} model, not a CogVideoX VAE ({CLASS_NAME})")
        return path
    if (path / "model_index.json").exists():
        entry = read_json_object(path / "model_index.json").get("vae")
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if cls != CLASS_NAME:
            pipe = read_json_object(path / "model_index.json").get("_class_name", "pipeline")
            raise ModelFamilyError(f"{path}: a {pipe} folder whose VAE is {cls or 'absent'}, not {CLASS_NAME}")
        return resolve_vae_folder(path / "vae")
    if (path / "vae" / "config.json").exists():
        return resolve_vae_folder(path / "vae")
    raise UnlearnError(f"{path}: neither a diffusers VAE folder (config.json) nor a pipeline folder "
                       "(model_index.json)")


def load_vae(path: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None) -> AutoencoderKLCogVideoX:
    """Reads a diffusers CogVideoX VAE (its folder or a pipeline folder) into the JAX model.

    `dtype` sets parameters and computation (norms always run in fp32); None keeps the
    checkpoint's floating dtype. With a `mesh`, parameters are replicated over it.
    """
    folder = resolve_vae_folder(path)
    config = VAEConfig.from_json(folder / "config.json")
    reader = SafetensorsReader(folder, prefer=WEIGHTS_NAME)
    try:
        if dtype is None:
            floats = [reader.dtype(k) for k in reader.keys() if np.issubdtype(reader.dtype(k), np.floating)
                      or reader.dtype(k).name == "bfloat16"]
            dtype = floats[0] if floats else np.dtype(np.float32)
            if dtype == np.float64:
                dtype = np.dtype(np.float32)
        dtype = jnp.dtype(dtype)
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: AutoencoderKLCogVideoX(config, dtype=dtype, param_dtype=dtype,
                                                                     rngs=nnx.Rngs(0)))
        # the VAE is small next to the transformer: replicated over the mesh
        return load_into(abstract, reader, vae_rule_table(config), str(folder), dtype=np.dtype(dtype), mesh=mesh,
                         replicate=True)
    finally:
        reader.close()
