"""Parity of unlearn_jax.schedulers with diffusers' CogVideoX DDIM / DPM and FlowMatchEuler schedulers."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, FlowMatchEulerDiscreteScheduler

from unlearn_jax.errors import UnlearnError
from unlearn_jax.schedulers import (
    SchedulerConfig, alphas_cumprod, ddpm_timesteps, init_state, make_schedule, step,
)
from repo_paths import MODEL_CONFIGS

CONFIGS = MODEL_CONFIGS
CFG_2B = json.loads((CONFIGS / "cogvideox_2b_scheduler.json").read_text())
CFG_5B = json.loads((CONFIGS / "cogvideox_5b_scheduler.json").read_text())
SHAPE = (2, 3, 4, 5, 6)   # (B, F, C, H, W), tiny

# (id, diffusers config dict); run with DDIM and DPM and several step counts
VARIANTS = {
    "2b": CFG_2B,                                          # v-pred, trailing, zero-SNR, snr shift 3
    "5b": CFG_5B,                                          # v-pred, trailing, zero-SNR, no shift
    "eps_leading_offset": {**CFG_5B, "prediction_type": "epsilon", "timestep_spacing": "leading",
                           "steps_offset": 1, "rescale_betas_zero_snr": False, "snr_shift_scale": 2.0},
    "v_linspace_linear": {**CFG_2B, "timestep_spacing": "linspace", "beta_schedule": "linear",
                          "beta_start": 0.0001, "beta_end": 0.02, "set_alpha_to_one": False,
                          "rescale_betas_zero_snr": False},
    "eps_trailing_noalpha1": {**CFG_2B, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                              "set_alpha_to_one": False},
    "sample_cos": {**CFG_5B, "prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2",
                   "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
}
STEPS = (1, 2, 7, 50)
CLASSES = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}


def _diffusers(kind, cfg):
    return CLASSES[kind].from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tables_match_diffusers(variant):
    cfg_d = VARIANTS[variant]
    for kind in ("ddim", "dpm"):
        ours = SchedulerConfig.from_diffusers(cfg_d, kind=kind)
        ref = _diffusers(kind, cfg_d)
        ac = alphas_cumprod(ours)
        assert ac.dtype == np.dtype(str(ref.alphas_cumprod.dtype).replace("torch.", ""))
        np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=2e-7)
        for n in STEPS + (3, 999, 1000):
            if n == 1000 and ours.steps_offset:
                continue  # leading + offset runs past the table (diffusers indexes out of range too)
            ref.set_timesteps(n)
            np.testing.assert_array_equal(ddpm_timesteps(ours, n), ref.timesteps.numpy())
            sched = make_schedule(ours, n)
            np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
            assert sched.timesteps.dtype == np.int32 and sched.sample_timesteps.shape == (n + 1,)


def test_float32_tables_match_diffusers():
    """Linear betas with the zero-SNR rescale, and trained betas (float32 tables). The rescale's
    float32 square roots are torch's vectorised ones (not correctly rounded), hence the rtol."""
    betas = np.linspace(1e-4, 0.03, 1000).tolist()
    for cfg_d in ({**CFG_2B, "beta_schedule": "linear"},
                  {**CFG_5B, "trained_betas": betas, "rescale_betas_zero_snr": False}):
        ref = CogVideoXDDIMScheduler.from_config({k: v for k, v in cfg_d.items() if not k.startswith("_")})
        ac = alphas_cumprod(SchedulerConfig.from_diffusers(cfg_d))
        assert ac.dtype == np.float32 and ref.alphas_cumprod.dtype == torch.float32
        np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=2e-7)
    # without the rescale, float32 tables are bit-exact (torch.linspace reproduced, FMA included)
    ref = CogVideoXDDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ac = alphas_cumprod(SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    np.testing.assert_array_equal(ac, ref.alphas_cumprod.numpy())


def _run_parity(kind, cfg_d, n, seed=0):
    """Step a diffusers scheduler and ours side by side through a full n-step run with random
    model outputs; every step gets the same inputs on both sides (diffusers' sample and x0 history)
    and must give the same prev sample / x0 / state. Also a free-running chain on our side."""
    ours_cfg = SchedulerConfig.from_diffusers(cfg_d, kind=kind)
    ref = _diffusers(kind, cfg_d)
    ref.set_timesteps(n)
    sched = make_schedule(ours_cfg, n)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    gen = torch.Generator().manual_seed(seed)
    T = cfg_d.get("num_train_timesteps", 1000)

    @jax.jit
    def our_step(mo, i, sample, st, noise):
        return step(sched, mo, i, sample, st, noise=noise)

    state = init_state(sched, x)
    free_x, free_state = jnp.asarray(x), init_state(sched, x)
    old = None
    for i, t in enumerate(ref.timesteps):
        mo = rng.standard_normal(SHAPE).astype(np.float32)
        noise = np.zeros(SHAPE, np.float32)
        if kind == "ddim":
            prev_ref, x0_ref = ref.step(torch.from_numpy(mo), t, torch.from_numpy(x), return_dict=False)
        else:
            # the noise diffusers will draw: one normal per step, a second one (which it uses)
            # on steps with a second-order update
            probe = torch.Generator().set_state(gen.get_state())
            noise = torch.randn(SHAPE, generator=probe).numpy()
            if i > 0 and int(t) - T // n >= 0:
                noise = torch.randn(SHAPE, generator=probe).numpy()
            prev_ref, x0_ref = ref.step(torch.from_numpy(mo), old, t, ref.timesteps[i - 1] if i > 0 else None,
                                        torch.from_numpy(x), generator=gen, return_dict=False)
            assert probe.get_state().equal(gen.get_state())   # same number of draws as predicted
            old = x0_ref
        # traced step index: one compilation for every step
        out = our_step(jnp.asarray(mo), jnp.int32(i), jnp.asarray(x), state, jnp.asarray(noise))
        # fp32 tolerance; epsilon-prediction's x0 = (x - sqrt(1-a) eps) / sqrt(a) amplifies
        # rounding (XLA contracts to FMA, torch does not) by 1/sqrt(a) near zero SNR
        tol = 1e-6
        if kind == "dpm" and ref.alphas_cumprod.dtype == torch.float32:
            # float32 tables (linear / cosine betas): diffusers takes log-SNR differences h of
            # float32 logs (torch's vectorised log/exp/sqrt are not correctly rounded), so its
            # coefficients carry ~1e-6 relative error; ours are correctly rounded
            tol = 5e-6
        if ours_cfg.prediction_type == "epsilon":
            tol *= max(1.0, 1.0 / float(sched.coef["x0_sample"][i]))
        np.testing.assert_allclose(np.asarray(out.prev_sample), prev_ref.numpy(), atol=tol, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out.pred_original_sample), x0_ref.numpy(), atol=tol, rtol=1e-6)
        if kind == "dpm":
            np.testing.assert_allclose(np.asarray(out.state.old_pred_original_sample), x0_ref.numpy(),
                                       atol=tol, rtol=1e-6)
            state = jax.tree.map(lambda a: jnp.asarray(old.numpy()), state)
        free = our_step(jnp.asarray(mo), jnp.int32(i), free_x, free_state, jnp.asarray(noise))
        free_x, free_state = free.prev_sample, free.state
        x = prev_ref.numpy()
    # free-running chain (our own state throughout) ends at diffusers' result
    np.testing.assert_allclose(np.asarray(free_x), x, atol=1e-5, rtol=1e-5)
    assert our_step._cache_size() == 1
    return x


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_matches_diffusers(kind, variant):
    for n in STEPS:
        out = _run_parity(kind, VARIANTS[variant], n, seed=n)
        assert np.all(np.isfinite(out))


def test_step_index_is_traced_and_sample_dtype_kept():
    sched = make_schedule(SchedulerConfig.from_diffusers(CFG_2B), 10)
    x = jnp.ones(SHAPE, jnp.bfloat16)
    mo = jnp.full(SHAPE, 0.5, jnp.float32)
    traces = []

    @jax.jit
    def f(i):
        traces.append(1)
        return step(sched, mo, i, x).prev_sample

    outs = [f(jnp.int32(i)) for i in range(10)]
    assert len(traces) == 1
    assert outs[0].dtype == jnp.bfloat16
    # different steps give different results (the index is really used)
    assert len({float(o.astype(jnp.float32).mean()) for o in outs}) == 10


def test_dpm_needs_noise_or_key():
    sched = make_schedule(SchedulerConfig.from_diffusers(CFG_5B, kind="dpm"), 5)
    x = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        step(sched, x, 0, x, init_state(sched, x))
    f = jax.jit(lambda k: step(sched, x, 0, x, init_state(sched, x), key=k).prev_sample)
    a, b, c = f(jax.random.key(1)), f(jax.random.key(1)), f(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# Flow matching Euler
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift,n,T,stochastic", [(1.0, 4, 1000, False), (7.0, 30, 1000, False),
                                                  (5.0, 13, 1000, False), (3.0, 9, 500, True)])
def test_flow_euler_matches_diffusers(shift, n, T, stochastic):
    d = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift, "num_train_timesteps": T,
         "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "invert_sigmas": False,
         "stochastic_sampling": stochastic}
    ours = SchedulerConfig.from_diffusers(d)
    assert ours.kind == "flow_euler"
    ref = FlowMatchEulerDiscreteScheduler.from_config(d)
    ref.set_timesteps(n)
    sched = make_schedule(ours, n)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    assert sched.timesteps.dtype == np.float32

    f = jax.jit(lambda mo, i, x, nz: step(sched, mo, i, x, noise=nz).prev_sample)
    rng = np.random.default_rng(n)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    ours_x = jnp.asarray(x)
    gen = torch.Generator().manual_seed(3)
    for i, t in enumerate(ref.timesteps):
        mo = rng.standard_normal(SHAPE).astype(np.float32)
        noise = torch.randn(SHAPE, generator=torch.Generator().set_state(gen.get_state())).numpy()
        (prev,) = ref.step(torch.from_numpy(mo), t, torch.from_numpy(x), generator=gen, return_dict=False)
        out = f(jnp.asarray(mo), jnp.int32(i), jnp.asarray(x), jnp.asarray(noise))
        np.testing.assert_allclose(np.asarray(out), prev.numpy(), atol=1e-6, rtol=1e-6)
        ours_x = f(jnp.asarray(mo), jnp.int32(i), ours_x, jnp.asarray(noise))
        x = prev.numpy()
    np.testing.assert_allclose(np.asarray(ours_x), x, atol=1e-5, rtol=1e-5)
    assert f._cache_size() == 1


@pytest.mark.parametrize("shift,n", [(7.0, 50), (7.0, 13), (1.0, 9), (5.0, 30)])
def test_flow_euler_linspace_sigmas_match_hunyuan_pipeline(shift, n):
    """`flow_sigmas="linspace"`: the schedule HunyuanVideoPipeline sets with
    `set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1])`, bit for bit."""
    d = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift, "num_train_timesteps": 1000}
    ours = SchedulerConfig.from_diffusers(d).replace(flow_sigmas="linspace")
    ref = FlowMatchEulerDiscreteScheduler.from_config(d)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1])
    sched = make_schedule(ours, n)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    with pytest.raises(UnlearnError, match="flow_sigmas"):
        ours.replace(flow_sigmas="karras")


# ---------------------------------------------------------------------------------------------
# Config reading and errors
# ---------------------------------------------------------------------------------------------
def test_from_diffusers_reads_files_and_folders(tmp_path):
    a = SchedulerConfig.from_diffusers(CONFIGS / "cogvideox_2b_scheduler.json")
    assert a == SchedulerConfig.from_diffusers(CFG_2B)
    assert (a.kind, a.prediction_type, a.timestep_spacing, a.snr_shift_scale) == ("ddim", "v_prediction",
                                                                                    "trailing", 3.0)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(CFG_5B))
    b = SchedulerConfig.from_diffusers(tmp_path, kind="dpm")
    assert b.kind == "dpm" and b.snr_shift_scale == 1.0 and b.rescale_betas_zero_snr
    assert hash(b) == hash(SchedulerConfig.from_diffusers(str(tmp_path / "scheduler_config.json"), kind="dpm"))
    c = SchedulerConfig.from_diffusers({**CFG_2B, "_class_name": "CogVideoXDPMScheduler"})
    assert c.kind == "dpm"


@pytest.mark.parametrize("change,field", [
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"snr_shift_scale": -1.0}, "snr_shift_scale"),
    ({"steps_offset": -2}, "steps_offset"),
    ({"beta_start": 2.0}, "beta_start"),
    ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
    ({"set_alpha_to_one": "yes"}, "set_alpha_to_one"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"_class_name": "EulerDiscreteScheduler"}, "_class_name"),
    ({"timestep_spacin": "trailing"}, "timestep_spacin"),
])
def test_bad_config_values_raise_one_line_error(change, field):
    with pytest.raises(UnlearnError) as e:
        SchedulerConfig.from_diffusers({**CFG_2B, **change})
    msg = str(e.value)
    assert field in msg and "\n" not in msg


@pytest.mark.parametrize("change,field", [
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"invert_sigmas": True}, "invert_sigmas"),
    ({"shift": 0}, "shift"),
])
def test_bad_flow_config_raises(change, field):
    with pytest.raises(UnlearnError) as e:
        SchedulerConfig.from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, **change})
    assert field in str(e.value) and "\n" not in str(e.value)


def test_bad_kind_steps_and_paths_raise(tmp_path):
    with pytest.raises(UnlearnError, match="kind"):
        SchedulerConfig.from_diffusers(CFG_2B, kind="euler")
    with pytest.raises(UnlearnError, match="kind"):
        SchedulerConfig(kind="heun")
    with pytest.raises(UnlearnError, match="_class_name"):
        SchedulerConfig.from_diffusers({k: v for k, v in CFG_2B.items() if k != "_class_name"})
    cfg = SchedulerConfig.from_diffusers(CFG_2B)
    for bad in (0, 1001, 2.5):
        with pytest.raises(UnlearnError, match="num_steps"):
            make_schedule(cfg, bad)
    with pytest.raises(UnlearnError, match="steps_offset"):
        make_schedule(cfg.replace(timestep_spacing="leading", steps_offset=1), 1000)
    with pytest.raises(UnlearnError, match="no such file"):
        SchedulerConfig.from_diffusers(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UnlearnError, match="JSON"):
        SchedulerConfig.from_diffusers(tmp_path / "bad.json")
