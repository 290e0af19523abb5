"""The HunyuanVideo video VAE (diffusers' ``AutoencoderKLHunyuanVideo``) as a Flax NNX model.

The computation follows diffusers step by step, including the parts that make results depend on
how a video is cut into pieces:

* every convolution is causal in time and pads by *repeating edges*: the first frame is repeated
  twice in front of a 3x3x3 kernel, border pixels once on every side; there is no feature cache,
  each piece of video is processed on its own from its own first frame;
* the time downsamplers (stride 2 over the padded frames) keep the first frame apart, so the first
  latent frame stands for one video frame and every other one for four; the time upsamplers
  repeat every frame but the first twice;
* group norms take their statistics over *all* frames of the piece (and the mid-block attention
  sees all of them), so pieces are never streamed frame by frame;
* the mid blocks' attention is single-headed over all channels with diffusers' causal frame mask
  (`prepare_causal_attention_mask`: a token attends to every token of its own and earlier frames);
* like diffusers, latents of more than ``tile_sample_min_num_frames / 4`` frames (videos of more
  than ``tile_sample_min_num_frames`` frames) are always processed in overlapping pieces of frames
  blended linearly in time, with or without tiling (16 / 12 frames by default); `tiling`
  (`HunyuanTileSpec`, diffusers' ``enable_tiling`` arguments) also cuts each piece into overlapping
  spatial tiles blended at their seams;
* `decode` does not clamp its output (diffusers does not; the pipeline's video processor does).

What bounds the memory of a long video, e.g. 129 frames at 720x1280 (33 x 90 x 160 latents): the
decoder runs on one piece of at most ``tile_sample_min_num_frames / 4 + 1`` latent frames (5 by
default: 17 video frames) at a time, as one compiled call; with spatial tiling that piece is one
tile of ``tile_sample_min_height x tile_sample_min_width`` pixels (256 x 256). The decoder's
activations never hold more than that piece, so they do not grow with the video's length; what
grows is only the decoded output (3 channels, kept until it is blended, as diffusers keeps it).
XLA's CPU buffer assignment for the published VAE in bf16 puts one piece at about 43 GiB of
activations at 720x1280 without spatial tiling, 3 GiB for a 256x256 tile. The mid-block attention
runs one query frame at a time against the keys of its own and earlier frames, so it never builds
the (S, S) mask either.

Arrays are channels-last inside the model, (B, T, H, W, C). The public `decode` / `encode` take and
return diffusers' layout (B, C, F, H, W). One compilation per piece shape: for a long video the
pieces share a shape, except the last ones and the tiles at the bottom and right edges.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.conversion import IDENTITY, LINEAR, Rule, RuleTable, SafetensorsReader, flatten_in, load_into
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.jsonfiles import read_json_object
from unlearn_jax.models import layers
from unlearn_jax.models.video_vae import CONV3D, LatentDistribution, _blend, _decode_chunk_jit, _encode_chunk_jit

FAMILY = "HunyuanVideo VAE"
CLASS_NAME = "AutoencoderKLHunyuanVideo"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DOWN_BLOCK = "HunyuanVideoDownBlock3D"
UP_BLOCK = "HunyuanVideoUpBlock3D"
NORM_EPS = 1e-6  # every group norm of the model (diffusers hard-codes resnet_eps=1e-6)

# diffusers' get_activation names for act_fn (the blocks' nonlinearity; conv_act is always SiLU)
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HunyuanVAEConfig:
    """The fields of diffusers' ``vae/config.json`` for ``AutoencoderKLHunyuanVideo`` (same names and defaults,
    which are the published HunyuanVideo VAE's)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4
    up_block_types: tuple[str, ...] = (UP_BLOCK,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True

    def __post_init__(self):
        # lists (a config built by hand) become tuples: the config is part of the jit-static graph
        for f in ("down_block_types", "up_block_types", "block_out_channels"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent along height and width."""
        return self.spatial_compression_ratio

    @property
    def temporal_ratio(self) -> int:
        """Video frames per latent frame (after the first, which stands for one)."""
        return self.temporal_compression_ratio

    def decoded_frames(self, latent_frames: int) -> int:
        """Video frames `decode` makes of `latent_frames` latent frames."""
        return 1 + self.temporal_ratio * (latent_frames - 1)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames `encode` makes of `num_frames` video frames (the pipeline's prepare_latents count)."""
        return (num_frames - 1) // self.temporal_ratio + 1

    # ---- checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        w = "HunyuanVideo VAE config"
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "spatial_compression_ratio", "temporal_compression_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UnlearnError(f"{w}: {name} = {v!r} must be a positive integer")
        boc = self.block_out_channels
        if len(boc) < 3 or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in boc):
            raise UnlearnError(f"{w}: block_out_channels = {list(boc)} must list at least 3 positive integers "
                               "(two levels compress time, and the last level never does)")
        for name, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = getattr(self, name)
            if len(types) != len(boc) or any(t != kind for t in types):
                raise UnlearnError(f"{w}: {name} = {list(types)} must be {len(boc)} x {kind!r} (one per "
                                   "block_out_channels entry; diffusers has no other block type)")
        bad = [c for c in boc if c % self.norm_num_groups]
        if bad:
            raise UnlearnError(f"{w}: block_out_channels {bad} are not divisible by norm_num_groups = "
                               f"{self.norm_num_groups}")
        if not isinstance(self.mid_block_add_attention, bool):
            raise UnlearnError(f"{w}: mid_block_add_attention = {self.mid_block_add_attention!r} must be true or false")
        if self.act_fn not in ACTIVATIONS:
            raise UnlearnError(f"{w}: act_fn = {self.act_fn!r} is not one of {sorted(ACTIVATIONS)}")
        if not isinstance(self.scaling_factor, (int, float)) or isinstance(self.scaling_factor, bool) \
                or not self.scaling_factor > 0:
            raise UnlearnError(f"{w}: scaling_factor = {self.scaling_factor!r} must be a positive number")
        if self.temporal_compression_ratio != 4:
            raise UnlearnError(f"{w}: temporal_compression_ratio = {self.temporal_compression_ratio}; diffusers' "
                               "HunyuanVideo decoder supports only 4")
        r = self.spatial_compression_ratio
        if r & (r - 1):
            raise UnlearnError(f"{w}: spatial_compression_ratio = {r} must be a power of two")
        built = 2 ** sum(space for space, _ in _levels(self))
        if built != r:
            raise UnlearnError(f"{w}: spatial_compression_ratio = {r} but {len(boc)} blocks compress space "
                               f"{built}x at most; fix the config")

    # ---- dict / JSON ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "HunyuanVideo VAE config") -> "HunyuanVAEConfig":
        name = d.get("_class_name")
        if name is not None and name != CLASS_NAME:
            raise ModelFamilyError(f"{where}: a {name} config, not a HunyuanVideo VAE ({CLASS_NAME})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
        if unknown:
            raise UnlearnError(f"{where}: options {unknown} are not fields of diffusers' {CLASS_NAME}; remove them")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
        try:
            return cls(**kw)
        except TypeError as e:
            raise UnlearnError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "HunyuanVAEConfig":
        return cls.from_dict(read_json_object(path, "HunyuanVideo VAE config"), str(path))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"_class_name": CLASS_NAME}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


@dataclasses.dataclass(frozen=True)
class HunyuanTileSpec:
    """diffusers' ``AutoencoderKLHunyuanVideo.enable_tiling`` arguments (video pixels / frames; its defaults).

    The frame fields apply with or without spatial tiling, as in diffusers (whose frame-wise
    decoding and encoding are always on)."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_min_num_frames: int = 16
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192
    tile_sample_stride_num_frames: int = 12

    def check(self, config: HunyuanVAEConfig) -> None:
        # diffusers accepts any values, but strides that are not whole latents misplace the tiles
        # (the kept pixels no longer line up with the latents they came from), and a stride above the
        # tile size leaves holes: both are refused
        for axis, ratio, unit in (("height", config.spatial_ratio, "spatial"), ("width", config.spatial_ratio,
                                  "spatial"), ("num_frames", config.temporal_ratio, "temporal")):
            size, stride = getattr(self, f"tile_sample_min_{axis}"), getattr(self, f"tile_sample_stride_{axis}")
            for v in (size, stride):
                if not isinstance(v, int) or isinstance(v, bool) or v < ratio or v % ratio:
                    raise UnlearnError(f"tiling {self}: {axis} sizes must be positive multiples of the VAE's "
                                       f"{ratio}x {unit} compression, not {v!r}")
            if stride > size:
                raise UnlearnError(f"tiling {self}: the {axis} stride {stride} exceeds the tile size {size}")


# --------------------------------------------------------------------------------------------
# Block structure (shared by the model, its checks and its rule table)
# --------------------------------------------------------------------------------------------
def _levels(c: HunyuanVAEConfig):
    """For each of the n levels (encoder order): (compresses space, compresses time), diffusers' rule
    for temporal_compression_ratio 4: space on the first log2(ratio) levels, time on the two levels
    before the last."""
    n = len(c.block_out_channels)
    space = int(math.log2(c.spatial_compression_ratio))
    return [(i < space, n - 3 <= i < n - 1) for i in range(n)]


def _down_plan(c: HunyuanVAEConfig):
    """One (cin, cout, downsampler stride (t, h, w) or None) per encoder down block."""
    plan, cout = [], c.block_out_channels[0]
    for i, (space, time) in enumerate(_levels(c)):
        cin, cout = cout, c.block_out_channels[i]
        stride = (2 if time else 1, 2 if space else 1, 2 if space else 1) if space or time else None
        plan.append((cin, cout, stride))
    return plan


def _up_plan(c: HunyuanVAEConfig):
    """One (cin, cout, upsampling factor (t, h, w) or None) per decoder up block; the decoder's level
    i mirrors the encoder's rule on the reversed channels (space on the first levels, time on the
    two before the last)."""
    rev = tuple(reversed(c.block_out_channels))
    plan, cout = [], rev[0]
    for i, (space, time) in enumerate(_levels(c)):
        cin, cout = cout, rev[i]
        factor = (2 if time else 1, 2 if space else 1, 2 if space else 1) if space or time else None
        plan.append((cin, cout, factor))
    return plan


# --------------------------------------------------------------------------------------------
# Building blocks (channels-last: (B, T, H, W, C))
# --------------------------------------------------------------------------------------------
_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_CONV_AXES3 = (None, None, None, "vae_in", "vae_out")


def _param(init, rngs: nnx.Rngs, shape, dtype, axes):
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


class CausalConv3d(nnx.Module):
    """diffusers' HunyuanVideoCausalConv3d with a k x k x k kernel: edges replicated, k - 1 frames in
    front (none behind), k // 2 pixels on every side, then an unpadded strided convolution."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride=(1, 1, 1), *, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = _param(nnx.initializers.lecun_normal(), rngs, (k, k, k, cin, cout), param_dtype, _CONV_AXES3)
        self.bias = _param(nnx.initializers.zeros_init(), rngs, (cout,), param_dtype, ("vae_out",))
        self.k = k
        self.stride = tuple(stride)
        self.dtype = dtype

    def __call__(self, x):
        k = self.k
        x = jnp.pad(x, ((0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                         window_strides=self.stride, padding="VALID", dimension_numbers=_DN3)
        return y + self.bias[...].astype(self.dtype)


def _pointwise(cin: int, cout: int, *, dtype, param_dtype, rngs) -> layers.Dense:
    """A 1x1x1 convolution (no padding to replicate): a dense layer over channels, kernel (I, O)."""
    return layers.Dense(cin, cout, ("vae_in", "vae_out"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm (affine) on channels-last arrays: statistics per sample and group over every
    position (all frames included), two-pass variance in fp32; parameters stay fp32."""

    def __init__(self, dim: int, groups: int, *, rngs: nnx.Rngs):
        self.scale = _param(nnx.initializers.ones_init(), rngs, (dim,), jnp.float32, ("vae_norm",))
        self.bias = _param(nnx.initializers.zeros_init(), rngs, (dim,), jnp.float32, ("vae_norm",))
        self.groups = groups

    def __call__(self, x):
        dtype, c = x.dtype, x.shape[-1]
        xf = x.astype(jnp.float32).reshape(x.shape[0], -1, self.groups, c // self.groups)
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        xc = xf - mean
        var = jnp.mean(jnp.square(xc), axis=(1, 3), keepdims=True)
        y = (xc * jax.lax.rsqrt(var + NORM_EPS)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class ResnetBlock(nnx.Module):
    """HunyuanVideoResnetBlockCausal3D: group norm, activation, causal conv, twice, plus a (1x1x1) shortcut."""

    def __init__(self, cin: int, cout: int, c: HunyuanVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(cin, c.norm_num_groups, rngs=rngs)
        self.conv1 = CausalConv3d(cin, cout, **kw)
        self.norm2 = GroupNorm(cout, c.norm_num_groups, rngs=rngs)
        self.conv2 = CausalConv3d(cout, cout, **kw)
        self.conv_shortcut = _pointwise(cin, cout, **kw) if cin != cout else None
        self.act_fn = c.act_fn

    def __call__(self, x):
        act = ACTIVATIONS[self.act_fn]
        y = self.conv1(act(self.norm1(x)))
        y = self.conv2(act(self.norm2(y)))  # dropout: inference, none
        return y + (x if self.conv_shortcut is None else self.conv_shortcut(x))


def _frame_causal_attention(q, k, v, frames: int, impl: str):
    """Attention under diffusers' causal frame mask on (B, S, N, H) tokens ordered frame by frame.

    A token of frame f sees every token of frames 0..f. Each query frame attends, unmasked, to the
    keys of frames 0..f: the masked keys weigh exp(-inf) = 0 in diffusers' softmax, so the result
    is the same, and no (S, S) mask or logits block is built."""
    n = q.shape[1] // frames
    outs = [layers.attention(q[:, f * n:(f + 1) * n], k[:, :(f + 1) * n], v[:, :(f + 1) * n], impl)
            for f in range(frames)]
    return outs[0] if frames == 1 else jnp.concatenate(outs, axis=1)


class MidAttention(nnx.Module):
    """The mid blocks' diffusers Attention: group norm, one head over all channels, the causal frame
    mask, output projection and a residual connection."""

    def __init__(self, dim: int, groups: int, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(dim, groups, rngs=rngs)
        self.to_q = _pointwise(dim, dim, **kw)
        self.to_k = _pointwise(dim, dim, **kw)
        self.to_v = _pointwise(dim, dim, **kw)
        self.to_out = _pointwise(dim, dim, **kw)
        self.attention = attention

    def __call__(self, x):
        b, t, h, w, c = x.shape
        hs = self.norm(x).reshape(b, t * h * w, 1, c)  # diffusers' token order: frame, row, column
        out = _frame_causal_attention(self.to_q(hs), self.to_k(hs), self.to_v(hs), t, self.attention)
        return self.to_out(out).reshape(x.shape) + x


class MidBlock(nnx.Module):
    """HunyuanVideoMidBlock3D: resnet, (attention,) resnet."""

    def __init__(self, dim: int, c: HunyuanVAEConfig, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(dim, dim, c, **kw) for _ in range(2)])
        self.attentions = nnx.List([MidAttention(dim, c.norm_num_groups, attention=attention, **kw)]
                                   if c.mid_block_add_attention else [])

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


def _upsample_nearest(x, factor):
    """HunyuanVideoUpsampleCausal3D's interpolation: the first frame is enlarged in space only, the
    others in time too (each repeated `factor[0]` times), nearest neighbour at integer factors."""
    ft, fh, fw = factor

    def space(y):
        return jnp.repeat(jnp.repeat(y, fh, axis=2), fw, axis=3)

    first = space(x[:, :1])
    if x.shape[1] == 1:
        return first
    return jnp.concatenate([first, jnp.repeat(space(x[:, 1:]), ft, axis=1)], axis=1)


class Upsample(nnx.Module):
    def __init__(self, dim: int, factor, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = CausalConv3d(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.factor = tuple(factor)

    def __call__(self, x):
        return self.conv(_upsample_nearest(x, self.factor))


class DownBlock(nnx.Module):
    """HunyuanVideoDownBlock3D: resnets, then a strided causal conv (its only downsampler) if any."""

    def __init__(self, cin: int, cout: int, stride, c: HunyuanVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, c, **kw)
                                 for j in range(c.layers_per_block)])
        self.downsampler = CausalConv3d(cout, cout, stride=stride, **kw) if stride is not None else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.downsampler is None else self.downsampler(x)


class UpBlock(nnx.Module):
    """HunyuanVideoUpBlock3D: layers_per_block + 1 resnets, then an upsampler if any."""

    def __init__(self, cin: int, cout: int, factor, c: HunyuanVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, c, **kw)
                                 for j in range(c.layers_per_block + 1)])
        self.upsampler = Upsample(cout, factor, **kw) if factor is not None else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.upsampler is None else self.upsampler(x)


class Encoder(nnx.Module):
    def __init__(self, c: HunyuanVAEConfig, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc = c.block_out_channels
        self.conv_in = CausalConv3d(c.in_channels, boc[0], **kw)
        self.down_blocks = nnx.List([DownBlock(cin, cout, stride, c, **kw) for cin, cout, stride in _down_plan(c)])
        self.mid_block = MidBlock(boc[-1], c, attention=attention, **kw)
        self.norm_out = GroupNorm(boc[-1], c.norm_num_groups, rngs=rngs)
        self.conv_out = CausalConv3d(boc[-1], 2 * c.latent_channels, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, c: HunyuanVAEConfig, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc = c.block_out_channels
        self.conv_in = CausalConv3d(c.latent_channels, boc[-1], **kw)
        self.mid_block = MidBlock(boc[-1], c, attention=attention, **kw)
        self.up_blocks = nnx.List([UpBlock(cin, cout, factor, c, **kw) for cin, cout, factor in _up_plan(c)])
        self.norm_out = GroupNorm(boc[0], c.norm_num_groups, rngs=rngs)
        self.conv_out = CausalConv3d(boc[0], c.out_channels, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


# --------------------------------------------------------------------------------------------
# Pieces of frames and tiles (diffusers' _temporal_tiled_* / tiled_*), on channels-last arrays
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("sizes",))
def _crop(x, starts, sizes):
    """x[s : s + n] along every axis; the starts are traced, so there is one compilation per crop size,
    not one per position (which eager slicing would cost)."""
    return jax.lax.dynamic_slice(x, starts, sizes)


def _frame_pieces(run, x, *, size: int, stride: int, blend: int, keep: int, total: int):
    """`run` over pieces of `size` frames of x (B, T, ...) starting every `stride` frames, joined by
    `_join_pieces`."""
    t = x.shape[1]
    outs = [run(_crop(x, (0, start) + (0,) * (x.ndim - 2), (x.shape[0], min(size, t - start)) + x.shape[2:]))
            for start in range(0, t, stride)]
    return _join_pieces(outs, blend=blend, keep=keep, total=total)


@functools.partial(jax.jit, static_argnames=("blend", "keep", "total"))
def _join_pieces(outs, *, blend: int, keep: int, total: int):
    """diffusers' frame-wise join: every piece after the first drops its first output frame (it restarts
    causally from the frame the previous piece's kept part ends on) and blends its first `blend` frames
    with the previous piece's (already blended) last ones; each keeps `keep` frames (the first piece one
    more); the whole is cut to `total` frames."""
    outs = [outs[0]] + [y[:, 1:] for y in outs[1:]]
    kept = [outs[0][:, :keep + 1]]
    for n in range(1, len(outs)):
        outs[n] = _blend(outs[n - 1], outs[n], blend, axis=1)  # diffusers blends in place
        kept.append(outs[n][:, :keep])
    return jnp.concatenate(kept, axis=1)[:, :total]


def _tiles(run, x, *, tile, stride, blend, keep, size):
    """`run` over spatial tiles of `tile` (rows, columns) of x (B, T, H, W, C) starting every `stride`,
    joined by `_join_tiles`."""
    b, t, height, width, c = x.shape
    rows = [[run(_crop(x, (0, 0, i, j, 0), (b, t, min(tile[0], height - i), min(tile[1], width - j), c)))
             for j in range(0, width, stride[1])] for i in range(0, height, stride[0])]
    return _join_tiles(rows, blend=blend, keep=keep, size=size)


@functools.partial(jax.jit, static_argnames=("blend", "keep", "size"))
def _join_tiles(rows, *, blend, keep, size):
    """diffusers' tile join: each tile blended with the (already blended) tiles above and to the left
    over `blend` output rows / columns, cut to `keep`; the whole cut to `size`."""
    rows = [list(row) for row in rows]
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


def _tile_spec(config: HunyuanVAEConfig, tiling) -> tuple[HunyuanTileSpec, bool]:
    """(the frame / tile sizes, whether spatial tiling is on) for a `tiling` argument."""
    if tiling is None or tiling is False:
        return HunyuanTileSpec(), False
    if tiling is True:
        spec = HunyuanTileSpec()
    elif isinstance(tiling, HunyuanTileSpec):
        spec = tiling
    elif isinstance(tiling, Mapping):
        try:
            spec = HunyuanTileSpec(**tiling)
        except TypeError as e:
            raise UnlearnError(f"tiling {dict(tiling)}: {e}") from None
    else:
        raise UnlearnError(f"tiling must be a HunyuanTileSpec, a dict of its fields, True, False or None, "
                           f"not {type(tiling).__name__}")
    spec.check(config)
    return spec, True


# --------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------
class AutoencoderKLHunyuanVideo(nnx.Module):
    """`dtype`: computation; `param_dtype`: weights (group norms stay fp32); `attention`: the mid
    blocks' attention path (`layers.attention`: reference | chunked | xla | cudnn | auto)."""

    def __init__(self, config: HunyuanVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "reference", rngs: nnx.Rngs):
        if attention not in layers.ATTENTION_IMPLS:
            raise UnlearnError(f"attention = {attention!r} is not one of {layers.ATTENTION_IMPLS}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, attention=attention, **kw)
        self.quant_conv = _pointwise(2 * config.latent_channels, 2 * config.latent_channels, **kw)
        self.post_quant_conv = _pointwise(config.latent_channels, config.latent_channels, **kw)
        self.decoder = Decoder(config, attention=attention, **kw)

    # ---- one piece of frames (called under jit; no cache: pieces are independent) --------------
    def decode_chunk(self, z, cache=None):
        """(B, F, h, w, latent_channels) latents -> ((B, 1 + 4 (F - 1), H, W, C) frames, None)."""
        return self.decoder(self.post_quant_conv(z)), None

    def encode_chunk(self, x, cache=None):
        """(B, T, H, W, C) frames -> ((B, F, h, w, 2 latent_channels) moments, None)."""
        return self.quant_conv(self.encoder(x)), None

    # ---- the pipelines' latent scaling -------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def scale(self, z) -> jax.Array:
        """Posterior latents -> the transformer's: z * scaling_factor, as HunyuanVideoImageToVideoPipeline
        scales ``vae.encode(image).latent_dist.mode()``. (HunyuanVideoPipeline's prepare_latents draws
        unit Gaussian noise directly in the transformer's space; it never encodes.)"""
        z = jnp.asarray(z)  # in fp32, then rounded: torch keeps a Python scalar in full precision too
        return (z.astype(jnp.float32) * self.config.scaling_factor).astype(z.dtype)

    def unscale(self, z) -> jax.Array:
        """The transformer's latents -> what `decode` takes: z / scaling_factor, as HunyuanVideoPipeline
        divides them before ``vae.decode``."""
        z = jnp.asarray(z)
        return (z.astype(jnp.float32) / self.config.scaling_factor).astype(z.dtype)

    # the names the Wan VAE gives its latent normalisation, so that callers can treat both alike
    normalize = scale
    denormalize = unscale

    # ---- public API --------------------------------------------------------------------------
    def decode(self, latents, tiling: "HunyuanTileSpec | Mapping | bool | None" = None) -> jax.Array:
        """Latents (B, latent_channels, F, h, w), already unscaled -> video (B, C, 1 + 4 (F - 1), 8h, 8w).

        Equals diffusers' ``vae.decode(latents).sample`` (frame-wise in pieces beyond 4 latent frames,
        as diffusers always does); with `tiling` (a `HunyuanTileSpec`, a dict of its fields, or True for
        diffusers' defaults) its decode after ``enable_tiling(...)``. Not clamped, as in diffusers.
        """
        c = self.config
        shape = tuple(jnp.shape(latents))
        if len(shape) != 5 or shape[1] != c.latent_channels:
            raise UnlearnError(f"HunyuanVideo VAE decode: latents of shape {shape} are not "
                               f"(B, {c.latent_channels}, F, h, w)")
        spec, spatial = _tile_spec(c, tiling)
        z = jnp.transpose(jnp.asarray(latents), (0, 2, 3, 4, 1))
        graphdef, state = nnx.split(self)
        r, tr = c.spatial_ratio, c.temporal_ratio
        tile = (spec.tile_sample_min_height // r, spec.tile_sample_min_width // r)

        def piece(zp):
            if spatial and (zp.shape[2] > tile[0] or zp.shape[3] > tile[1]):
                return _tiles(lambda t: _decode_chunk_jit(graphdef, state, t, None)[0], zp, tile=tile,
                              stride=(spec.tile_sample_stride_height // r, spec.tile_sample_stride_width // r),
                              blend=(spec.tile_sample_min_height - spec.tile_sample_stride_height,
                                     spec.tile_sample_min_width - spec.tile_sample_stride_width),
                              keep=(spec.tile_sample_stride_height, spec.tile_sample_stride_width),
                              size=(zp.shape[2] * r, zp.shape[3] * r))
            return _decode_chunk_jit(graphdef, state, zp, None)[0]

        frames = spec.tile_sample_min_num_frames // tr
        if z.shape[1] > frames:
            out = _frame_pieces(piece, z, size=frames + 1, stride=spec.tile_sample_stride_num_frames // tr,
                                blend=spec.tile_sample_min_num_frames - spec.tile_sample_stride_num_frames,
                                keep=spec.tile_sample_stride_num_frames, total=c.decoded_frames(z.shape[1]))
        else:
            out = piece(z)
        return jnp.transpose(out, (0, 4, 1, 2, 3))

    def encode(self, video, tiling: "HunyuanTileSpec | Mapping | bool | None" = None) -> LatentDistribution:
        """Video (B, C, T, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, latent_channels, F, h, w).

        Equals diffusers' ``vae.encode(video).latent_dist`` (frame-wise in pieces beyond 16 frames, as
        diffusers always does); with `tiling`, its encode after ``enable_tiling(...)``. Scale the
        posterior's mode (or a sample) with `scale` for the transformer.
        """
        c = self.config
        shape = tuple(jnp.shape(video))
        if len(shape) != 5 or shape[1] != c.in_channels:
            raise UnlearnError(f"HunyuanVideo VAE encode: a video of shape {shape} is not (B, {c.in_channels}, "
                               "T, H, W)")
        spec, spatial = _tile_spec(c, tiling)
        x = jnp.transpose(jnp.asarray(video), (0, 2, 3, 4, 1))
        graphdef, state = nnx.split(self)
        r, tr = c.spatial_ratio, c.temporal_ratio
        tile = (spec.tile_sample_min_height, spec.tile_sample_min_width)
        height, width = x.shape[2], x.shape[3]

        def piece(xp):
            if spatial and (height > tile[0] or width > tile[1]):
                return _tiles(lambda t: _encode_chunk_jit(graphdef, state, t, None)[0], xp, tile=tile,
                              stride=(spec.tile_sample_stride_height, spec.tile_sample_stride_width),
                              blend=((spec.tile_sample_min_height - spec.tile_sample_stride_height) // r,
                                     (spec.tile_sample_min_width - spec.tile_sample_stride_width) // r),
                              keep=(spec.tile_sample_stride_height // r, spec.tile_sample_stride_width // r),
                              size=(height // r, width // r))
            return _encode_chunk_jit(graphdef, state, xp, None)[0]

        frames = spec.tile_sample_min_num_frames
        if x.shape[1] > frames:
            h = _frame_pieces(piece, x, size=frames + 1, stride=spec.tile_sample_stride_num_frames,
                              blend=(frames - spec.tile_sample_stride_num_frames) // tr,
                              keep=spec.tile_sample_stride_num_frames // tr, total=c.latent_frames(x.shape[1]))
        else:
            h = piece(x)
        h = jnp.transpose(h, (0, 4, 1, 2, 3))
        mean, logvar = jnp.split(h, 2, axis=1)
        return LatentDistribution(mean, jnp.clip(logvar, -30.0, 20.0))


def build_vae(config: HunyuanVAEConfig, seed: int = 0, *, dtype=jnp.float32, param_dtype=None,
              attention: str = "reference") -> AutoencoderKLHunyuanVideo:
    """A randomly initialised model (tests); parameters keep their logical axes as metadata only."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return AutoencoderKLHunyuanVideo(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                         rngs=nnx.Rngs(seed))


def abstract_vae(config: HunyuanVAEConfig, *, dtype=jnp.float32, param_dtype=None,
                 attention: str = "reference") -> AutoencoderKLHunyuanVideo:
    """The model with shapes only (no memory)."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: AutoencoderKLHunyuanVideo(config, dtype=dtype, param_dtype=param_dtype,
                                                                attention=attention, rngs=nnx.Rngs(0)))


def param_shapes(config: HunyuanVAEConfig, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """Dotted parameter path -> shape/dtype of the JAX model, without allocating it."""
    abstract = abstract_vae(config, dtype=dtype)
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


# --------------------------------------------------------------------------------------------
# Weight conversion
# --------------------------------------------------------------------------------------------
def _causal(torch_name: str, jax_name: str) -> list[Rule]:
    """A HunyuanVideoCausalConv3d (its nn.Conv3d is `.conv`) as a CausalConv3d."""
    return [Rule(f"{torch_name}.conv.weight", f"{jax_name}.kernel", CONV3D),
            Rule(f"{torch_name}.conv.bias", f"{jax_name}.bias", IDENTITY)]


def _pointwise_rules(torch_conv: str, jax_name: str, cin: int) -> list[Rule]:
    """A 1x1x1 nn.Conv3d (O, I, 1, 1, 1) as a dense kernel (I, O)."""
    return [Rule(f"{torch_conv}.weight", f"{jax_name}.kernel", flatten_in((cin, 1, 1, 1))),
            Rule(f"{torch_conv}.bias", f"{jax_name}.bias", IDENTITY)]


def _norm(torch_name: str, jax_name: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{jax_name}.scale", IDENTITY),
            Rule(f"{torch_name}.bias", f"{jax_name}.bias", IDENTITY)]


def _resnet_rules(name: str, cin: int, cout: int) -> list[Rule]:
    rules = (_norm(f"{name}.norm1", f"{name}.norm1") + _causal(f"{name}.conv1", f"{name}.conv1")
             + _norm(f"{name}.norm2", f"{name}.norm2") + _causal(f"{name}.conv2", f"{name}.conv2"))
    if cin != cout:
        rules += _pointwise_rules(f"{name}.conv_shortcut.conv", f"{name}.conv_shortcut", cin)
    return rules


def _mid_rules(name: str, dim: int, attention: bool) -> list[Rule]:
    rules = _resnet_rules(f"{name}.resnets.0", dim, dim) + _resnet_rules(f"{name}.resnets.1", dim, dim)
    if attention:
        a = f"{name}.attentions.0"
        rules += _norm(f"{a}.group_norm", f"{a}.norm")
        for torch_proj, jax_proj in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
            rules += [Rule(f"{a}.{torch_proj}.weight", f"{a}.{jax_proj}.kernel", LINEAR),
                      Rule(f"{a}.{torch_proj}.bias", f"{a}.{jax_proj}.bias", IDENTITY)]
    return rules


def vae_rule_table(config: HunyuanVAEConfig) -> RuleTable:
    """Every tensor of diffusers' AutoencoderKLHunyuanVideo for `config`, generated from the block structure."""
    c = config
    boc = c.block_out_channels
    rules = _causal("encoder.conv_in", "encoder.conv_in")
    for i, (cin, cout, stride) in enumerate(_down_plan(c)):
        name = f"encoder.down_blocks.{i}"
        for j in range(c.layers_per_block):
            rules += _resnet_rules(f"{name}.resnets.{j}", cin if j == 0 else cout, cout)
        if stride is not None:
            rules += _causal(f"{name}.downsamplers.0.conv", f"{name}.downsampler")
    rules += _mid_rules("encoder.mid_block", boc[-1], c.mid_block_add_attention)
    rules += _norm("encoder.conv_norm_out", "encoder.norm_out") + _causal("encoder.conv_out", "encoder.conv_out")
    rules += _pointwise_rules("quant_conv", "quant_conv", 2 * c.latent_channels)
    rules += _pointwise_rules("post_quant_conv", "post_quant_conv", c.latent_channels)
    rules += _causal("decoder.conv_in", "decoder.conv_in")
    rules += _mid_rules("decoder.mid_block", boc[-1], c.mid_block_add_attention)
    for i, (cin, cout, factor) in enumerate(_up_plan(c)):
        name = f"decoder.up_blocks.{i}"
        for j in range(c.layers_per_block + 1):
            rules += _resnet_rules(f"{name}.resnets.{j}", cin if j == 0 else cout, cout)
        if factor is not None:
            rules += _causal(f"{name}.upsamplers.0.conv", f"{name}.upsampler.conv")
    rules += _norm("decoder.conv_norm_out", "decoder.norm_out") + _causal("decoder.conv_out", "decoder.conv_out")
    return RuleTable(rules, num_layers=0, family=FAMILY)


# --------------------------------------------------------------------------------------------
# Loading a diffusers folder
# --------------------------------------------------------------------------------------------
def resolve_hunyuan_vae_folder(path: str | Path) -> Path:
    """A diffusers AutoencoderKLHunyuanVideo folder, or a pipeline folder (its `vae/`); other models are refused."""
    path = Path(path)
    if not path.is_dir():
        raise UnlearnError(f"{path}: no such folder")
    if (path / "config.json").exists():
        cls = read_json_object(path / "config.json").get("_class_name")
        if cls != CLASS_NAME:
            raise ModelFamilyError(f"{path}: holds a {cls or 'unknown'} model, not a HunyuanVideo VAE ({CLASS_NAME})")
        return path
    if (path / "model_index.json").exists():
        index = read_json_object(path / "model_index.json")
        entry = index.get("vae")
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if cls != CLASS_NAME:
            raise ModelFamilyError(f"{path}: a {index.get('_class_name', 'pipeline')} folder whose VAE is "
                                   f"{cls or 'absent'}, not {CLASS_NAME}")
        return resolve_hunyuan_vae_folder(path / "vae")
    if (path / "vae" / "config.json").exists():
        return resolve_hunyuan_vae_folder(path / "vae")
    raise UnlearnError(f"{path}: neither a diffusers VAE folder (config.json) nor a pipeline folder "
                       "(model_index.json)")


def _checkpoint_dtype(reader: SafetensorsReader):
    """The first floating dtype among the checkpoint's tensors (float64 runs as float32 in JAX)."""
    for k in reader.keys():
        dt = reader.dtype(k)
        if np.issubdtype(dt, np.floating) or dt.name == "bfloat16":
            return jnp.dtype(np.float32 if dt == np.float64 else dt)
    return jnp.dtype(np.float32)


def load_hunyuan_vae(path: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None,
                     attention: str = "reference") -> AutoencoderKLHunyuanVideo:
    """Reads a diffusers HunyuanVideo VAE (its folder or a pipeline folder) into the JAX model.

    `dtype` sets the weights and the computation (group norm parameters and statistics stay fp32);
    None keeps the checkpoint's floating dtype. With a `mesh`, parameters are replicated over it
    (the VAE is small next to the transformer).
    """
    folder = resolve_hunyuan_vae_folder(path)
    config = HunyuanVAEConfig.from_json(folder / "config.json")
    reader = SafetensorsReader(folder, prefer=WEIGHTS_NAME)
    try:
        dtype = _checkpoint_dtype(reader) if dtype is None else jnp.dtype(dtype)
        abstract = abstract_vae(config, dtype=dtype, attention=attention)
        return load_into(abstract, reader, vae_rule_table(config), str(folder), dtype="model", mesh=mesh,
                         replicate=True)
    finally:
        reader.close()
