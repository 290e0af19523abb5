"""Samplers' schedulers as pure functions: CogVideoX DDIM, CogVideoX DPM-Solver++(2M), flow-matching Euler.

They compute exactly what diffusers' `CogVideoXDDIMScheduler`, `CogVideoXDPMScheduler` and
`FlowMatchEulerDiscreteScheduler` (static shift) compute, but without hidden state:

- `SchedulerConfig` (frozen, hashable: usable as a static jit argument) holds the config
  fields; `SchedulerConfig.from_diffusers(dict | json file | folder)` reads a diffusers
  `scheduler_config.json`.
- `make_schedule(cfg, num_steps)` returns a `Schedule`: the timesteps of an N-step run and
  every per-step coefficient, precomputed on the host in the precision diffusers uses
  (float64 for the scaled-linear betas) and stored in float32. A `Schedule` is a pytree.
- `step(schedule, model_output, step_index, sample, state, noise=...)` advances one step.
  `step_index` may be a traced integer, so one compiled loop body serves every step.
  The DPM solver is multistep: it carries the previous step's predicted x0 in its `state`
  (`init_state` makes the first one). Its noise is an explicit input (or drawn from a key).

The step arithmetic runs in float32 whatever the sample's dtype, like the CogVideoX pipeline,
which casts the model output to float32 before stepping; the result is cast back to the
sample's dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax.errors import UnlearnError

KINDS = ("ddim", "dpm", "flow_euler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# diffusers class name -> our kind
_CLASS_KINDS = {
    "CogVideoXDDIMScheduler": "ddim",
    "CogVideoXDPMScheduler": "dpm",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
}

# Keys of the diffusers configs that have no effect on what these schedulers compute
# (CogVideoX's DDIM/DPM `step` never clips nor thresholds; the flow-matching resolution
# shift parameters only matter with `use_dynamic_shifting`, which is refused).
_DDPM_INERT_KEYS = ("clip_sample", "clip_sample_range", "sample_max_value")
_FLOW_INERT_KEYS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")
# Flow-matching options that change the schedule and that we do not implement: key -> its neutral value.
_FLOW_UNSUPPORTED = {
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
_DDPM_FIELDS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "set_alpha_to_one", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr", "snr_shift_scale",
)
_FLOW_FIELDS = ("num_train_timesteps", "shift", "stochastic_sampling")


def _bad(field: str, value: Any, expected: str) -> UnlearnError:
    return UnlearnError(f"scheduler config: {field} = {value!r} is invalid; expected {expected}")


def _one_of(options) -> str:
    return "one of " + ", ".join(repr(o) for o in options)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A scheduler's configuration: diffusers' field names and defaults (the CogVideoX
    schedulers' defaults for the DDIM/DPM fields). `kind` picks the algorithm:
    'ddim' (CogVideoXDDIMScheduler), 'dpm' (CogVideoXDPMScheduler) or 'flow_euler'
    (FlowMatchEulerDiscreteScheduler with a static `shift`)."""

    kind: str = "ddim"
    num_train_timesteps: int = 1000
    # DDIM / DPM (variance-preserving) fields
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0
    # flow-matching fields
    shift: float = 1.0
    stochastic_sampling: bool = False

    def __post_init__(self):
        if isinstance(self.trained_betas, list):
            object.__setattr__(self, "trained_betas", tuple(self.trained_betas))
        if self.kind not in KINDS:
            raise _bad("kind", self.kind, _one_of(KINDS))
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise _bad("num_train_timesteps", self.num_train_timesteps, "an integer >= 2")
        for name in ("set_alpha_to_one", "rescale_betas_zero_snr", "stochastic_sampling"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "true or false")
        if self.kind == "flow_euler":
            if not _is_number(self.shift) or not self.shift > 0:
                raise _bad("shift", self.shift, "a number > 0")
            return
        if self.beta_schedule not in BETA_SCHEDULES:
            raise _bad("beta_schedule", self.beta_schedule, _one_of(BETA_SCHEDULES))
        if self.prediction_type not in PREDICTION_TYPES:
            raise _bad("prediction_type", self.prediction_type, _one_of(PREDICTION_TYPES))
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise _bad("timestep_spacing", self.timestep_spacing, _one_of(TIMESTEP_SPACINGS))
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 < v < 1.0:
                raise _bad(name, v, "a number in (0, 1)")
        if not _is_number(self.snr_shift_scale) or not self.snr_shift_scale > 0:
            raise _bad("snr_shift_scale", self.snr_shift_scale, "a number > 0")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise _bad("steps_offset", self.steps_offset, "an integer >= 0")
        if self.trained_betas is not None:
            tb = self.trained_betas
            if not isinstance(tb, tuple) or len(tb) != self.num_train_timesteps \
                    or not all(_is_number(b) and 0.0 <= b < 1.0 for b in tb):
                raise _bad("trained_betas", _short(tb),
                           f"null or a list of {self.num_train_timesteps} numbers in [0, 1)")

    @classmethod
    def from_diffusers(cls, source: dict | str | Path, *, kind: str | None = None) -> "SchedulerConfig":
        """Build from a diffusers scheduler config: a dict, a json file, or a folder holding
        `scheduler_config.json`. `kind` overrides the algorithm named by `_class_name`
        (e.g. `kind="dpm"` for the CogVideoX-5B DDIM config, as its pipeline is run with DPM)."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                path = path / "scheduler_config.json"
            if not path.is_file():
                raise UnlearnError(f"scheduler config: no such file {str(path)!r}")
            try:
                d = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UnlearnError(f"scheduler config: {str(path)!r} is not valid JSON ({e})") from None
        elif isinstance(source, dict):
            d = source
        else:
            raise UnlearnError(f"scheduler config: expected a dict or a path, got {type(source).__name__}")
        if not isinstance(d, dict):
            raise UnlearnError("scheduler config: the JSON is not an object")

        if kind is None:
            name = d.get("_class_name")
            if name is None:
                raise UnlearnError("scheduler config: _class_name is missing; pass kind= ('ddim', 'dpm' or 'flow_euler')")
            if name not in _CLASS_KINDS:
                raise _bad("_class_name", name, _one_of(_CLASS_KINDS))
            kind = _CLASS_KINDS[name]
        elif kind not in KINDS:
            raise _bad("kind", kind, _one_of(KINDS))

        fields, inert = (_FLOW_FIELDS, _FLOW_INERT_KEYS) if kind == "flow_euler" else (_DDPM_FIELDS, _DDPM_INERT_KEYS)
        kw: dict[str, Any] = {"kind": kind}
        for key, value in d.items():
            if key.startswith("_") or key in inert:
                continue
            if kind == "flow_euler" and key in _FLOW_UNSUPPORTED:
                if value != _FLOW_UNSUPPORTED[key] and not (key == "shift_terminal" and not value):
                    raise _bad(key, value, f"{_FLOW_UNSUPPORTED[key]!r} (other values are not supported)")
                continue
            if key not in fields:
                raise UnlearnError(f"scheduler config: unknown field {key!r} for a {kind!r} scheduler")
            if key == "trained_betas" and value is not None:
                value = tuple(value) if isinstance(value, (list, tuple)) else value
            kw[key] = value
        return cls(**kw)

    def replace(self, **changes) -> "SchedulerConfig":
        return dataclasses.replace(self, **changes)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# --------------------------------------------------------------------------------------------
# Tables (host side, numpy, in diffusers' precision)
# --------------------------------------------------------------------------------------------
def _torch_linspace(start: float, end: float, n: int, dtype) -> np.ndarray:
    """`torch.linspace` as its CPU kernel computes it: the first half counts up from `start`, the
    second half down from `end`, each entry one fused multiply-add (exact product and sum, one
    rounding), in the output dtype. Matching it to the bit matters: float32 tables feed
    `1 - alphas_cumprod`, where one ulp of alpha is a large relative change."""
    start, end = dtype(start), dtype(end)
    if n == 1:
        return np.array([start], dtype)
    step = (end - start) / dtype(n - 1)
    fs, fe, fstep = Fraction(float(start)), Fraction(float(end)), Fraction(float(step))
    vals = [fs + fstep * i if i < n // 2 else fe - fstep * (n - 1 - i) for i in range(n)]
    return np.array([float(v) for v in vals], np.float64).astype(dtype)


def _betas(cfg: SchedulerConfig) -> np.ndarray:
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, np.float32)
    if cfg.beta_schedule == "linear":
        return _torch_linspace(cfg.beta_start, cfg.beta_end, T, np.float32)
    if cfg.beta_schedule == "scaled_linear":
        return _torch_linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, np.float64) ** 2
    # squaredcos_cap_v2 (Glide cosine), in Python floats then float32
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.asarray([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """The scheduler's `alphas_cumprod` (T,), after the SNR shift and the zero-terminal-SNR
    rescale, in diffusers' dtype (float64 for scaled_linear betas, float32 otherwise)."""
    if cfg.kind == "flow_euler":
        raise UnlearnError("scheduler config: a 'flow_euler' scheduler has no alphas_cumprod")
    return _alphas_cumprod(cfg.replace(kind="ddim")).copy()


@functools.lru_cache(maxsize=16)
def _alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    betas = _betas(cfg)
    dt = betas.dtype.type
    ac = np.cumprod(dt(1) - betas, dtype=np.float64).astype(betas.dtype)  # torch accumulates in double
    s = cfg.snr_shift_scale
    ac = ac / (dt(s) + dt(1 - s) * ac)
    if cfg.rescale_betas_zero_snr:
        r = np.sqrt(ac)
        r0, rT = r[0], r[-1]
        r = (r - rT) * (r0 / (r0 - rT))
        ac = r ** 2
    return ac.astype(betas.dtype)


def ddpm_timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
    """The timesteps of a `num_steps` run (diffusers' `set_timesteps`), int64."""
    T = cfg.num_train_timesteps
    _check_num_steps(num_steps, T)
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + cfg.steps_offset
    else:  # trailing
        ratio = T / num_steps
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    if ts.max() > T - 1:
        raise UnlearnError(
            f"scheduler config: steps_offset = {cfg.steps_offset} puts timestep {int(ts.max())} past "
            f"num_train_timesteps - 1 = {T - 1} with {num_steps} steps")
    return ts


def _check_num_steps(num_steps, T):
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise UnlearnError(f"num_steps = {num_steps!r} is invalid; expected an integer in [1, {T}]")


def flow_sigmas(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas of FlowMatchEulerDiscreteScheduler.set_timesteps, ending in 0."""
    T = cfg.num_train_timesteps
    _check_num_steps(num_steps, T)
    shift = cfg.shift
    # the training table (float32) only provides the end points ...
    train = np.linspace(1, T, T, dtype=np.float32)[::-1].copy() / np.float32(T)
    train = (shift * train) / (1 + (shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    # ... the inference sigmas are spaced between them (float64), shifted again, then float32
    s = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T
    s = (shift * s) / (1 + (shift - 1) * s)
    return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


# --------------------------------------------------------------------------------------------
# Schedule pytree
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Everything one run of `num_steps` steps needs, as arrays indexed by step.

    timesteps:        (N,) the timestep each step's model call gets (int32; float32 for flow).
    sample_timesteps: (N+1,) the timestep the sample sits at before step i; entry N is where the
                      last step lands (DDIM/DPM: `t_last - T // N`, or 0 when that is negative,
                      i.e. the clean sample; flow: 0.0).
    alphas_cumprod:   (T,) float32 (None for flow).
    sigmas:           (N+1,) float32 (flow only, else None).
    coef:             per-step float32 coefficients of the step formula.
    """

    timesteps: Any
    sample_timesteps: Any
    alphas_cumprod: Any
    sigmas: Any
    coef: dict
    kind: str
    prediction_type: str
    num_steps: int
    stochastic: bool

    @property
    def needs_noise(self) -> bool:
        """Whether `step` needs a noise input."""
        return self.stochastic


jax.tree_util.register_dataclass(
    Schedule,
    data_fields=["timesteps", "sample_timesteps", "alphas_cumprod", "sigmas", "coef"],
    meta_fields=["kind", "prediction_type", "num_steps", "stochastic"],
)


def make_schedule(cfg: SchedulerConfig, num_steps: int) -> Schedule:
    """The tables of a `num_steps` run of `cfg` (host-side numpy arrays)."""
    if cfg.kind == "flow_euler":
        sig = flow_sigmas(cfg, num_steps)
        ts = sig[:-1] * np.float32(cfg.num_train_timesteps)
        coef = {"sigma": sig[:-1], "sigma_next": sig[1:], "dt": sig[1:] - sig[:-1]}
        return Schedule(timesteps=ts, sample_timesteps=np.concatenate([ts, np.zeros(1, np.float32)]),
                        alphas_cumprod=None, sigmas=sig, coef=coef, kind=cfg.kind,
                        prediction_type="flow", num_steps=num_steps, stochastic=cfg.stochastic_sampling)

    T = cfg.num_train_timesteps
    ac = alphas_cumprod(cfg)
    dt = ac.dtype.type
    final = dt(1.0) if cfg.set_alpha_to_one else ac[0]
    ts = ddpm_timesteps(cfg, num_steps)
    prev = ts - T // num_steps          # diffusers' "previous timestep" (not the next table entry)
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(ac.dtype)
    # elementary functions correctly rounded in the table's dtype (float32 tables: computed in
    # float64 and rounded once, as libm's scalar float functions that torch uses on 0-dim tensors)
    def fn(f):
        return lambda x: f(np.asarray(x, np.float64)).astype(dt)
    sqrt, log, exp, expm1 = fn(np.sqrt), fn(np.log), fn(np.exp), fn(np.expm1)
    coef = {"x0_sample": sqrt(a_t), "x0_output": sqrt(dt(1) - a_t)}

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if cfg.kind == "ddim":
            a = sqrt((dt(1) - a_prev) / (dt(1) - a_t))
            coef["prev_sample"] = a
            coef["prev_x0"] = sqrt(a_prev) - sqrt(a_t) * a
        else:
            def lam(x):
                return log(sqrt(x / (dt(1) - x)))
            h = lam(a_prev) - lam(a_t)
            coef["mult_sample"] = sqrt((dt(1) - a_prev) / (dt(1) - a_t)) * exp(-h)
            coef["mult_x0"] = expm1(dt(-2) * h) * sqrt(a_prev)
            coef["mult_noise"] = sqrt(dt(1) - a_prev) * sqrt(dt(1) - exp(dt(-2) * h))
            # second-order correction with the previous step's x0, from the second step on and
            # only while a previous timestep exists (diffusers' `prev_timestep >= 0`)
            second = (np.arange(num_steps) > 0) & (prev >= 0)
            a_back = ac[np.concatenate([ts[:1], ts[:-1]])]
            r = (lam(a_t) - lam(a_back)) / h
            half_inv_r = dt(1) / (dt(2) * r)
            coef["mult_cur"] = np.where(second, dt(1) + half_inv_r, 1.0)
            coef["mult_old"] = np.where(second, half_inv_r, 0.0)
            coef["second_order"] = second
    coef = {k: (v if v.dtype == bool else v.astype(np.float32)) for k, v in coef.items()}
    if any(not np.all(np.isfinite(v)) for v in coef.values() if v.dtype != bool):
        raise UnlearnError(f"scheduler config: the {num_steps}-step schedule has non-finite coefficients")
    last = int(prev[-1])
    sample_ts = np.concatenate([ts, [max(last, 0)]]).astype(np.int32)
    return Schedule(timesteps=ts.astype(np.int32), sample_timesteps=sample_ts,
                    alphas_cumprod=ac.astype(np.float32), sigmas=None, coef=coef, kind=cfg.kind,
                    prediction_type=cfg.prediction_type, num_steps=num_steps, stochastic=cfg.kind == "dpm")


# --------------------------------------------------------------------------------------------
# Steps (pure, traceable; step_index may be traced)
# --------------------------------------------------------------------------------------------
class StepOutput(NamedTuple):
    prev_sample: jax.Array            # the sample after this step, in the input sample's dtype
    pred_original_sample: jax.Array   # the predicted clean sample x0 (float32)
    state: Any                        # the state for the next step (DPM: its x0; else ())


class DPMState(NamedTuple):
    old_pred_original_sample: jax.Array


def init_state(schedule: Schedule, sample) -> Any:
    """The state before the first step: DPM carries the previous x0 (zeros here, unused by
    the first step); the other schedulers are stateless (an empty tuple)."""
    if schedule.kind == "dpm":
        return DPMState(jnp.zeros(jnp.shape(sample), jnp.float32))
    return ()


def _at(table, i):
    return jnp.asarray(table)[i]


def _pred_x0(schedule: Schedule, mo, i, x):
    if schedule.prediction_type == "sample":
        return mo
    sa, sb = _at(schedule.coef["x0_sample"], i), _at(schedule.coef["x0_output"], i)
    if schedule.prediction_type == "v_prediction":
        return sa * x - sb * mo
    return (x - sb * mo) / sa


def ddim_step(schedule: Schedule, model_output, step_index, sample) -> StepOutput:
    """CogVideoXDDIMScheduler.step (deterministic, eta ignored as in diffusers)."""
    x = jnp.asarray(sample).astype(jnp.float32)
    mo = jnp.asarray(model_output).astype(jnp.float32)
    x0 = _pred_x0(schedule, mo, step_index, x)
    prev = _at(schedule.coef["prev_sample"], step_index) * x + _at(schedule.coef["prev_x0"], step_index) * x0
    return StepOutput(prev.astype(jnp.asarray(sample).dtype), x0, ())


def dpm_step(schedule: Schedule, model_output, step_index, sample, state: DPMState, noise) -> StepOutput:
    """CogVideoXDPMScheduler.step: DPM-Solver++(2M) with SDE noise. `noise` (sample's shape) is
    the normal draw this step adds (diffusers draws one per step on the first and last step,
    two on the others and uses the second)."""
    c = schedule.coef
    x = jnp.asarray(sample).astype(jnp.float32)
    mo = jnp.asarray(model_output).astype(jnp.float32)
    n = jnp.asarray(noise).astype(jnp.float32)
    x0 = _pred_x0(schedule, mo, step_index, x)
    second = _at(c["second_order"], step_index)
    d = jnp.where(second, _at(c["mult_cur"], step_index) * x0
                  - _at(c["mult_old"], step_index) * state.old_pred_original_sample, x0)
    prev = _at(c["mult_sample"], step_index) * x - _at(c["mult_x0"], step_index) * d \
        + _at(c["mult_noise"], step_index) * n
    return StepOutput(prev.astype(jnp.asarray(sample).dtype), x0, DPMState(x0))


def flow_euler_step(schedule: Schedule, model_output, step_index, sample, noise=None) -> StepOutput:
    """FlowMatchEulerDiscreteScheduler.step (static shift): x + (sigma_next - sigma) * v, or
    with `stochastic_sampling`, (1 - sigma_next) * x0 + sigma_next * noise."""
    c = schedule.coef
    x = jnp.asarray(sample).astype(jnp.float32)
    mo = jnp.asarray(model_output).astype(jnp.float32)
    x0 = x - _at(c["sigma"], step_index) * mo
    if schedule.stochastic:
        sn = _at(c["sigma_next"], step_index)
        prev = (1.0 - sn) * x0 + sn * jnp.asarray(noise).astype(jnp.float32)
    else:
        prev = x + _at(c["dt"], step_index) * mo
    return StepOutput(prev.astype(jnp.asarray(sample).dtype), x0, ())


def step(schedule: Schedule, model_output, step_index, sample, state=(), *, noise=None, key=None) -> StepOutput:
    """One step of whichever scheduler `schedule` was made for. Stochastic schedulers (DPM,
    stochastic flow) need `noise` (the sample's shape) or a PRNG `key` to draw it from."""
    if schedule.needs_noise and noise is None:
        if key is None:
            raise ValueError(f"a {schedule.kind!r} step needs `noise` or `key`")
        noise = jax.random.normal(key, jnp.shape(sample), jnp.float32)
    if schedule.kind == "ddim":
        return ddim_step(schedule, model_output, step_index, sample)
    if schedule.kind == "dpm":
        return dpm_step(schedule, model_output, step_index, sample, state, noise)
    return flow_euler_step(schedule, model_output, step_index, sample, noise)
