"""The JAX HunyuanVideo VAE against diffusers' AutoencoderKLHunyuanVideo (fp32, a tiny config saved and read
back by our loader): decode (frame-wise in pieces, as diffusers always is past 4 latent frames) and encode,
tiled decode / encode with spatial tiles and frame pieces blending, the causal frame mask, the pipelines'
latent scaling, bit-exact weight round trips, the rule table against the full-size config, and the errors."""
import dataclasses
import functools
import json
import shutil
from pathlib import Path

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from helpers_hunyuan_vae import TINY, build_torch, torch_decode, torch_encode
from unlearn_jax.conversion import Target, plan_import, write_module
from unlearn_jax.errors import ConversionError, ModelFamilyError, UnlearnError
from unlearn_jax.models.hunyuan_vae import (
    WEIGHTS_NAME, HunyuanTileSpec, HunyuanVAEConfig, _frame_causal_attention, abstract_vae, load_hunyuan_vae,
    param_shapes, vae_rule_table,
)

CONFIGS = Path(__file__).parent.parent / "data" / "model_configs"
ATOL = 1e-4
# Tiles of 3 latents (24 pixels) every 2, frame pieces of 3 + 1 latent frames every 2 (12 / 8 video
# frames): on 3x5 latents 2x3 tiles of four shapes (bottom and right edges), blended over 8 pixels;
# 6 latent frames make pieces of 4, 4 and 2 frames, blended over 4 video frames (1 latent frame
# when encoding). Every piece or tile shape is one compilation of the model, so the model's tiled
# runs use one row of tiles (two shapes); the 2D case runs with a cheap stand-in for the model.
SPEC = HunyuanTileSpec(24, 24, 12, 16, 16, 8)


def _kw(spec: HunyuanTileSpec) -> dict:
    """The spec as diffusers' enable_tiling(...) keyword arguments (the same names)."""
    return dataclasses.asdict(spec)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers model, its saved folder, the JAX model our loader reads from that folder)."""
    vae = build_torch()
    folder = tmp_path_factory.mktemp("hunyuan") / "vae"
    vae.save_pretrained(folder)
    return vae, folder, load_hunyuan_vae(folder)


def test_decode_matches_diffusers(models):
    vae, _, model = models
    # 6 latent frames: diffusers decodes frame-wise even without tiling (pieces of 5 and 3 latent
    # frames, 16 / 12 video frames, blended over 4 frames); batch 2, odd latent height and width.
    z = np.random.RandomState(0).randn(2, 3, 6, 3, 5).astype(np.float32)
    ref = torch_decode(vae, z)
    out = np.asarray(model.decode(z))
    assert out.shape == ref.shape == (2, 3, model.config.decoded_frames(6), 24, 40) == (2, 3, 21, 24, 40)
    assert ref.std() > 0.2
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_encode_matches_diffusers(models):
    vae, _, model = models
    video = np.random.RandomState(1).uniform(-1, 1, (1, 3, 9, 24, 40)).astype(np.float32)
    mean, logvar = torch_encode(vae, video)
    post = model.encode(video)
    assert post.mean.shape == mean.shape == (1, 3, model.config.latent_frames(9), 3, 5) == (1, 3, 3, 3, 5)
    np.testing.assert_allclose(np.asarray(post.mean), mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(post.mode()), mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(post.logvar), logvar, atol=ATOL, rtol=0)


def test_tiled_decode_matches_diffusers_tiled(models):
    vae, _, model = models
    # 2x5 latents: one row of three tiles (widths 3, 3, 1: two shapes to compile; the 2D blending is
    # checked below, without the model); 6 latent frames: pieces of 4, 4 and 2 frames
    z = np.random.RandomState(2).randn(1, 3, 6, 2, 5).astype(np.float32)
    ref = torch_decode(vae, z, _kw(SPEC))
    out = np.asarray(model.decode(z, tiling=SPEC))
    assert out.shape == ref.shape == (1, 3, 21, 16, 40)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
    assert np.abs(torch_decode(vae, z) - ref).max() > 1e-2  # the tiles, pieces and seams did change the result


def test_tiled_encode_matches_diffusers_tiled(models):
    vae, _, model = models
    # 16x40 pixels: one row of three tiles (widths 24, 24, 8); 21 frames: pieces of 13, 13 and 5
    # frames every 8, blended over 1 latent frame
    video = np.random.RandomState(3).uniform(-1, 1, (1, 3, 21, 16, 40)).astype(np.float32)
    mean, logvar = torch_encode(vae, video, _kw(SPEC))
    post = model.encode(video, tiling=_kw(SPEC))  # a dict of the fields works too
    assert post.mean.shape == mean.shape == (1, 3, 6, 2, 5)
    np.testing.assert_allclose(np.asarray(post.mean), mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(post.logvar), logvar, atol=ATOL, rtol=0)
    untiled, _ = torch_encode(vae, video)  # 21 > 16 frames: diffusers' default pieces
    assert np.abs(untiled - mean).max() > 1e-2


class _TorchDecodeStub(torch.nn.Module):
    """A cheap stand-in for diffusers' decoder whose output depends on the whole piece (its mean), so
    that every seam shows: (B, C, F, h, w) -> (B, C, 1 + 4 (F - 1), 8h, 8w), nearest neighbour."""

    def forward(self, z):
        z = z - z.mean(dim=(2, 3, 4), keepdim=True)
        z = z.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        return torch.cat([z[:, :, :1], z[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)


class _TorchEncodeStub(torch.nn.Module):
    """(B, 3, T, H, W) -> (B, 6, 1 + (T - 1) // 4, ceil(H / 8), ceil(W / 8)), depending on the whole piece."""

    def forward(self, x):
        y = x[:, :, ::4, ::8, ::8]
        y = y - x.mean(dim=(2, 3, 4), keepdim=True)
        return torch.cat([y, 0.5 * y], dim=1)


def _jax_decode_stub(graphdef, state, z, cache):
    z = z - z.mean(axis=(1, 2, 3), keepdims=True)
    z = jnp.repeat(jnp.repeat(z, 8, axis=2), 8, axis=3)
    return jnp.concatenate([z[:, :1], jnp.repeat(z[:, 1:], 4, axis=1)], axis=1), None


def _jax_encode_stub(graphdef, state, x, cache):
    y = x[:, ::4, ::8, ::8] - x.mean(axis=(1, 2, 3), keepdims=True)
    return jnp.concatenate([y, 0.5 * y], axis=-1), None


def test_tiles_and_frame_pieces_blend_as_diffusers(monkeypatch, models):
    """The whole tiling (2D tiles blended with the tiles above and to the left, frame pieces, seams
    and cuts) against diffusers' own, both running the same cheap stand-in per piece."""
    from unlearn_jax.models import hunyuan_vae

    _, _, model = models
    vae = build_torch(seed=2, mid_block_add_attention=False)
    vae.post_quant_conv, vae.decoder = torch.nn.Identity(), _TorchDecodeStub()
    vae.quant_conv, vae.encoder = torch.nn.Identity(), _TorchEncodeStub()
    monkeypatch.setattr(hunyuan_vae, "_decode_chunk_jit", jax.jit(_jax_decode_stub, static_argnums=0))
    monkeypatch.setattr(hunyuan_vae, "_encode_chunk_jit", jax.jit(_jax_encode_stub, static_argnums=0))
    rng = np.random.RandomState(6)
    z = rng.randn(2, 3, 6, 3, 5).astype(np.float32)  # 3x5 latents: 2x3 tiles of four shapes; 3 pieces
    np.testing.assert_allclose(np.asarray(model.decode(z, tiling=SPEC)), torch_decode(vae, z, _kw(SPEC)), atol=1e-6)
    video = rng.uniform(-1, 1, (2, 3, 21, 24, 40)).astype(np.float32)  # 2x3 tiles; 3 pieces
    mean, logvar = torch_encode(vae, video, _kw(SPEC))
    post = model.encode(video, tiling=SPEC)
    np.testing.assert_allclose(np.asarray(post.mean), mean, atol=1e-6)
    np.testing.assert_allclose(np.asarray(post.logvar), logvar, atol=1e-6)


def test_frame_causal_attention_is_diffusers_masked_softmax():
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask

    frames, hw, dim = 3, 7, 5
    rng = np.random.RandomState(4)
    q, k, v = (rng.randn(2, frames * hw, 1, dim).astype(np.float32) for _ in range(3))
    mask = prepare_causal_attention_mask(frames, hw, torch.float32, "cpu", batch_size=2)[:, None]
    qt, kt, vt = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2).numpy()
    for impl in ("reference", "chunked", "xla"):
        run = jax.jit(functools.partial(_frame_causal_attention, frames=frames, impl=impl))
        np.testing.assert_allclose(np.asarray(run(q, k, v)), ref, atol=1e-6)
    unmasked = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).numpy()
    assert np.abs(unmasked - ref)[:, :-hw].max() > 1e-2  # the mask matters, except for the last frame


def test_latent_scaling_matches_hunyuan_pipelines(models):
    _, _, model = models
    sf = TINY["scaling_factor"]
    assert model.scaling_factor == sf
    z = np.random.RandomState(5).randn(2, 3, 4, 3, 5).astype(np.float32)
    # bf16 (the pipelines' dtype) bit-equal; fp32 within an ulp (XLA divides by a constant as a
    # multiplication by its reciprocal)
    for dtype, tdtype, rtol in ((jnp.float32, torch.float32, 2.4e-7), (jnp.bfloat16, torch.bfloat16, 0)):
        zt = torch.from_numpy(z).to(tdtype)
        # HunyuanVideoPipeline: latents.to(vae.dtype) / scaling_factor before vae.decode
        got = model.unscale(jnp.asarray(z, dtype))
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), (zt / sf).float().numpy(), rtol=rtol, atol=0)
        # HunyuanVideoImageToVideoPipeline: encode(...).mode() * scaling_factor
        got = model.scale(jnp.asarray(z, dtype))
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), (zt * sf).float().numpy())
    assert model.normalize == model.scale and model.denormalize == model.unscale  # the Wan VAE's names


def _tensors(folder: Path) -> dict:
    return load_file(folder / WEIGHTS_NAME)


@pytest.mark.parametrize("dtype,jax_dtype", [(torch.float32, jnp.float32), (torch.bfloat16, jnp.bfloat16)])
def test_round_trip_bit_exact(tmp_path, dtype, jax_dtype):
    src, out = tmp_path / "src", tmp_path / "out"
    build_torch(seed=1, mid_block_add_attention=False).to(dtype).save_pretrained(src)
    model = load_hunyuan_vae(src)  # dtype=None keeps the checkpoint's (group norms stay fp32)
    assert model.decoder.conv_in.kernel[...].dtype == jax_dtype
    out.mkdir()
    # the fp32 group norms go back in the checkpoint's dtype (exactly: they came from it)
    write_module(out, model, vae_rule_table(model.config), WEIGHTS_NAME, dtype=np.dtype(jax_dtype))
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b) and not any("attentions" in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("source", ["hunyuan_video_vae", "variant"])
def test_rule_table_covers_diffusers_both_ways(source):
    if source == "variant":  # no mid-block attention, 16x space, two resnets per up block, GELU
        raw = {"_class_name": "AutoencoderKLHunyuanVideo", "block_out_channels": [8, 12, 16, 16],
               "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 5, "act_fn": "gelu",
               "spatial_compression_ratio": 16, "mid_block_add_attention": False}
    else:
        raw = json.loads((CONFIGS / f"{source}.json").read_text())
    config = HunyuanVAEConfig.from_dict(raw)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKLHunyuanVideo.from_config(raw)
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    abstract = abstract_vae(config)
    shapes = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    table = vae_rule_table(config)
    # import: every diffusers tensor lands in one JAX leaf of the right shape, every leaf is filled
    plan = plan_import(table, torch_shapes, {p: Target(s, None, None) for p, s in shapes.items()}, source)
    assert all(len(entries) == 1 for entries in plan.values())
    # export: the table's keys and the shapes it writes are diffusers' own
    entries = table.entries()
    assert {e.torch_key for e in entries} == set(torch_shapes) and len(entries) == len(torch_shapes)
    for e in entries:
        assert e.transform.torch_shape(shapes[e.jax_path]) == torch_shapes[e.torch_key], e.torch_key
    # every parameter carries logical axis names, one per dimension
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path
    assert (config.spatial_ratio, config.temporal_ratio) == (reference.spatial_compression_ratio,
                                                             reference.temporal_compression_ratio)
    assert HunyuanVAEConfig.from_dict(config.to_dict()) == config
    if source == "variant":
        assert {p: tuple(v.shape) for p, v in param_shapes(config).items()} == shapes
    else:
        assert config == HunyuanVAEConfig() and config.scaling_factor == 0.476986
        assert config.decoded_frames(33) == 129 and config.latent_frames(129) == 33


def test_pipeline_folder_dtype_and_mesh(models, tmp_path):
    _, folder, _ = models
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "HunyuanVideoPipeline", "vae": ["diffusers", "AutoencoderKLHunyuanVideo"]}))
    shutil.copytree(folder, tmp_path / "vae")
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    model = load_hunyuan_vae(tmp_path, dtype=jnp.bfloat16, mesh=mesh)
    kernel = model.decoder.conv_in.kernel[...]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.is_fully_replicated
    assert len(kernel.sharding.device_set) == len(jax.devices())
    assert model.decoder.norm_out.scale[...].dtype == jnp.float32  # group norms stay fp32
    assert tuple(model.decoder.conv_in.kernel.get_metadata()["out_sharding"]) == (None, None, None, "vae_in", "vae_out")


def test_another_class_name_is_refused(tmp_path):
    with pytest.raises(ModelFamilyError, match="AutoencoderKLWan"):
        HunyuanVAEConfig.from_dict({"_class_name": "AutoencoderKLWan"})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DModel"}))
    with pytest.raises(ModelFamilyError, match="HunyuanVideoTransformer3DModel") as e:
        load_hunyuan_vae(tmp_path)
    assert "\n" not in str(e.value)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                       "vae": ["diffusers", "AutoencoderKLWan"]}))
    with pytest.raises(ModelFamilyError, match="WanPipeline folder whose VAE is AutoencoderKLWan"):
        load_hunyuan_vae(pipe)


def test_missing_weight_is_listed(models, tmp_path):
    from safetensors.numpy import load_file as load_np, save_file

    _, folder, _ = models
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    tensors = load_np(str(folder / WEIGHTS_NAME))
    del tensors["decoder.mid_block.attentions.0.to_k.bias"]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ConversionError, match="1 missing: decoder.mid_block.attentions.0.to_k.bias") as e:
        load_hunyuan_vae(tmp_path)
    assert "\n" not in str(e.value)


def test_bad_options_are_one_line_errors():
    for bad, field in ((dict(unknown_option=1), "unknown_option"),
                       (dict(down_block_types=["DownEncoderBlockCausal3D"] * 4), "down_block_types"),
                       (dict(up_block_types=["HunyuanVideoUpBlock3D"] * 3), "up_block_types"),
                       (dict(norm_num_groups=24), "norm_num_groups"),
                       (dict(temporal_compression_ratio=8), "temporal_compression_ratio"),
                       (dict(spatial_compression_ratio=32), "spatial_compression_ratio"),
                       (dict(spatial_compression_ratio=6), "power of two"),
                       (dict(block_out_channels=[32, 32], down_block_types=["HunyuanVideoDownBlock3D"] * 2,
                             up_block_types=["HunyuanVideoUpBlock3D"] * 2), "at least 3"),
                       (dict(act_fn="tanh"), "act_fn"), (dict(scaling_factor=0), "scaling_factor"),
                       (dict(layers_per_block=0), "layers_per_block"),
                       (dict(mid_block_add_attention="yes"), "mid_block_add_attention")):
        with pytest.raises(UnlearnError, match=field) as e:
            HunyuanVAEConfig.from_dict(bad)
        assert "\n" not in str(e.value)
    # lists from a hand-built config become tuples (the config is jit-static)
    assert hash(HunyuanVAEConfig(block_out_channels=[32, 64, 64], down_block_types=["HunyuanVideoDownBlock3D"] * 3,
                                 up_block_types=["HunyuanVideoUpBlock3D"] * 3))

    model = abstract_vae(HunyuanVAEConfig.from_dict(TINY))  # all refused before any computation
    z = np.zeros((1, 3, 2, 2, 2), np.float32)
    for tiling, match in ((HunyuanTileSpec(tile_sample_stride_width=100), "multiples of the VAE's 8x spatial"),
                          (HunyuanTileSpec(tile_sample_stride_num_frames=20), "stride 20 exceeds"),
                          (dict(tile_size=3), "tile_size"), ("yes", "HunyuanTileSpec")):
        with pytest.raises(UnlearnError, match=match) as e:
            model.decode(z, tiling=tiling)
        assert "\n" not in str(e.value)
    with pytest.raises(UnlearnError, match=r"\(B, 3, F, h, w\)"):
        model.decode(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(UnlearnError, match=r"\(B, 3, T, H, W\)"):
        model.encode(np.zeros((1, 4, 1, 8, 8), np.float32))
    with pytest.raises(UnlearnError, match="attention"):
        abstract_vae(HunyuanVAEConfig(), attention="flash")
