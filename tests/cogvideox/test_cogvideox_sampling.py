"""The JAX sampler against diffusers' CogVideoXPipeline (output_type="latent"), with a tiny torch
CogVideoX transformer called from JAX through pure_callback (so the test is independent of the
JAX transformer)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
)

from unlearn_jax.errors import UnlearnError
from unlearn_jax.sampling import guidance_scales, make_sampler, sample
from unlearn_jax.schedulers import SchedulerConfig, make_schedule
from repo_paths import MODEL_CONFIGS

CONFIGS = MODEL_CONFIGS
CFG_2B = json.loads((CONFIGS / "cogvideox_2b_scheduler.json").read_text())
CFG_5B = json.loads((CONFIGS / "cogvideox_5b_scheduler.json").read_text())
B, F, C, H, W = 2, 2, 4, 4, 4          # latents; pixel size = 8x latent, 5 frames
L, D = 6, 16                            # text tokens, text embedding dim
N = 6                                   # sampler steps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C, time_embed_dim=8,
        text_embed_dim=D, num_layers=1, sample_width=W, sample_height=H, sample_frames=5, max_text_seq_length=L,
    ).eval()
    with torch.no_grad():   # random init leaves zero biases / unit norms: perturb everything
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((B, F, C, H, W)).astype(np.float32)
    pe = rng.standard_normal((B, L, D)).astype(np.float32)
    ne = rng.standard_normal((B, L, D)).astype(np.float32)
    return lat, pe, ne


def torch_velocity(model, calls=None):
    """velocity_fn for the sampler: the torch model on the host, fp32."""
    def host(x, t, ctx):
        t = np.asarray(t)
        t = torch.from_numpy(t.astype(np.int64) if np.issubdtype(t.dtype, np.integer) else t.astype(np.float32))
        if calls is not None:
            calls.append(x.shape[0])
        with torch.no_grad():
            out = model(hidden_states=torch.from_numpy(np.array(x)), encoder_hidden_states=torch.from_numpy(
                np.array(ctx)), timestep=t, return_dict=False)[0]
        return out.float().numpy()

    def velocity_fn(x, t, ctx):
        assert x.shape[0] == t.shape[0] == ctx.shape[0]
        return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t, ctx)
    return velocity_fn


def dpm_used_noise(seed, timesteps, n, T=1000):
    """The normals CogVideoXDPMScheduler adds at each step when the pipeline is given
    torch.Generator().manual_seed(seed) and latents: one draw per step, and a second one (the one
    used) on steps that take the second-order update."""
    g = torch.Generator().manual_seed(seed)
    used = []
    for i, t in enumerate(timesteps):
        z = torch.randn((B, F, C, H, W), generator=g)
        if i > 0 and int(t) - T // n >= 0:
            z = torch.randn((B, F, C, H, W), generator=g)
        used.append(z.numpy())
    return np.stack(used)


def run_pipeline(model, kind, cfg_d, inputs, *, guidance, dynamic, seed=7, record=None):
    cls = CogVideoXDDIMScheduler if kind == "ddim" else CogVideoXDPMScheduler
    sched = cls.from_config({k: v for k, v in cfg_d.items() if not k.startswith("_")})
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    lat, pe, ne = inputs

    def callback(p, i, t, kw):
        record.append(kw["latents"].clone().numpy())
        return {}

    out = pipe(prompt_embeds=torch.from_numpy(pe), negative_prompt_embeds=torch.from_numpy(ne),
               latents=torch.from_numpy(lat), height=H * 8, width=W * 8, num_frames=(F - 1) * 4 + 1,
               num_inference_steps=N, guidance_scale=guidance, use_dynamic_cfg=dynamic,
               generator=torch.Generator().manual_seed(seed), output_type="latent",
               callback_on_step_end=callback if record is not None else None)
    return out.frames.numpy(), sched.timesteps.numpy()


@pytest.mark.parametrize("kind,cfg_name", [("ddim", "2b"), ("dpm", "5b")])
@pytest.mark.parametrize("dynamic", [False, True])
def test_full_run_matches_pipeline(model, inputs, kind, cfg_name, dynamic):
    cfg_d = CFG_2B if cfg_name == "2b" else CFG_5B
    ref, ts = run_pipeline(model, kind, cfg_d, inputs, guidance=6.0, dynamic=dynamic, seed=11)
    cfg = SchedulerConfig.from_diffusers(cfg_d, kind=kind)
    lat, pe, ne = inputs
    step_noise = dpm_used_noise(11, ts, N) if kind == "dpm" else None
    calls = []
    out = jax.jit(lambda x, c, u, sn: sample(
        torch_velocity(model, calls), cfg, x, c, u, num_steps=N, guidance_scale=6.0, use_dynamic_cfg=dynamic,
        step_noise=sn))(lat, pe, ne, step_noise)
    np.testing.assert_allclose(np.asarray(out.latents), ref, atol=2e-5, rtol=1e-5)
    assert int(out.steps) == N and int(out.timestep) == max(int(ts[-1]) - 1000 // N, 0)
    # one batched [uncond; cond] model call per step
    assert calls == [2 * B] * N
    # guidance matters here (so the test would see a wrong scale or a swapped uncond/cond)
    other, _ = run_pipeline(model, kind, cfg_d, inputs, guidance=2.0, dynamic=dynamic, seed=11)
    assert np.abs(other - ref).max() > 1e-2


def test_dynamic_cfg_table():
    sched = make_schedule(SchedulerConfig.from_diffusers(CFG_2B), 50)
    g = np.asarray(guidance_scales(sched, 6.0, True))
    assert g.shape == (50,) and g.dtype == np.float32
    assert not np.allclose(g, g[0])   # really varies over the steps
    import math
    t = int(sched.timesteps[10])
    assert g[10] == np.float32(1 + 6.0 * (1 - math.cos(math.pi * ((50 - t) / 50) ** 5.0)) / 2)
    np.testing.assert_array_equal(np.asarray(guidance_scales(sched, 6.0, False)), np.full(50, 6.0, np.float32))


def test_no_guidance_matches_pipeline(model, inputs):
    ref, _ = run_pipeline(model, "ddim", CFG_2B, inputs, guidance=1.0, dynamic=False)
    lat, pe, _ = inputs
    calls = []
    out = sample(torch_velocity(model, calls), SchedulerConfig.from_diffusers(CFG_2B), lat, pe, None,
                 num_steps=N, guidance_scale=1.0)
    np.testing.assert_allclose(np.asarray(out.latents), ref, atol=2e-5, rtol=1e-5)
    assert calls == [B] * N   # no unconditional pass


@pytest.mark.parametrize("kind,cfg_name", [("ddim", "2b"), ("dpm", "5b")])
def test_stop_after_traced_matches_prefix_without_recompiling(model, inputs, kind, cfg_name):
    cfg_d = CFG_2B if cfg_name == "2b" else CFG_5B
    record = []
    ref, ts = run_pipeline(model, kind, cfg_d, inputs, guidance=6.0, dynamic=True, seed=5, record=record)
    assert len(record) == N
    cfg = SchedulerConfig.from_diffusers(cfg_d, kind=kind)
    lat, pe, ne = inputs
    step_noise = dpm_used_noise(5, ts, N) if kind == "dpm" else None
    vf = torch_velocity(model)
    traces = []

    @jax.jit
    def run(j, sn):
        traces.append(1)
        return sample(vf, cfg, lat, pe, ne, num_steps=N, guidance_scale=6.0, use_dynamic_cfg=True,
                      stop_after=j, step_noise=sn)

    sched = make_schedule(cfg, N)
    for j in (0, 1, 3, N):
        out = run(jnp.int32(j), step_noise)
        want = lat if j == 0 else record[j - 1]
        np.testing.assert_allclose(np.asarray(out.latents), want, atol=2e-5, rtol=1e-5)
        assert int(out.steps) == j
        assert int(out.timestep) == int(sched.sample_timesteps[j])
        if j < N:
            assert int(out.timestep) == int(ts[j])   # x_t sits at the timestep of the step it feeds
    np.testing.assert_allclose(np.asarray(out.latents), ref, atol=2e-5, rtol=1e-5)
    assert len(traces) == 1 and run._cache_size() == 1
    # a traced j out of range is clipped
    assert int(run(jnp.int32(N + 5), step_noise).steps) == N and len(traces) == 1


def test_key_noise_is_deterministic_and_independent_of_stop(model, inputs):
    cfg = SchedulerConfig.from_diffusers(CFG_5B, kind="dpm")
    lat, pe, ne = inputs
    run = make_sampler(torch_velocity(model), cfg, num_steps=N, guidance_scale=6.0, use_dynamic_cfg=True)
    key = jax.random.key(3)
    full = run(lat, pe, ne, key=key)
    again = run(lat, pe, ne, stop_after=N, key=key)
    np.testing.assert_array_equal(np.asarray(full.latents), np.asarray(again.latents))
    # key-drawn noise equals explicit per-step noise normal(fold_in(key, i))
    sn = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), lat.shape)))(jnp.arange(N))
    part = run(lat, pe, ne, stop_after=3, key=key)
    part_explicit = run(lat, pe, ne, stop_after=3, step_noise=sn)
    np.testing.assert_allclose(np.asarray(part.latents), np.asarray(part_explicit.latents), atol=1e-6)
    other = run(lat, pe, ne, stop_after=3, key=jax.random.key(4))
    assert np.abs(np.asarray(other.latents) - np.asarray(part.latents)).max() > 1e-2
    run(lat, pe, ne, stop_after=2, key=key)
    assert run._cache_size() == 3   # (no stop, key), (stop, key), (stop, step_noise): not per j
    with pytest.raises(ValueError, match="key"):
        sample(torch_velocity(model), cfg, lat, pe, ne, num_steps=N, guidance_scale=6.0)


def test_uncond_batch_one_broadcasts(model, inputs):
    lat, pe, ne = inputs
    cfg = SchedulerConfig.from_diffusers(CFG_2B)
    vf = torch_velocity(model)
    a = sample(vf, cfg, lat, pe, ne[:1], num_steps=3, guidance_scale=6.0)
    b = sample(vf, cfg, lat, pe, np.repeat(ne[:1], B, axis=0), num_steps=3, guidance_scale=6.0)
    np.testing.assert_array_equal(np.asarray(a.latents), np.asarray(b.latents))
    with pytest.raises(ValueError, match="stop_after"):
        sample(vf, cfg, lat, pe, ne, num_steps=3, guidance_scale=6.0, stop_after=4)
    with pytest.raises(ValueError, match="uncond_context"):
        sample(vf, cfg, lat, pe, None, num_steps=3, guidance_scale=6.0)
    for bad in ("6", float("nan"), [1.0, 2.0]):
        with pytest.raises(UnlearnError, match="guidance_scale") as e:
            sample(vf, cfg, lat, pe, ne, num_steps=3, guidance_scale=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UnlearnError, match="num_steps"):
        sample(vf, cfg, lat, pe, ne, num_steps=0, guidance_scale=6.0)


def test_no_gradient_through_the_sampler():
    """Training differentiates the loss at x_t: the sampler (a loop with a traced trip count) must
    be a constant for reverse mode, not an error."""
    cfg = SchedulerConfig.from_diffusers(CFG_2B)
    x, c = jnp.ones((1, 2, 3, 4, 4)), jnp.ones((1, 5, 8))

    def loss(p, j):
        vf = lambda x, t, ctx: x * p + ctx.mean()   # noqa: E731
        xt = sample(vf, cfg, x, c, c * 0, num_steps=10, guidance_scale=3.0, stop_after=j).latents
        return jnp.mean((vf(xt, None, c) - 1.0) ** 2)

    p, j = 2.0, 3
    xt = sample(lambda x, t, ctx: x * p + ctx.mean(), cfg, x, c, c * 0, num_steps=10, guidance_scale=3.0,
                stop_after=j).latents
    want = jnp.mean(2 * (xt * p + 1.0 - 1.0) * xt)     # d/dp with x_t held constant
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(p, j), want, rtol=1e-5)


def test_flow_euler_sampler_matches_diffusers_loop(model, inputs):
    lat, pe, ne = inputs
    d = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}
    ref_sched = FlowMatchEulerDiscreteScheduler.from_config(d)
    ref_sched.set_timesteps(4)
    x = torch.from_numpy(lat)
    ctx = torch.from_numpy(np.concatenate([ne, pe]))
    with torch.no_grad():
        for t in ref_sched.timesteps:
            v = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=ctx, timestep=t.expand(2 * B),
                      return_dict=False)[0].float()
            vu, vc = v.chunk(2)
            x = ref_sched.step(vu + 5.0 * (vc - vu), t, x, return_dict=False)[0]
    out = sample(torch_velocity(model), SchedulerConfig.from_diffusers(d), lat, pe, ne, num_steps=4,
                 guidance_scale=5.0)
    np.testing.assert_allclose(np.asarray(out.latents), x.numpy(), atol=2e-5, rtol=1e-5)
    assert float(out.timestep) == 0.0


@pytest.mark.parametrize("kind,cfg_name", [("ddim", "2b"), ("dpm", "5b")])
def test_jax_transformer_sampling_matches_pipeline(inputs, tmp_path, kind, cfg_name):
    """The whole JAX path (our CogVideoX transformer with its own RoPE + our sampler) against
    CogVideoXPipeline(output_type="latent") on the same weights, noise and embeddings."""
    import unlearn_jax

    torch.manual_seed(1)
    tm = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C, time_embed_dim=8,
        text_embed_dim=D, num_layers=2, sample_width=W, sample_height=H, sample_frames=5, max_text_seq_length=L,
        use_rotary_positional_embeddings=True).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tm.save_pretrained(tmp_path)
    jm = unlearn_jax.load_transformer(tmp_path)
    cfg_d = CFG_2B if cfg_name == "2b" else CFG_5B
    ref, ts = run_pipeline(tm, kind, cfg_d, inputs, guidance=6.0, dynamic=kind == "dpm", seed=3)
    lat, pe, ne = inputs
    step_noise = dpm_used_noise(3, ts, N) if kind == "dpm" else None
    out = jax.jit(lambda x, c, u, sn: sample(
        lambda xx, t, cc: jm.forward(xx, cc, t)[0], SchedulerConfig.from_diffusers(cfg_d, kind=kind), x, c, u,
        num_steps=N, guidance_scale=6.0, use_dynamic_cfg=kind == "dpm", step_noise=sn))(lat, pe, ne, step_noise)
    np.testing.assert_allclose(np.asarray(out.latents), ref, atol=2e-5, rtol=1e-5)
