"""The JAX CogVideoX VAE against diffusers' AutoencoderKLCogVideoX: decode/encode parity (frame
chunks with the causal conv cache, spatial tiling), weight loading and the rule table."""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers

from unlearn_jax.conversion import Target, iter_torch_tensors, plan_import  # noqa: E402
from unlearn_jax.errors import ConversionError, ModelFamilyError, UnlearnError  # noqa: E402
from unlearn_jax.models.cogvideox_vae import (  # noqa: E402
    CONV2D, CONV3D, TileSpec, VAEConfig, frame_chunks, load_vae, param_shapes, vae_rule_table,
)
from repo_paths import MODEL_CONFIGS


# The real block structure (4 blocks: two compress time, one is spatial only, the last does not
# resample) with tiny widths.
TINY = dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            sample_height=64, sample_width=72)
# Latent tiles of 6x5 (video tiles 48x40): with the default overlaps the tiles line up exactly.
TILES = TileSpec(48, 40)


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(**TINY).eval()
    with torch.no_grad():  # norms' scale/bias away from 1/0, so that a mix-up would show
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return vae, folder


@pytest.fixture(scope="module")
def jax_vae(torch_vae):
    return load_vae(torch_vae[1])


@pytest.fixture(scope="module")
def latents():
    # 5 latent frames: diffusers decodes them as chunks [0:3] and [3:5] -> 9 + 8 = 17 frames.
    return np.random.RandomState(0).randn(1, 5, 4, 8, 9).astype(np.float32)  # (B, F, C, h, w)


@pytest.fixture(scope="module")
def decoded(torch_vae, jax_vae, latents):
    vae, _ = torch_vae
    vae.disable_tiling()
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(latents).permute(0, 2, 1, 3, 4)).sample.numpy()
    return ref, np.asarray(jax_vae.decode(latents))


def test_frame_chunks_match_diffusers():
    assert frame_chunks(5, 2) == [(0, 3), (3, 5)]
    assert frame_chunks(13, 2) == [(0, 3)] + [(i, i + 2) for i in range(3, 13, 2)]
    assert frame_chunks(1, 2) == [(0, 1)]
    assert frame_chunks(49, 8) == [(0, 9)] + [(i, i + 8) for i in range(9, 49, 8)]
    assert frame_chunks(12, 8) == [(0, 12)]


def test_decode_matches_diffusers(decoded):
    ref, out = decoded
    assert out.shape == ref.shape == (1, 3, 17, 64, 72)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_encode_matches_diffusers(torch_vae, jax_vae):
    vae, _ = torch_vae
    vae.disable_tiling()
    # 17 frames: diffusers encodes chunks [0:9] and [9:17] -> 3 + 2 latent frames.
    video = np.random.RandomState(1).randn(2, 3, 17, 32, 40).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(video)).latent_dist
    post = jax_vae.encode(video)
    assert post.mean.shape == tuple(dist.mean.shape) == (2, 4, 5, 4, 5)
    np.testing.assert_allclose(np.asarray(post.mean), dist.mean.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(post.logvar), dist.logvar.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(post.std), dist.std.numpy(), atol=1e-4, rtol=0)


def test_tiled_decode_matches_diffusers_tiled(torch_vae, jax_vae, latents, decoded):
    vae, _ = torch_vae
    # 3 latent frames (one frame chunk per tile) keep the number of compiled tile shapes down; chunking
    # with the conv cache is covered above. Its untiled decode reuses the first chunk's compilation.
    z = latents[:, :3]
    vae.enable_tiling(TILES.tile_sample_min_height, TILES.tile_sample_min_width)
    try:
        with torch.no_grad():
            ref = vae.decode(torch.from_numpy(z).permute(0, 2, 1, 3, 4)).sample.numpy()
    finally:
        vae.disable_tiling()
    out = np.asarray(jax_vae.decode(z, tiling=TILES))  # 2x3 tiles of (6|3)x(5|1) latents
    assert out.shape == ref.shape == (1, 3, 9, 64, 72)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # Tiles see less context than the whole frame: with random weights the seams differ visibly, but the
    # tiled video stays the same video (relative mean difference 0.24, correlation 0.96 here).
    untiled = np.asarray(jax_vae.decode(z))
    np.testing.assert_allclose(untiled, decoded[1][:, :, :9], atol=1e-5, rtol=0)  # causal: same first frames
    rel = np.abs(out - untiled).mean() / np.abs(untiled).mean()
    assert rel < 0.4, rel
    assert np.corrcoef(out.ravel(), untiled.ravel())[0, 1] > 0.8


def test_tiled_encode_matches_diffusers_tiled(torch_vae, jax_vae):
    vae, _ = torch_vae
    video = np.random.RandomState(2).randn(1, 3, 9, 64, 72).astype(np.float32)
    vae.enable_tiling(TILES.tile_sample_min_height, TILES.tile_sample_min_width)
    try:
        with torch.no_grad():
            dist = vae.encode(torch.from_numpy(video)).latent_dist
    finally:
        vae.disable_tiling()
    post = jax_vae.encode(video, tiling=TILES)
    assert post.mean.shape == tuple(dist.mean.shape) == (1, 4, 3, 8, 9)
    np.testing.assert_allclose(np.asarray(post.mean), dist.mean.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(post.logvar), dist.logvar.numpy(), atol=1e-4, rtol=0)


def test_pipeline_folder_dtype_mesh_and_export(torch_vae, jax_vae, tmp_path):
    vae, folder = torch_vae
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps(
        {"_class_name": "CogVideoXPipeline", "vae": ["diffusers", "AutoencoderKLCogVideoX"],
         "transformer": ["diffusers", "CogVideoXTransformer3DModel"]}))
    shutil.copytree(folder, pipe / "vae")
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    model = load_vae(pipe, dtype=jnp.bfloat16, mesh=mesh)
    assert model.scaling_factor == pytest.approx(1.15258426)
    kernel = model.decoder.conv_in.kernel[...]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.is_fully_replicated
    assert len(kernel.sharding.device_set) == len(jax.devices())

    # Export back through the same table: every tensor as diffusers has it.
    from flax import nnx

    leaves = {".".join(map(str, k)): v.get_value()
              for k, v in nnx.to_flat_state(nnx.state(jax_vae, nnx.Param))}
    specs, gen = iter_torch_tensors(vae_rule_table(jax_vae.config), leaves)
    state = vae.state_dict()
    assert set(specs) == set(state)
    for key, arr in gen:
        np.testing.assert_array_equal(arr, state[key].numpy(), err_msg=key)


@pytest.mark.parametrize("variant,scaling", [("2b", 1.15258426), ("5b", 0.7)])
def test_rule_table_covers_full_cogvideox_vae(variant, scaling):
    raw = json.loads((MODEL_CONFIGS / "cogvideox_2b_vae.json").read_text())
    raw["scaling_factor"] = scaling
    config = VAEConfig.from_dict(raw)
    assert config.scaling_factor == scaling and config.block_out_channels == (128, 256, 256, 512)
    kwargs = {k: v for k, v in raw.items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = diffusers.AutoencoderKLCogVideoX(**kwargs)
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    shapes = param_shapes(config)
    targets = {p: Target(tuple(s.shape), None, None) for p, s in shapes.items()}
    table = vae_rule_table(config)
    plan = plan_import(table, torch_shapes, targets, "CogVideoX-2B VAE")  # raises on any gap
    assert all(len(entries) == 1 for entries in plan.values())
    assert {e.torch_key for e in table.entries()} == set(torch_shapes)
    assert {r.jax for r in table.rules} == set(shapes)
    assert len(shapes) == len(torch_shapes)


def test_conv_transforms_round_trip():
    a = np.arange(2 * 3 * 1 * 3 * 3, dtype=np.float32).reshape(2, 3, 1, 3, 3)  # torch (O, I, kt, kh, kw)
    j = CONV3D.to_jax(a)
    assert j.shape == CONV3D.jax_shape(a.shape) == (1, 3, 3, 3, 2)
    assert j[0, 1, 2, 1, 0] == a[0, 1, 0, 1, 2]
    np.testing.assert_array_equal(CONV3D.to_torch(j), a)
    assert CONV3D.torch_shape(j.shape) == a.shape
    b = a[:, :, 0]
    assert CONV2D.jax_shape(b.shape) == (3, 3, 3, 2)
    np.testing.assert_array_equal(CONV2D.to_torch(CONV2D.to_jax(b)), b)
    assert CONV3D.jax_shape(b.shape) != (3, 3, 3, 2)  # a 2D kernel never fits a 3D slot


def test_other_family_folders_are_refused(tmp_path):
    t = tmp_path / "transformer"
    t.mkdir()
    (t / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel"}))
    with pytest.raises(ModelFamilyError, match="CogVideoXTransformer3DModel") as e:
        load_vae(t)
    assert "\n" not in str(e.value)
    p = tmp_path / "sd"
    p.mkdir()
    (p / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                    "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ModelFamilyError, match="AutoencoderKL"):
        load_vae(p)
    with pytest.raises(UnlearnError, match="no such folder"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnlearnError):
        load_vae(tmp_path / "empty")


def test_weight_problems_are_listed_together(torch_vae, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, folder = torch_vae
    bad = tmp_path / "vae"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del tensors["decoder.conv_out.conv.bias"]
    tensors["encoder.conv_in.conv.weight"] = tensors["encoder.conv_in.conv.weight"][:, :, :1]
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError) as e:
        load_vae(bad)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("1 missing: decoder.conv_out.conv.bias", "1 unexpected: decoder.extra.weight",
                 "1 misshaped: encoder.conv_in.conv.weight"):
        assert part in msg, msg
