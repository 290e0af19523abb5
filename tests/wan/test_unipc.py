"""Parity of the 'unipc' scheduler (unlearn_jax.schedulers) with diffusers' UniPCMultistepScheduler as the Wan
pipelines configure it (flow sigmas, flow_prediction, predict_x0, bh2, order 2), step by step and through
`unlearn_jax.sampling.sample`; and of 'flow_euler' with FlowMatchEulerDiscreteScheduler at Wan's shifts."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from repo_paths import MODEL_CONFIGS
from unlearn_jax.errors import UnlearnError
from unlearn_jax.sampling import sample
from unlearn_jax.schedulers import (
    SchedulerConfig, UniPCState, alphas_cumprod, init_state, make_schedule, step, unipc_sigmas,
)

WAN = {name: json.loads((MODEL_CONFIGS / f"{name}_scheduler.json").read_text())
       for name in ("wan21", "wan22", "wan22_ti2v_5b")}
SHAPE = (2, 3, 5, 4, 7)          # (B, C, F, H, W) as the Wan pipeline holds latents; odd sizes
STEPS = (1, 2, 5, 13, 50)
TORCH = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}


def _wan(shift, **changes):
    return {**WAN["wan22"], "flow_shift": shift, **changes}


def _ref(cfg_d, n):
    ref = UniPCMultistepScheduler.from_config(cfg_d)
    ref.set_timesteps(n)
    ref.set_begin_index(0)       # as WanPipeline does
    return ref


def _to_jax(t: torch.Tensor, dtype):
    return jnp.asarray(t.float().numpy()).astype(dtype)


def _state_from(ref, shape) -> UniPCState:
    """Our state holding diffusers' hidden state (before its next step)."""
    hist = [m.float().numpy() if m is not None else np.zeros(shape, np.float32) for m in ref.model_outputs]
    last = ref.last_sample.float().numpy() if ref.last_sample is not None else np.zeros(shape, np.float32)
    started = ref.step_index is not None and ref.step_index > 0
    return UniPCState(jnp.asarray(np.stack(hist)), jnp.asarray(last), jnp.int32(ref.lower_order_nums),
                      jnp.int32(ref.this_order if started else 0))


def _parity(cfg_d, n, sdt=jnp.float32, mdt=jnp.float32, seed=0):
    """A full n-step run of diffusers' scheduler with random model outputs. Every step of ours gets the same
    sample and the same hidden state as diffusers' and must give its next sample, x0 and state (atol 1e-6
    times the inputs' scale);
    a free-running chain of ours (its own samples and states) must end where diffusers does."""
    ref = _ref(cfg_d, n)
    sched = make_schedule(SchedulerConfig.from_diffusers(cfg_d), n)
    f = jax.jit(lambda mo, i, x, st: step(sched, mo, i, x, st))
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32)).to(TORCH[sdt])
    free_x = _to_jax(x, sdt)
    free_state = init_state(sched, free_x)
    for i, t in enumerate(ref.timesteps):
        mo = torch.from_numpy(2 * rng.standard_normal(SHAPE).astype(np.float32)).to(TORCH[mdt])
        out = f(_to_jax(mo, mdt), jnp.int32(i), _to_jax(x, sdt), _state_from(ref, SHAPE))
        (prev,) = ref.step(mo, t, x, return_dict=False)
        assert out.prev_sample.dtype == sdt and prev.dtype == TORCH[sdt]
        # 1e-6 at unit scale: the step sums terms as large as its inputs (|model output| up to ~7 here),
        # and fp32 rounding of those terms (with XLA's FMA contraction, which depends on the host CPU)
        # differs from torch's by a few ulps of the largest one
        atol = 1e-6 * max(1.0, float(x.float().abs().max()), float(mo.float().abs().max()))
        np.testing.assert_allclose(np.asarray(out.prev_sample, np.float32), prev.float().numpy(), atol=atol, rtol=0)
        np.testing.assert_allclose(np.asarray(out.pred_original_sample), ref.model_outputs[-1].float().numpy(),
                                   atol=atol, rtol=0)
        want = _state_from(ref, SHAPE)
        for a, b in zip(out.state, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)
        free = f(_to_jax(mo, mdt), jnp.int32(i), free_x, free_state)
        free_x, free_state = free.prev_sample, free.state
        x = prev
    # fp32: rounding differences (XLA contracts to FMA) add up over the run; bf16 results are bit-equal
    tol = 1e-5 if sdt == jnp.float32 else 1e-6
    np.testing.assert_allclose(np.asarray(free_x, np.float32), x.float().numpy(), atol=tol, rtol=0)
    assert np.all(np.isfinite(x.float().numpy()))
    assert f._cache_size() == 1          # a traced step index: one compilation for the whole run


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(WAN))
def test_wan_configs_read_and_tables_match_diffusers(name):
    cfg = SchedulerConfig.from_diffusers(MODEL_CONFIGS / f"{name}_scheduler.json")
    assert (cfg.kind, cfg.prediction_type, cfg.use_flow_sigmas, cfg.solver_order, cfg.solver_type,
            cfg.lower_order_final, cfg.disable_corrector, cfg.final_sigmas_type) == \
        ("unipc", "flow_prediction", True, 2, "bh2", True, (), "zero")
    assert cfg.flow_shift == (5.0 if "5b" in name else 3.0)
    assert hash(cfg) == hash(SchedulerConfig.from_diffusers(WAN[name]))
    for n in STEPS + (3, 40, 1000):
        ref = _ref(WAN[name], n)
        sched = make_schedule(cfg, n)
        sig, ts = unipc_sigmas(cfg, n)
        np.testing.assert_array_equal(sig, ref.sigmas.numpy())
        np.testing.assert_array_equal(ts, ref.timesteps.numpy())
        np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
        np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
        assert sched.timesteps.dtype == np.int32 and ref.timesteps.dtype == torch.int64
        np.testing.assert_array_equal(sched.sample_timesteps, np.concatenate([ref.timesteps.numpy(), [0]]))
        assert not sched.needs_noise


def test_current_diffusers_config_and_sigma_min():
    """Every key of the installed diffusers' UniPC config is known; 'sigma_min' final sigmas end at the last
    step's sigma (so the sample's timestep after the run is the last step's)."""
    d = {"_class_name": "UniPCMultistepScheduler",
         **UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                   final_sigmas_type="sigma_min").config}
    sched = make_schedule(SchedulerConfig.from_diffusers(d), 7)
    ref = _ref(d, 7)
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    assert sched.sample_timesteps[-1] == sched.timesteps[-1]


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [(jnp.float32, jnp.float32), (jnp.float32, jnp.bfloat16),
                                    (jnp.bfloat16, jnp.bfloat16)], ids=["fp32", "fp32_sample_bf16_output", "bf16"])
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_step_matches_diffusers(shift, dtypes):
    """Wan's settings; (fp32 sample, bf16 output) is what WanPipeline hands the scheduler."""
    for n in STEPS:
        _parity(_wan(shift), n, *dtypes, seed=n)


@pytest.mark.parametrize("changes", [
    {"solver_order": 1}, {"solver_order": 3}, {"disable_corrector": [0, 3, 4]},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"solver_type": "midpoint"},                     # diffusers runs bh2 for it
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_other_options_match_diffusers(changes):
    for n in (2, 13):
        _parity(_wan(3.0, **changes), n, seed=n)


def test_traced_step_index_equals_python_loop():
    sched = make_schedule(SchedulerConfig.from_diffusers(_wan(5.0)), 9)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    mos = jnp.asarray(rng.standard_normal((9, *SHAPE)), jnp.float32)
    x, st = x0, init_state(sched, x0)
    for i in range(9):                               # eager, python int step index
        x, st = step(sched, mos[i], i, x, st)[::2]
    traces = []

    @jax.jit
    def run(x):
        traces.append(1)

        def body(i, carry):
            out = step(sched, mos[i], i, *carry)
            return out.prev_sample, out.state
        return jax.lax.fori_loop(0, 9, body, (x, init_state(sched, x)))

    xt, stt = run(x0)
    # the same arithmetic, fused differently (eager ops vs one compiled loop): rounding-level differences
    np.testing.assert_allclose(np.asarray(xt), np.asarray(x), atol=1e-6, rtol=0)
    for a, b in zip(stt, st):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert len(traces) == 1 and int(stt.this_order) == 1 and int(stt.lower_order_nums) == 2


# ---------------------------------------------------------------------------------------------
# The sampler against diffusers' denoising loop (WanPipeline's, with a toy model)
# ---------------------------------------------------------------------------------------------
C, L, D = SHAPE[1], 5, 6


def _toy_weights():
    rng = np.random.default_rng(7)
    return (rng.standard_normal((C, C)).astype(np.float32) * 0.4, rng.standard_normal((D, C)).astype(np.float32),
            rng.standard_normal(C).astype(np.float32))


def _toy_jax(w, b, tw):
    def velocity(x, t, ctx):      # a fixed linear map of the latents, the prompt and the timestep
        bias = ctx.mean(axis=1) @ b + (t.astype(jnp.float32) / 1000)[:, None] * tw
        return jnp.einsum("oc,bcfhw->bofhw", w, x) + bias[:, :, None, None, None]
    return velocity


def _toy_torch(w, b, tw):
    w, b, tw = map(torch.from_numpy, (w, b, tw))

    def velocity(x, t, ctx):
        bias = ctx.mean(dim=1) @ b + (t.float() / 1000)[:, None] * tw
        return torch.einsum("oc,bcfhw->bofhw", w, x) + bias[:, :, None, None, None]
    return velocity


def _diffusers_loop(cfg_d, n, j, noise, ctx, uncond, g, model):
    """WanPipeline's loop (cond pass, uncond pass, guidance, scheduler.step), stopped after j steps."""
    ref = _ref(cfg_d, n)
    x = torch.from_numpy(noise)
    for t in ref.timesteps[:j]:
        tb = t.expand(x.shape[0])
        out = model(x, tb, torch.from_numpy(ctx))
        if g > 1:
            out_u = model(x, tb, torch.from_numpy(uncond))
            out = out_u + g * (out - out_u)
        x = ref.step(out, t, x, return_dict=False)[0]
    return x.numpy()


@pytest.mark.parametrize("g", [1.0, 5.0])
def test_sampler_stop_after_matches_diffusers_loop(g):
    n, cfg_d = 13, WAN["wan21"]
    weights = _toy_weights()
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    ctx = rng.standard_normal((SHAPE[0], L, D)).astype(np.float32)
    uncond = rng.standard_normal((1, L, D)).astype(np.float32)
    sched = make_schedule(SchedulerConfig.from_diffusers(cfg_d), n)
    run = jax.jit(lambda j: sample(_toy_jax(*weights), sched, noise, ctx, uncond if g > 1 else None,
                                   num_steps=n, guidance_scale=g, stop_after=j))
    for j in (0, 1, 2, 6, n):
        out = run(jnp.int32(j))
        want = _diffusers_loop(cfg_d, n, j, noise, ctx, np.broadcast_to(uncond, ctx.shape).copy(), g,
                               _toy_torch(*weights))
        np.testing.assert_allclose(np.asarray(out.latents), want, atol=2e-5, rtol=1e-5)
        assert int(out.steps) == j and int(out.timestep) == int(sched.sample_timesteps[j])
    assert run._cache_size() == 1


# ---------------------------------------------------------------------------------------------
# flow_euler at Wan's shifts (FlowMatchEulerDiscreteScheduler as WanPipeline calls it)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_flow_euler_at_wan_shifts_matches_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    d = {"_class_name": "FlowMatchEulerDiscreteScheduler", **ref.config}   # every key it saves
    sched = make_schedule(SchedulerConfig.from_diffusers(d), 13)
    ref.set_timesteps(13)
    ref.set_begin_index(0)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())   # float32 timesteps, as diffusers
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    ours = jnp.asarray(x)
    for i, t in enumerate(ref.timesteps):
        mo = rng.standard_normal(SHAPE).astype(np.float32)
        ours = step(sched, jnp.asarray(mo), jnp.int32(i), ours).prev_sample
        x = ref.step(torch.from_numpy(mo), t, torch.from_numpy(x), return_dict=False)[0].numpy()
    np.testing.assert_allclose(np.asarray(ours), x, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field", [
    ({"use_flow_sigmas": False}, "use_flow_sigmas"),
    ({"prediction_type": "epsilon"}, "prediction_type"),
    ({"predict_x0": False}, "predict_x0"),
    ({"thresholding": True}, "thresholding"),
    ({"solver_p": "DPMSolverMultistepScheduler"}, "solver_p"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"shift_terminal": 0.1}, "shift_terminal"),
    ({"solver_type": "bh3"}, "solver_type"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"flow_shift": 0}, "flow_shift"),
    ({"solver_order": 0}, "solver_order"),
    ({"lower_order_final": "yes"}, "lower_order_final"),
    ({"disable_corrector": [1.5]}, "disable_corrector"),
    ({"flow_shitf": 3.0}, "flow_shitf"),
])
def test_unsupported_options_raise_one_line_error(change, field):
    with pytest.raises(UnlearnError) as e:
        SchedulerConfig.from_diffusers(_wan(3.0, **change))
    assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change", [{"solver_type": "bh1"}, {"lower_order_final": False}])
def test_schedules_diffusers_cannot_finish_raise(change):
    """With zero final sigma these give diffusers a non-finite last step; ours refuses them up front."""
    cfg_d = _wan(3.0, **change)
    ref = _ref(cfg_d, 5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps:
        x = ref.step(torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t))), t, x).prev_sample
    assert not torch.isfinite(x).all()
    with pytest.raises(UnlearnError, match="non-finite") as e:
        make_schedule(SchedulerConfig.from_diffusers(cfg_d), 5)
    assert "\n" not in str(e.value)


def test_misc_errors():
    with pytest.raises(UnlearnError, match="prediction_type"):
        SchedulerConfig(kind="unipc")                # diffusers' defaults (epsilon, no flow sigmas)
    cfg = SchedulerConfig(kind="unipc", prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    assert cfg == SchedulerConfig.from_diffusers(WAN["wan21"])
    for bad in (0, 1001, 2.5):
        with pytest.raises(UnlearnError, match="num_steps"):
            make_schedule(cfg, bad)
    with pytest.raises(UnlearnError, match="alphas_cumprod"):
        alphas_cumprod(cfg)
    with pytest.raises(UnlearnError, match="unknown field 'shift'"):
        SchedulerConfig.from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
                                       kind="unipc")
