"""The JAX CogVideoX transformer equals diffusers' CogVideoXTransformer3DModel (fp32, and bf16 within tolerance)."""
import jax
import jax.numpy as jnp
import tempfile

import numpy as np
import pytest

import unlearn_jax
from helpers_cogvideox import VARIANTS, build_torch, inputs, tiny_config, torch_forward
from unlearn_jax.models.layers import attention


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
    cfg = tiny_config(request.param)
    model = build_torch(cfg)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, cfg, model, folder


def _frames(cfg):
    # 3 latent frames (not a power of two); 1.5-style temporal patching needs a multiple of 2.
    return 6 if cfg.get("patch_size_t") else 3


def test_fp32_parity(saved):
    _, cfg, tmodel, folder = saved
    x, ctx, t = inputs(cfg, batch=2, frames=_frames(cfg))
    ref = torch_forward(tmodel, cfg, x, ctx, t)
    model = unlearn_jax.load_transformer(folder)
    out = np.asarray(model(x, ctx, t))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_reference_attention_path_equals(saved):
    _, cfg, tmodel, folder = saved
    x, ctx, t = inputs(cfg, batch=1, frames=_frames(cfg), seed=3)
    ref = torch_forward(tmodel, cfg, x, ctx, t)
    out = np.asarray(unlearn_jax.load_transformer(folder, attention="reference", remat="full")(x, ctx, t))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    # The query-chunked path: 7-row blocks, so several blocks run and the last one is padded.
    n_tokens = cfg["max_text_seq_length"] + x.shape[1] // (cfg.get("patch_size_t") or 1) * (
        x.shape[3] // cfg.get("patch_size", 2)) * (x.shape[4] // cfg.get("patch_size", 2))
    assert n_tokens > 2 * 7 and n_tokens % 7, n_tokens
    chunked = np.asarray(unlearn_jax.load_transformer(folder, attention="chunked", attention_chunk=7,
                                                      remat="full")(x, ctx, t))
    np.testing.assert_allclose(chunked, ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(chunked, out, atol=2e-6, rtol=1e-6)
    # ... and its gradient equals the reference path's (each block is rematerialised in the backward pass).
    q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((2, 45, 3, 8)), jnp.float32) for i in range(3))
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, impl, chunk=8)))  # noqa: E731
    np.testing.assert_allclose(loss("chunked")(q, k, v), loss("reference")(q, k, v), rtol=1e-6)
    for gc, gr in zip(jax.grad(loss("chunked"), (0, 1, 2))(q, k, v), jax.grad(loss("reference"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(gc, gr, atol=1e-6, rtol=1e-5)


def test_bf16_within_tolerance(saved):
    """bf16 weights and compute (norms, modulation, softmax in fp32) against the fp32 reference.

    Documented tolerance: max abs error <= 0.05 * max |v| (bf16 keeps 8 bits of mantissa)."""
    _, cfg, tmodel, folder = saved
    x, ctx, t = inputs(cfg, batch=2, frames=_frames(cfg), seed=5)
    ref = torch_forward(tmodel, cfg, x, ctx, t)
    model = unlearn_jax.load_transformer(folder, dtype="bfloat16")
    assert model.text_proj.kernel[...].dtype == jnp.bfloat16
    out = np.asarray(model(x, ctx, t)).astype(np.float32)
    err = np.abs(out - ref).max()
    assert err <= 0.05 * np.abs(ref).max(), err
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.999


def test_other_resolutions_and_text_length():
    """RoPE models take any text length and latent size; sin-cos positions are recomputed per size."""
    for variant, text_len in (("5b_rope", 7), ("2b_sincos", None)):
        cfg = tiny_config(variant)
        tmodel = build_torch(cfg, seed=1)
        with tempfile.TemporaryDirectory() as d:
            tmodel.save_pretrained(d)
            model = unlearn_jax.load_transformer(d)
        x, ctx, t = inputs(cfg, batch=1, frames=5, height=6, width=10, text_len=text_len, seed=2)
        ref = torch_forward(tmodel, cfg, x, ctx, t)
        np.testing.assert_allclose(np.asarray(model(x, ctx, t)), ref, atol=2e-5, rtol=1e-5)


def test_learned_positions_other_frame_count_falls_back_like_diffusers(tmp_path):
    cfg = tiny_config("learned_pos")
    tmodel = build_torch(cfg, seed=4)
    tmodel.save_pretrained(tmp_path)
    model = unlearn_jax.load_transformer(tmp_path)
    x, ctx, t = inputs(cfg, batch=1, frames=2, seed=1)  # sample_frames 9 <-> 3 latent frames; 2 differs
    np.testing.assert_allclose(np.asarray(model(x, ctx, t)), torch_forward(tmodel, cfg, x, ctx, t),
                               atol=2e-5, rtol=1e-5)


def test_scalar_timestep_broadcasts(saved):
    _, cfg, tmodel, folder = saved
    x, ctx, _ = inputs(cfg, batch=2, frames=_frames(cfg), seed=7)
    model = unlearn_jax.load_transformer(folder)
    a = np.asarray(model(x, ctx, 500))
    b = np.asarray(model(x, ctx, np.array([500, 500])))
    np.testing.assert_array_equal(a, b)
