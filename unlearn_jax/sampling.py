"""Classifier-free-guided sampling, traceable end to end, with an early stop at a traced step.

`sample(...)` runs the denoising loop of the diffusers pipelines (`CogVideoXPipeline` for DDIM/DPM;
the same loop with a flow-matching scheduler for flow models) on any model given as

    velocity_fn(latents (B, ...), timesteps (B,), context) -> (B, ...)

where `context` is the family's conditioning pytree (CogVideoX: the (B, L, D) embeddings array;
other families add masks and pooled vectors), every leaf with the batch first.

Per step, the unconditional and the conditional pass go through ONE call, batched as
[uncond; cond] like the pipeline, then `uncond + g * (cond - uncond)`; with `use_dynamic_cfg`
the scale follows the pipeline's cosine ramp over the timestep. A second scale below a boundary
(`guidance_scale_2`, `boundary`: Wan 2.2 A14B's low-noise stage) guides the steps whose timestep is
< boundary; whether guidance runs at all is decided by `guidance_scale`, as in the pipeline. The loop is a `lax.fori_loop`
whose trip count may be traced (`stop_after=j`), so one compiled sampler serves every j: it
returns the latents after j steps and the timestep they sit at (the state a training step
needs), or the final latents when `stop_after` is None.

`sample` is a pure function meant to be called inside the caller's `jax.jit` (the velocity_fn
can then close over traced parameters); `make_sampler` returns a ready jitted closure.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax.errors import UnlearnError
from unlearn_jax.schedulers import Schedule, SchedulerConfig, init_state, make_schedule, step

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class SampleOutput(NamedTuple):
    latents: jax.Array    # x_t after `steps` steps (the noise's dtype)
    timestep: jax.Array   # scalar: the timestep x_t sits at (schedule.sample_timesteps[steps])
    steps: jax.Array      # scalar int32: the number of steps taken


def uses_cfg(guidance_scale) -> bool:
    """Whether guidance runs the unconditional pass: as in the pipeline, not when the scale is a
    concrete number <= 1 (a traced scale always guides)."""
    if isinstance(guidance_scale, (int, float, np.number)) or (
            isinstance(guidance_scale, (np.ndarray, jax.Array)) and not isinstance(guidance_scale, jax.core.Tracer)
            and np.ndim(guidance_scale) == 0):
        return float(guidance_scale) > 1.0
    return True


def guidance_scales(schedule: Schedule, guidance_scale, use_dynamic_cfg: bool = False, guidance_scale_2=None,
                    boundary=None):
    """(N,) float32 guidance scale of each step. The dynamic ramp is CogVideoXPipeline's:
    `1 + g * (1 - cos(pi * ((N - t) / N) ** 5)) / 2` with t the step's timestep value and N the
    number of steps, computed in float64 on the host when g is a concrete number.

    guidance_scale_2 / boundary: the steps whose timestep is below `boundary` take `guidance_scale_2`
    instead (both None: one scale throughout). The comparison is float32, as WanPipeline's
    `t >= boundary_timestep` on its timesteps."""
    first = _scale_table(schedule, guidance_scale, use_dynamic_cfg)
    if guidance_scale_2 is None:
        return first
    second = _scale_table(schedule, guidance_scale_2, use_dynamic_cfg)
    high = jnp.asarray(schedule.timesteps).astype(jnp.float32) >= jnp.float32(boundary)
    return jnp.where(high, first, second)


def _check_second_scale(guidance_scale_2, boundary):
    if guidance_scale_2 is None:
        return
    _check_guidance(guidance_scale_2, "guidance_scale_2")
    if boundary is None:
        raise UnlearnError("guidance_scale_2 needs a boundary (the timestep below which it guides); the model has "
                           "one stage")


def _scale_table(schedule: Schedule, guidance_scale, use_dynamic_cfg: bool):
    n = schedule.num_steps
    if not use_dynamic_cfg:
        return jnp.full((n,), guidance_scale, jnp.float32)
    ts = [float(t) for t in np.asarray(schedule.timesteps)]
    ramp = [(1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2 for t in ts]
    if not isinstance(guidance_scale, jax.core.Tracer) and np.ndim(guidance_scale) == 0:
        g = float(guidance_scale)
        return jnp.asarray(np.asarray([1 + g * r for r in ramp], np.float64).astype(np.float32))
    return 1.0 + jnp.asarray(guidance_scale, jnp.float32) * jnp.asarray(np.asarray(ramp, np.float32))


def _check_guidance(g, name: str = "guidance_scale"):
    if isinstance(g, jax.core.Tracer):
        return
    try:
        ok = not isinstance(g, (bool, str)) and np.ndim(g) == 0 and bool(np.isfinite(np.asarray(g, np.float64)))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UnlearnError(f"{name} = {g!r} is invalid; expected a finite number")


def _check_shapes(noise, context, uncond_context, cfg: bool):
    """The conditioning is a pytree (the family's: an embeddings array, or embeddings + masks + pooled
    vectors); every leaf has the batch on its first axis."""
    if jnp.ndim(noise) != 5:
        raise ValueError(f"noise must be (B, ...latent axes) with 5 dimensions; got shape {jnp.shape(noise)}")
    b = jnp.shape(noise)[0]
    leaves = jax.tree.leaves(context)
    if not leaves or any(jnp.ndim(x) < 1 or jnp.shape(x)[0] != b for x in leaves):
        shapes = [jnp.shape(x) for x in leaves]
        raise ValueError(f"context must be (B, L, D) (or a pytree of arrays with a leading B) with B = {b}; "
                         f"got shape {shapes[0] if len(shapes) == 1 else shapes}")
    if cfg:
        if uncond_context is None:
            raise ValueError("guidance_scale > 1 needs uncond_context")
        ok = jax.tree.structure(uncond_context) == jax.tree.structure(context) and all(
            jnp.ndim(u) == jnp.ndim(c) and jnp.shape(u)[1:] == jnp.shape(c)[1:] and jnp.shape(u)[0] in (1, b)
            for u, c in zip(jax.tree.leaves(uncond_context), leaves))
        if not ok:
            show = lambda t: jax.tree.map(jnp.shape, t)  # noqa: E731
            raise ValueError(f"uncond_context must be (B or 1, L, D) like context {show(context)}; "
                             f"got {show(uncond_context)}")


def guided_context(context, uncond_context):
    """[uncond; cond] along the batch of every leaf (uncond broadcast from batch 1), as the pipelines batch them."""
    def join(c, u):
        c = jnp.asarray(c)
        return jnp.concatenate([jnp.broadcast_to(jnp.asarray(u, c.dtype), c.shape), c], axis=0)

    return jax.tree.map(join, context, uncond_context)


def sample(
    velocity_fn: VelocityFn,
    scheduler_cfg: SchedulerConfig | Schedule,
    noise,
    context,
    uncond_context=None,
    *,
    num_steps: int,
    guidance_scale=6.0,
    use_dynamic_cfg: bool = False,
    stop_after=None,
    key=None,
    step_noise=None,
    guidance_scale_2=None,
    boundary=None,
) -> SampleOutput:
    """Denoise `noise` (B, F, C, H, W) for `num_steps` steps, or only the first `stop_after`.

    scheduler_cfg: a `SchedulerConfig` (or a ready `Schedule` of `num_steps` steps).
    context / uncond_context: the conditioning pytrees (e.g. (B, L, D) prompt embeddings); uncond's
        leaves may have batch 1 (broadcast).
        uncond_context is unused (may be None) when guidance_scale is a number <= 1.
    guidance_scale: a number (exact dynamic-CFG table) or a traced scalar.
    guidance_scale_2, boundary: the scale of the steps whose timestep is < boundary (None: guidance_scale
        throughout). Guidance runs (the unconditional pass) when guidance_scale says so, as WanPipeline
        decides it from its first scale alone.
    stop_after: None (run every step) or an int / traced int32 scalar j in [0, num_steps]
        (clipped into that range when traced). No recompilation across j.
    key: PRNG key for stochastic schedulers (DPM): step i draws `normal(fold_in(key, i))`, so
        the first j steps are the same whatever `stop_after` is.
    step_noise: (num_steps, B, F, C, H, W) explicit per-step noise instead of `key` (step i adds
        step_noise[i]); for parity with another implementation.

    The model's output is cast to float32 before guidance (as the pipeline does); the latents
    keep the noise's dtype between steps. The returned latents carry no gradient
    (`stop_gradient`): differentiate the loss at x_t, never through the sampler. Timesteps reach velocity_fn as int32 (DDIM/DPM) or
    float32 (flow) arrays of shape (B,) — (2B,) when guidance runs.
    """
    if isinstance(scheduler_cfg, Schedule):
        schedule = scheduler_cfg
        if schedule.num_steps != num_steps:
            raise ValueError(f"the Schedule has {schedule.num_steps} steps, num_steps = {num_steps}")
    elif isinstance(scheduler_cfg, SchedulerConfig):
        schedule = make_schedule(scheduler_cfg, num_steps)
    else:
        raise TypeError(f"scheduler_cfg must be a SchedulerConfig or Schedule, got {type(scheduler_cfg).__name__}")
    noise = jnp.asarray(noise)
    _check_guidance(guidance_scale)
    _check_second_scale(guidance_scale_2, boundary)
    cfg = uses_cfg(guidance_scale)
    _check_shapes(noise, context, uncond_context, cfg)
    B = noise.shape[0]
    if schedule.needs_noise:
        if step_noise is not None:
            step_noise = jnp.asarray(step_noise)
            if step_noise.shape != (num_steps, *noise.shape):
                raise ValueError(f"step_noise must have shape {(num_steps, *noise.shape)}; got {step_noise.shape}")
        elif key is None:
            raise ValueError(f"a {schedule.kind!r} sampler is stochastic: pass key= or step_noise=")

    context = jax.tree.map(jnp.asarray, context)
    model_context = guided_context(context, uncond_context) if cfg else context
    scales = guidance_scales(schedule, guidance_scale, use_dynamic_cfg, guidance_scale_2, boundary) if cfg else None
    timesteps = jnp.asarray(schedule.timesteps)

    if stop_after is None:
        stop = num_steps
    elif isinstance(stop_after, (int, np.integer)) and not isinstance(stop_after, bool):
        if not 0 <= stop_after <= num_steps:
            raise ValueError(f"stop_after = {stop_after} is outside [0, {num_steps}]")
        stop = jnp.asarray(stop_after, jnp.int32)   # traced-like: one compilation for every j
    else:
        stop = jnp.clip(jnp.asarray(stop_after).astype(jnp.int32), 0, num_steps)

    body = _guided_step(velocity_fn, schedule, timesteps, model_context, scales, cfg, B, key, step_noise)

    carry = (noise, init_state(schedule, noise))
    x, _ = jax.lax.fori_loop(0, stop, body, carry)
    steps = jnp.asarray(stop, jnp.int32)
    # a sample is data, not a function of the parameters: no gradient flows back through the
    # loop (reverse-mode through a loop with a traced trip count is impossible anyway)
    return SampleOutput(jax.lax.stop_gradient(x), jnp.asarray(schedule.sample_timesteps)[steps], steps)


def _guided_step(velocity_fn, schedule, timesteps, model_context, scales, cfg, B, key, step_noise):
    """One guided denoising step `body(i, (x, state)) -> (x, state)`, shared by the samplers."""

    def body(i, carry):
        x, state = carry
        t = timesteps[i]
        if cfg:
            model_in = jnp.concatenate([x, x], axis=0)
            t_b = jnp.broadcast_to(t, (2 * B,))
        else:
            model_in, t_b = x, jnp.broadcast_to(t, (B,))
        out = jnp.asarray(velocity_fn(model_in, t_b, model_context)).astype(jnp.float32)
        if cfg:
            out_uncond, out_cond = out[:B], out[B:]
            out = out_uncond + scales[i] * (out_cond - out_uncond)
        n = None
        if schedule.needs_noise:
            n = step_noise[i] if step_noise is not None else \
                jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        res = step(schedule, out, i, x, state, noise=n)
        return res.prev_sample.astype(x.dtype), res.state

    return body


def sample_trajectory(velocity_fn: VelocityFn, schedule: Schedule, noise, context, uncond_context=None, *,
                      guidance_scale=6.0, use_dynamic_cfg: bool = False, key=None, guidance_scale_2=None,
                      boundary=None) -> jax.Array:
    """Every intermediate latent of a full sampling run: (num_steps + 1, B, F, C, H, W), entry j being
    the latents after j steps (entry 0 the noise), i.e. what `sample(..., stop_after=j)` returns."""
    noise = jnp.asarray(noise)
    _check_second_scale(guidance_scale_2, boundary)
    cfg = uses_cfg(guidance_scale)
    _check_shapes(noise, context, uncond_context, cfg)
    if schedule.needs_noise and key is None:
        raise ValueError(f"a {schedule.kind!r} sampler is stochastic: pass key=")
    context = jax.tree.map(jnp.asarray, context)
    model_context = guided_context(context, uncond_context) if cfg else context
    scales = guidance_scales(schedule, guidance_scale, use_dynamic_cfg, guidance_scale_2, boundary) if cfg else None
    body = _guided_step(velocity_fn, schedule, jnp.asarray(schedule.timesteps), model_context, scales, cfg,
                        noise.shape[0], key, None)

    def scan_body(carry, i):
        new = body(i, carry)
        return new, new[0]

    _, xs = jax.lax.scan(scan_body, (noise, init_state(schedule, noise)), jnp.arange(schedule.num_steps))
    return jnp.concatenate([noise[None], xs], axis=0)


def make_sampler(
    velocity_fn: VelocityFn,
    scheduler_cfg: SchedulerConfig,
    *,
    num_steps: int,
    guidance_scale=6.0,
    use_dynamic_cfg: bool = False,
    guidance_scale_2=None,
    boundary=None,
) -> Callable[..., SampleOutput]:
    """A jitted `fn(noise, context, uncond_context=None, stop_after=None, key=None,
    step_noise=None) -> SampleOutput` for a fixed model, scheduler, step count and scale(s).
    Compiles once per input shapes and per presence of stop_after/key/step_noise; not per value
    of stop_after."""
    schedule = make_schedule(scheduler_cfg, num_steps)

    @jax.jit
    def run(noise, context, uncond_context=None, stop_after=None, key=None, step_noise=None):
        return sample(velocity_fn, schedule, noise, context, uncond_context, num_steps=num_steps,
                      guidance_scale=guidance_scale, use_dynamic_cfg=use_dynamic_cfg,
                      stop_after=stop_after, key=key, step_noise=step_noise, guidance_scale_2=guidance_scale_2,
                      boundary=boundary)

    return run


__all__ = ["SampleOutput", "VelocityFn", "guidance_scales", "make_sampler", "sample", "sample_trajectory",
           "uses_cfg", "guided_context"]
