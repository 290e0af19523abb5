"""The JAX Wan VAE against diffusers' AutoencoderKLWan (fp32): decode and encode with the feature cache
(Wan 2.1- and 2.2-like tiny configs), tiled decode/encode, latent normalisation, the rule table
against the full-size Wan 2.1 / 2.2 configs, loading and its errors."""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import diffusers

from helpers_wan_vae import VARIANTS, build_torch, torch_decode, torch_encode
from unlearn_jax.conversion import Target, plan_import
from unlearn_jax.errors import ConversionError, ModelFamilyError, UnlearnError
from unlearn_jax.models.wan_vae import (
    WanTileSpec, WanVAEConfig, abstract_vae, decoded_frames, load_wan_vae, param_shapes, vae_rule_table,
)

CONFIGS = Path(__file__).parent.parent / "data" / "model_configs"
ATOL = 1e-4

# Latents (B, F, h, w) and videos (B, T) per variant; h, w odd; batch 2 and 1.
DECODE = {"wan21": (2, 3, 3, 5), "wan22": (1, 2, 3, 5)}
ENCODE = {"wan21": (1, 9), "wan22": (2, 5)}
# Tiles of 4 latents starting every 3 (a blend of 8 output rows/columns before the pixel shuffle):
# on 3x6 latents one row of two tiles (fewer tile shapes to compile), on 5x6 latents 2x2 tiles of
# different sizes.
TILES = {"wan21": (WanTileSpec(32, 32, 24, 24), (3, 6)), "wan22": (WanTileSpec(64, 64, 48, 48), (5, 6))}


def _tiles_kw(spec: WanTileSpec) -> dict:
    return dict(tile_sample_min_height=spec.tile_sample_min_height, tile_sample_min_width=spec.tile_sample_min_width,
                tile_sample_stride_height=spec.tile_sample_stride_height,
                tile_sample_stride_width=spec.tile_sample_stride_width)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (diffusers model, its saved folder, the JAX model loaded from it), built once."""
    built = {}

    def get(name):
        if name not in built:
            vae = build_torch(name)
            folder = tmp_path_factory.mktemp(name) / "vae"
            vae.save_pretrained(folder)
            built[name] = (vae, folder, load_wan_vae(folder))
        return built[name]

    return get


BOTH = pytest.mark.parametrize("name", sorted(VARIANTS))


@BOTH
def test_decode_matches_diffusers(models, name):
    vae, _, model = models(name)
    b, f, h, w = DECODE[name]
    z = np.random.RandomState(0).randn(b, vae.config.z_dim, f, h, w).astype(np.float32)
    ref = torch_decode(vae, z)
    out = np.asarray(model.decode(z))
    r = model.config.spatial_ratio
    assert out.shape == ref.shape == (b, 3, decoded_frames(f), h * r, w * r)
    assert (np.abs(ref) >= 1).mean() < 0.01 and ref.std() > 0.2  # few values at the clamp
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


@BOTH
def test_encode_matches_diffusers(models, name):
    vae, _, model = models(name)
    b, t = ENCODE[name]
    r = model.config.spatial_ratio
    video = np.random.RandomState(1).uniform(-1, 1, (b, 3, t, 3 * r, 5 * r)).astype(np.float32)
    mean, logvar = torch_encode(vae, video)
    post = model.encode(video)
    assert post.mean.shape == mean.shape == (b, vae.config.z_dim, model.config.latent_frames(t), 3, 5)
    np.testing.assert_allclose(np.asarray(post.mean), mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(post.mode()), mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(post.logvar), logvar, atol=ATOL, rtol=0)


@BOTH
def test_tiled_decode_matches_diffusers_tiled(models, name):
    vae, _, model = models(name)
    spec, (h, w) = TILES[name]
    z = np.random.RandomState(2).randn(1, vae.config.z_dim, 2, h, w).astype(np.float32)
    ref = torch_decode(vae, z, _tiles_kw(spec))
    out = np.asarray(model.decode(z, tiling=spec))
    r = model.config.spatial_ratio
    assert out.shape == ref.shape == (1, 3, 5, h * r, w * r)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
    untiled = torch_decode(vae, z)
    assert np.abs(untiled - ref).max() > 1e-2  # the tiles and seams did change the result


def test_tiled_encode_matches_diffusers_tiled(models):
    vae, _, model = models("wan22")  # one variant: the pixel-unshuffled tiles are the harder case
    # In unshuffled pixels (24x48 here): tiles of 5 latents every 3, one row of two (the 2D blending
    # is the decode's code, tested above), blended over 2 latent columns.
    spec = WanTileSpec(40, 40, 24, 24)
    video = np.random.RandomState(3).uniform(-1, 1, (1, 3, 5, 48, 96)).astype(np.float32)
    mean, logvar = torch_encode(vae, video, _tiles_kw(spec))
    post = model.encode(video, tiling=spec)
    assert post.mean.shape == mean.shape == (1, 6, 2, 3, 6)
    untiled, _ = torch_encode(vae, video)
    assert np.abs(untiled - mean).max() > 1e-2
    np.testing.assert_allclose(np.asarray(post.mean), mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(post.logvar), logvar, atol=ATOL, rtol=0)


@BOTH
def test_latent_normalisation_matches_wan_pipeline(models, name):
    vae, _, model = models(name)
    zdim = vae.config.z_dim
    z = np.random.RandomState(4).randn(2, zdim, 3, 2, 3).astype(np.float32)
    mean = torch.tensor(vae.config.latents_mean).view(1, zdim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, zdim, 1, 1, 1)
    ref = (torch.from_numpy(z) / inv_std + mean).numpy()  # WanPipeline before vae.decode
    np.testing.assert_allclose(np.asarray(model.denormalize(z)), ref, atol=1e-6, rtol=0)
    back = ((torch.from_numpy(ref) - mean) * inv_std).numpy()  # the Wan pipelines after vae.encode
    np.testing.assert_allclose(np.asarray(model.normalize(ref)), back, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(model.normalize(model.denormalize(z))), z, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["wan21_vae", "wan22_vae", "attn_scales"])
def test_rule_table_covers_diffusers_both_ways(source):
    if source == "attn_scales":  # encoder attention blocks (decodable, see test_encoder_attention_is_refused)
        raw = {"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 4, "attn_scales": [0.5, 0.25]}
    else:
        raw = json.loads((CONFIGS / f"{source}.json").read_text())
    config = WanVAEConfig.from_dict(raw)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKLWan.from_config(raw)
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    shapes = {p: tuple(s.shape) for p, s in param_shapes(config).items()}
    table = vae_rule_table(config)
    # import: every diffusers tensor lands in one JAX leaf of the right shape, every leaf is filled
    plan = plan_import(table, torch_shapes, {p: Target(s, None, None) for p, s in shapes.items()}, source)
    assert all(len(entries) == 1 for entries in plan.values())
    # export: the table's keys and the shapes it writes are diffusers' own
    entries = table.entries()
    assert {e.torch_key for e in entries} == set(torch_shapes) and len(entries) == len(torch_shapes)
    for e in entries:
        assert e.transform.torch_shape(shapes[e.jax_path]) == torch_shapes[e.torch_key], e.torch_key
    if source != "attn_scales":
        assert (config.spatial_ratio, config.temporal_ratio) == (reference.spatial_compression_ratio, 4)
        assert config.decoded_frames(21) == 81 and config.latent_frames(81) == 21
        assert WanVAEConfig.from_dict(config.to_dict()) == config


def test_pipeline_folder_dtype_and_mesh(models, tmp_path):
    _, folder, _ = models("wan22")
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}))
    shutil.copytree(folder, tmp_path / "vae")
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    model = load_wan_vae(tmp_path, dtype=jnp.bfloat16, mesh=mesh)
    kernel = model.decoder.conv_in.kernel[...]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.is_fully_replicated
    assert len(kernel.sharding.device_set) == len(jax.devices())
    assert model.decoder.norm_out.scale[...].dtype == jnp.float32  # norms stay fp32
    assert tuple(model.decoder.conv_in.kernel.get_metadata()["out_sharding"]) == (None, None, None, "vae_in", "vae_out")


def test_another_class_name_is_refused(tmp_path):
    with pytest.raises(ModelFamilyError, match="AutoencoderKLCogVideoX"):
        WanVAEConfig.from_dict({"_class_name": "AutoencoderKLCogVideoX"})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(ModelFamilyError, match="WanTransformer3DModel") as e:
        load_wan_vae(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_weight_is_listed(models, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, folder, _ = models("wan22")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del tensors["decoder.up_blocks.0.upsampler.time_conv.bias"]
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match="1 missing: decoder.up_blocks.0.upsampler.time_conv.bias") as e:
        load_wan_vae(tmp_path)
    assert "\n" not in str(e.value)


def test_bad_options_are_one_line_errors():
    for bad, field in ((dict(unknown_option=1), "unknown_option"), (dict(temperal_downsample=[True]), "temperal"),
                       (dict(scale_factor_spatial=16), "scale_factor_spatial"), (dict(patch_size=2), "patch_size")):
        with pytest.raises(UnlearnError, match=field) as e:
            WanVAEConfig.from_dict(bad)
        assert "\n" not in str(e.value)
    assert WanVAEConfig.from_dict({"clip_output": False}) == WanVAEConfig()  # ignored, as diffusers does


def test_encoder_attention_is_refused():
    config = WanVAEConfig(base_dim=4, z_dim=2, num_res_blocks=1, attn_scales=(0.5,), latents_mean=(0.0, 0.0),
                          latents_std=(1.0, 1.0))
    model = abstract_vae(config)  # both are refused before any computation
    with pytest.raises(UnlearnError, match="attn_scales"):
        model.encode(np.zeros((1, 3, 1, 16, 16), np.float32))
    with pytest.raises(UnlearnError, match="tiling"):
        model.decode(np.zeros((1, 2, 1, 2, 2), np.float32), tiling="yes")
    with pytest.raises(UnlearnError, match=r"\(B, 2, F, h, w\)"):
        model.decode(np.zeros((1, 2, 2, 2), np.float32))
    assert hash(WanVAEConfig(dim_mult=[1, 2, 2], temperal_downsample=[False, True], scale_factor_spatial=4,
                             scale_factor_temporal=2))  # lists from a hand-built config become tuples
