"""Samplers' schedulers as pure functions: CogVideoX DDIM, CogVideoX DPM-Solver++(2M), flow-matching Euler,
UniPC with flow sigmas (Wan).

They compute exactly what diffusers' `CogVideoXDDIMScheduler`, `CogVideoXDPMScheduler`,
`FlowMatchEulerDiscreteScheduler` (static shift) and `UniPCMultistepScheduler` (as the Wan pipelines
configure it: `use_flow_sigmas`, `flow_prediction`, `predict_x0`) compute, but without hidden state:

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
  UniPC is multistep too: its `UniPCState` holds the last `solver_order` x0 predictions, the sample
  the corrector starts from, and the order bookkeeping (fixed shapes: one compiled loop body).

The step arithmetic runs in float32 whatever the sample's dtype, like the CogVideoX pipeline,
which casts the model output to float32 before stepping; the result is cast back to the
sample's dtype. (UniPC also rounds where diffusers' torch ops take a narrower dtype: see `unipc_step`.)
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

KINDS = ("ddim", "dpm", "flow_euler", "unipc")
FLOW_SIGMA_SOURCES = ("scheduler", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# diffusers class name -> our kind
_CLASS_KINDS = {
    "CogVideoXDDIMScheduler": "ddim",
    "CogVideoXDPMScheduler": "dpm",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "UniPCMultistepScheduler": "unipc",
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

# UniPC (flow sigmas only). With `use_flow_sigmas` the betas / alphas_cumprod and the timestep
# spacing are computed by diffusers but never used (the flow branch of set_timesteps replaces
# them), and the thresholding / sigma-range / time-shift parameters only matter with options
# that are refused below.
_UNIPC_FIELDS = (
    "num_train_timesteps", "solver_order", "prediction_type", "predict_x0", "solver_type", "lower_order_final",
    "disable_corrector", "use_flow_sigmas", "flow_shift", "final_sigmas_type",
)
_UNIPC_INERT_KEYS = (
    "beta_start", "beta_end", "beta_schedule", "trained_betas", "timestep_spacing", "steps_offset",
    "rescale_betas_zero_snr", "dynamic_thresholding_ratio", "sample_max_value", "time_shift_type",
    "sigma_min", "sigma_max",
)
_UNIPC_UNSUPPORTED = {
    "thresholding": False,
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "shift_terminal": None,
}
UNIPC_SOLVER_TYPES = ("bh1", "bh2")
# diffusers accepts these names and silently runs bh2
_UNIPC_SOLVER_ALIASES = ("midpoint", "heun", "logrho")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


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
    'ddim' (CogVideoXDDIMScheduler), 'dpm' (CogVideoXDPMScheduler), 'flow_euler'
    (FlowMatchEulerDiscreteScheduler with a static `shift`) or 'unipc' (UniPCMultistepScheduler
    with flow sigmas; diffusers' defaults, so a direct construction names the Wan settings:
    `SchedulerConfig(kind="unipc", prediction_type="flow_prediction", use_flow_sigmas=True,
    flow_shift=3.0)`)."""

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
    # How the pipeline calls `set_timesteps` (not a diffusers config key): "scheduler" = with the step
    # count only (WanPipeline); "linspace" = with `sigmas=linspace(1, 0, N + 1)[:-1]` (HunyuanVideoPipeline).
    flow_sigmas: str = "scheduler"
    # UniPC fields (UniPCMultistepScheduler's defaults; `prediction_type` is shared above)
    solver_order: int = 2
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        if isinstance(self.trained_betas, list):
            object.__setattr__(self, "trained_betas", tuple(self.trained_betas))
        if isinstance(self.disable_corrector, list):
            object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))
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
            if self.flow_sigmas not in FLOW_SIGMA_SOURCES:
                raise _bad("flow_sigmas", self.flow_sigmas, _one_of(FLOW_SIGMA_SOURCES))
            return
        if self.kind == "unipc":
            self._validate_unipc()
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

    def _validate_unipc(self):
        if self.solver_type in _UNIPC_SOLVER_ALIASES:
            object.__setattr__(self, "solver_type", "bh2")
        if self.prediction_type != "flow_prediction":
            raise _bad("prediction_type", self.prediction_type,
                       "'flow_prediction' (a 'unipc' scheduler is implemented for flow models only)")
        if self.use_flow_sigmas is not True:
            raise _bad("use_flow_sigmas", self.use_flow_sigmas,
                       "true (a 'unipc' scheduler is implemented with flow sigmas only)")
        if self.predict_x0 is not True:
            raise _bad("predict_x0", self.predict_x0, "true (diffusers has no flow_prediction update without it)")
        if isinstance(self.solver_order, bool) or not isinstance(self.solver_order, int) or self.solver_order < 1:
            raise _bad("solver_order", self.solver_order, "an integer >= 1")
        if self.solver_type not in UNIPC_SOLVER_TYPES:
            raise _bad("solver_type", self.solver_type, _one_of(UNIPC_SOLVER_TYPES + _UNIPC_SOLVER_ALIASES))
        if not isinstance(self.lower_order_final, bool):
            raise _bad("lower_order_final", self.lower_order_final, "true or false")
        dc = self.disable_corrector
        if not isinstance(dc, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in dc):
            raise _bad("disable_corrector", _short(dc), "a list of step indices")
        if not _is_number(self.flow_shift) or not self.flow_shift > 0:
            raise _bad("flow_shift", self.flow_shift, "a number > 0")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise _bad("final_sigmas_type", self.final_sigmas_type, _one_of(FINAL_SIGMAS_TYPES))

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
                raise UnlearnError("scheduler config: _class_name is missing; "
                                   "pass kind= ('ddim', 'dpm', 'flow_euler' or 'unipc')")
            if name not in _CLASS_KINDS:
                raise _bad("_class_name", name, _one_of(_CLASS_KINDS))
            kind = _CLASS_KINDS[name]
        elif kind not in KINDS:
            raise _bad("kind", kind, _one_of(KINDS))

        fields, inert, unsupported = {
            "flow_euler": (_FLOW_FIELDS, _FLOW_INERT_KEYS, _FLOW_UNSUPPORTED),
            "unipc": (_UNIPC_FIELDS, _UNIPC_INERT_KEYS, _UNIPC_UNSUPPORTED),
        }.get(kind, (_DDPM_FIELDS, _DDPM_INERT_KEYS, {}))
        kw: dict[str, Any] = {"kind": kind}
        for key, value in d.items():
            if key.startswith("_") or key in inert:
                continue
            if key in unsupported:
                # diffusers tests `if shift_terminal:`, so a falsy value is off too
                if value != unsupported[key] and not (key == "shift_terminal" and not value):
                    raise _bad(key, value, f"{unsupported[key]!r} (other values are not supported)")
                continue
            if key not in fields:
                raise UnlearnError(f"scheduler config: unknown field {key!r} for a {kind!r} scheduler")
            if key in ("trained_betas", "disable_corrector") and value is not None:
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
    if cfg.kind in ("flow_euler", "unipc"):
        raise UnlearnError(f"scheduler config: a {cfg.kind!r} scheduler (flow sigmas) has no alphas_cumprod")
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
    if cfg.flow_sigmas == "linspace":
        # the pipeline's sigmas (float32), shifted in float32 as set_timesteps(sigmas=...) does
        s = np.linspace(1.0, 0.0, num_steps + 1)[:-1].astype(np.float32)
        s = np.float32(shift) * s / (np.float32(1.0) + np.float32(shift - 1.0) * s)
        return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])
    # the training table (float32) only provides the end points ...
    train = np.linspace(1, T, T, dtype=np.float32)[::-1].copy() / np.float32(T)
    train = (shift * train) / (1 + (shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    # ... the inference sigmas are spaced between them (float64), shifted again, then float32
    s = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T
    s = (shift * s) / (1 + (shift - 1) * s)
    return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


def unipc_sigmas(cfg: SchedulerConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """UniPCMultistepScheduler.set_timesteps with `use_flow_sigmas`: the (num_steps + 1,) float32
    sigmas (the last one 0, or the last step's sigma with final_sigmas_type 'sigma_min') and the
    (num_steps,) int64 timesteps the model gets (sigma * T truncated toward zero, as torch's
    float64 -> int64 cast does)."""
    T = cfg.num_train_timesteps
    _check_num_steps(num_steps, T)
    shift = cfg.flow_shift
    s = np.linspace(1, 1 / T, num_steps + 1)[:-1]          # float64 throughout, as diffusers
    s = shift * s / (1 + (shift - 1) * s)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6                                         # diffusers keeps log(1 - sigma) finite
    timesteps = (s * T).astype(np.int64)
    last = s[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([s, [last]]).astype(np.float32), timesteps


def _unipc_update(sig, alpha, lam, t: int, s0: int, older: list[int], order: int, bh1: bool, corrector: bool):
    """The scalar coefficients of one UniP (predictor) or UniC (corrector) update from sigma index
    s0 to t, with the previous points `older` (sigma indices, newest first; order - 1 of them), in
    float32 as diffusers computes them on 0-dim tensors: (ratio, c0, cB, rks, rhos, rho_last) for
    x_new = ratio * x - c0 * m0 - cB * (sum_k rhos[k] * (m_k - m0) / rks[k] [+ rho_last * (m_t - m0)])."""
    f = np.float32
    h = lam[t] - lam[s0]
    rks = [(lam[si] - lam[s0]) / h for si in older] + [f(1)]
    hh = -h                                                   # predict_x0
    h_phi_1 = _f32(np.expm1, hh)
    h_phi_k = h_phi_1 / hh - f(1)
    b_h = hh if bh1 else _f32(np.expm1, hh)
    R, b, fact = [], [], 1
    for q in range(1, order + 1):
        R.append([f(np.float64(r) ** (q - 1)) for r in rks])
        b.append(h_phi_k * f(fact) / b_h)
        fact *= q + 1
        h_phi_k = h_phi_k / hh - f(1 / fact)
    R, b = np.asarray(R, np.float32), np.asarray(b, np.float32)
    if corrector:
        rhos = np.array([0.5], np.float32) if order == 1 else _solve32(R, b)
        rhos, rho_last = rhos[:-1], rhos[-1]
    else:
        rhos = np.zeros(0, np.float32) if order == 1 else \
            np.array([0.5], np.float32) if order == 2 else _solve32(R[:-1, :-1], b[:-1])
        rho_last = f(0)
    return sig[t] / sig[s0], alpha[t] * h_phi_1, alpha[t] * b_h, np.asarray(rks[:-1], np.float32), rhos, rho_last


def _f32(fn, x):
    """A float32 elementary function correctly rounded (float64, then one rounding)."""
    return np.float32(fn(np.float64(x)))


def _solve32(R, b):
    """torch.linalg.solve of the small float32 system, in float64 and rounded once (LAPACK's float32
    LU differs by an ulp at most); NaN where the system is singular or not finite."""
    if not (np.all(np.isfinite(R)) and np.all(np.isfinite(b))):
        return np.full(len(b), np.nan, np.float32)
    try:
        return np.linalg.solve(R.astype(np.float64), b.astype(np.float64)).astype(np.float32)
    except np.linalg.LinAlgError:
        return np.full(len(b), np.nan, np.float32)


def _unipc_schedule(cfg: SchedulerConfig, num_steps: int) -> "Schedule":
    sig, ts = unipc_sigmas(cfg, num_steps)
    n, S, bh1 = num_steps, cfg.solver_order, cfg.solver_type == "bh1"
    alpha = np.float32(1) - sig
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = np.array([_f32(np.log, a) - _f32(np.log, s) for a, s in zip(alpha, sig)], np.float32)
        # the predictor's order at step i before the warm-up cap (lower_order_final lowers the last steps)
        order_max = np.array([min(S, n - i) if cfg.lower_order_final else S for i in range(n)], np.int32)
        corrector_on = np.array([i > 0 and (i - 1) not in cfg.disable_corrector for i in range(n)])
        tab = {}
        for side in ("p", "c"):
            tab.update({f"{side}_ratio": np.ones((n, S), np.float32), f"{side}_c0": np.zeros((n, S), np.float32),
                        f"{side}_cB": np.zeros((n, S), np.float32), f"{side}_rk": np.ones((n, S, S - 1), np.float32),
                        f"{side}_rho": np.zeros((n, S, S - 1), np.float32)})
        tab["c_rho_last"] = np.zeros((n, S), np.float32)
        for i in range(n):
            # predictor of step i (sigma i -> i + 1) with x0 history at sigmas i, i-1, ...: an order
            # o is reachable when o <= i + 1 (warm-up) and o <= order_max[i]
            for o in range(1, min(order_max[i], i + 1) + 1):
                vals = _unipc_update(sig, alpha, lam, i + 1, i, [i - k for k in range(1, o)], o, bh1, False)
                _put(tab, "p", i, o, vals, n, cfg)
            # corrector at step i re-does step i-1 (sigma i-1 -> i) with the previous predictor's order
            if corrector_on[i]:
                for o in range(1, min(order_max[i - 1], i) + 1):
                    vals = _unipc_update(sig, alpha, lam, i, i - 1, [i - 1 - k for k in range(1, o)], o, bh1, True)
                    _put(tab, "c", i, o, vals, n, cfg)
    coef = {"sigma": sig[:-1], "order_max": order_max, "corrector_on": corrector_on, **tab}
    sample_ts = np.concatenate([ts, (sig[-1:].astype(np.float64) * cfg.num_train_timesteps).astype(np.int64)])
    return Schedule(timesteps=ts.astype(np.int32), sample_timesteps=sample_ts.astype(np.int32), alphas_cumprod=None,
                    sigmas=sig, coef=coef, kind="unipc", prediction_type="flow", num_steps=n, stochastic=False)


def _put(tab, side, i, o, vals, n, cfg):
    ratio, c0, cb, rks, rhos, rho_last = vals
    # an infinite rk (a zero step h) only scales its difference to 0; a zero rk divides by it
    ok = all(np.isfinite(v) for v in (ratio, c0, cb, rho_last, *rhos)) and all(r != 0 and not np.isnan(r) for r in rks)
    if not ok:
        what = "predictor" if side == "p" else "corrector"
        raise UnlearnError(
            f"scheduler config: the {n}-step UniPC schedule has a non-finite order-{o} {what} update at step {i} "
            f"(diffusers gives NaN/inf there; solver_type = {cfg.solver_type!r}, lower_order_final = "
            f"{cfg.lower_order_final}, final_sigmas_type = {cfg.final_sigmas_type!r}): use solver_type 'bh2' "
            f"and lower_order_final = true, or final_sigmas_type 'sigma_min'")
    tab[f"{side}_ratio"][i, o - 1], tab[f"{side}_c0"][i, o - 1], tab[f"{side}_cB"][i, o - 1] = ratio, c0, cb
    tab[f"{side}_rk"][i, o - 1, :o - 1] = rks
    tab[f"{side}_rho"][i, o - 1, :len(rhos)] = rhos
    if side == "c":
        tab["c_rho_last"][i, o - 1] = rho_last


# --------------------------------------------------------------------------------------------
# Schedule pytree
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Everything one run of `num_steps` steps needs, as arrays indexed by step.

    timesteps:        (N,) the timestep each step's model call gets (int32; float32 for flow
                      Euler; int32 for UniPC, whose diffusers timesteps are int64 `sigma * T` truncated).
    sample_timesteps: (N+1,) the timestep the sample sits at before step i; entry N is where the
                      last step lands (DDIM/DPM: `t_last - T // N`, or 0 when that is negative,
                      i.e. the clean sample; flow: 0.0; UniPC: 0, or the last timestep again with
                      final_sigmas_type 'sigma_min').
    alphas_cumprod:   (T,) float32 (None for flow).
    sigmas:           (N+1,) float32 (flow and UniPC, else None).
    coef:             per-step float32 coefficients of the step formula (UniPC: per step and order,
                      for the predictor `p_*` and the corrector `c_*`; entries no state can reach
                      are neutral).
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
    if cfg.kind == "unipc":
        return _unipc_schedule(cfg, num_steps)
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
    state: Any                        # the state for the next step (DPM: its x0; UniPC: UniPCState; else ())


class DPMState(NamedTuple):
    old_pred_original_sample: jax.Array


class UniPCState(NamedTuple):
    """UniPCMultistepScheduler's hidden state, as arrays of fixed shapes."""
    model_outputs: jax.Array     # (solver_order, *sample) float32: the last x0 predictions, newest last
    last_sample: jax.Array       # (*sample) float32: the sample the last predictor started from
    lower_order_nums: jax.Array  # int32: steps taken, capped at solver_order (the warm-up counter)
    this_order: jax.Array        # int32: the last predictor's order; 0 before the first step (no corrector)


def init_state(schedule: Schedule, sample) -> Any:
    """The state before the first step: DPM carries the previous x0 (zeros here, unused by
    the first step); UniPC its `UniPCState` (an empty history); the other schedulers are
    stateless (an empty tuple)."""
    if schedule.kind == "dpm":
        return DPMState(jnp.zeros(jnp.shape(sample), jnp.float32))
    if schedule.kind == "unipc":
        order = jnp.shape(schedule.coef["p_ratio"])[1]
        shape = tuple(jnp.shape(sample))
        return UniPCState(jnp.zeros((order, *shape), jnp.float32), jnp.zeros(shape, jnp.float32),
                          jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
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


def _narrow(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _round_to(x, dtype):
    """x (float32) rounded to `dtype` where that is narrower (a no-op for float32)."""
    return x.astype(dtype).astype(jnp.float32) if _narrow(dtype) else x


def _uni_update(ratio, c0, cb, rks, rhos, x, m0, older, sdt, hdt, last=None):
    """ratio * x - c0 * m0 - cB * (sum_k rhos[k] (m_k - m0) / rks[k] [+ last]) in diffusers' order of
    operations and dtypes: x in the sample's dtype `sdt`, the x0s m0, m_k (`older` (K, ...), newest
    first) in `hdt`; each torch op rounds to its result dtype, a 0-dim float32 scalar written first
    (`s * tensor`) is cast to the tensor's dtype, a divisor (`tensor / s`) is not; the rhos are cast
    to the sample's dtype. All of it is a no-op for float32 tensors. Unused orders have rho 0, rk 1."""
    rdt = jnp.promote_types(sdt, hdt)
    bshape = (-1,) + (1,) * m0.ndim
    d = _round_to(_round_to(older - m0[None], hdt) / rks.reshape(bshape), hdt)
    # einsum('k,bk...->b...'): products accumulated in float32, rounded once
    res = _round_to(jnp.sum(_round_to(rhos, sdt).reshape(bshape) * d, axis=0), rdt)
    if last is not None:
        res = _round_to(res + last, rdt)
    x_ = _round_to(_scalar_mul(ratio, x, sdt) - _scalar_mul(c0, m0, hdt), rdt)
    return _round_to(x_ - _scalar_mul(cb, res, rdt), rdt)


def _scalar_mul(s, x, dtype):
    """torch's `s * x` for a 0-dim float32 s and an x of `dtype`: s is cast to that dtype first."""
    return _round_to(_round_to(s, dtype) * x, dtype)


def unipc_step(schedule: Schedule, model_output, step_index, sample, state: UniPCState) -> StepOutput:
    """UniPCMultistepScheduler.step (flow sigmas, flow_prediction, predict_x0): the corrector (UniC)
    refines this step's sample with the new x0, then the predictor (UniP) moves it to the next sigma.
    Orders follow diffusers' bookkeeping: min(solver_order, steps left if lower_order_final, steps
    taken + 1); the corrector runs from the second step on (not after steps in disable_corrector)
    with the previous predictor's order.

    Arithmetic in float32, rounded wherever diffusers' torch ops produce a narrower dtype (x0 in the
    promoted dtype of sample and model output, the samples in the sample's dtype, each intermediate
    in its op's dtype), so bfloat16 samples or model outputs give diffusers' bfloat16 results too.
    With float32 samples and model outputs, as the Wan pipeline's latents and this package's
    sampler's guided outputs are, every rounding is a no-op."""
    c = schedule.coef
    i = step_index
    sample, model_output = jnp.asarray(sample), jnp.asarray(model_output)
    sdt, mdt = sample.dtype, model_output.dtype
    hdt = jnp.promote_types(sdt, mdt)   # the dtype diffusers' x0 (and its history) has
    x = sample.astype(jnp.float32)
    mo = model_output.astype(jnp.float32)
    x0 = _round_to(x - _scalar_mul(_at(c["sigma"], i), mo, mdt), hdt)

    hist = state.model_outputs
    S = hist.shape[0]
    m0 = hist[-1]
    co = jnp.clip(state.this_order, 1, S) - 1
    last = _round_to(_round_to(_at(c["c_rho_last"], i)[co], sdt) * _round_to(x0 - m0, hdt), hdt)
    x_c = _uni_update(_at(c["c_ratio"], i)[co], _at(c["c_c0"], i)[co], _at(c["c_cB"], i)[co],
                      _at(c["c_rk"], i)[co], _at(c["c_rho"], i)[co], state.last_sample, m0, hist[:-1][::-1],
                      sdt, hdt, last=last)
    use_c = _at(c["corrector_on"], i) & (state.this_order > 0)
    xs = jnp.where(use_c, _round_to(x_c, sdt), x)

    hist = jnp.concatenate([hist[1:], x0[None]], axis=0)
    order = jnp.minimum(_at(c["order_max"], i), state.lower_order_nums + 1).astype(jnp.int32)
    po = order - 1
    prev = _uni_update(_at(c["p_ratio"], i)[po], _at(c["p_c0"], i)[po], _at(c["p_cB"], i)[po],
                       _at(c["p_rk"], i)[po], _at(c["p_rho"], i)[po], xs, x0, hist[:-1][::-1], sdt, hdt)
    new = UniPCState(hist, xs, jnp.minimum(state.lower_order_nums + 1, S).astype(jnp.int32), order)
    return StepOutput(prev.astype(sdt), x0, new)


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
    if schedule.kind == "unipc":
        return unipc_step(schedule, model_output, step_index, sample, state)
    return flow_euler_step(schedule, model_output, step_index, sample, noise)
