"""The two-expert Wan 2.2 T2V-A14B: a high-noise and a low-noise `WanTransformer` behind one model.

WanPipeline (diffusers) runs `transformer` (the high-noise expert) at the steps whose timestep t is
>= boundary = boundary_ratio * num_train_timesteps, and `transformer_2` (the low-noise expert)
below it. `WanExperts` is that switch as one model: `forward(latents, cond, timestep, hooks,
extras)` picks the expert with `jax.lax.cond` on the step's timestep, so a sampler or a train step
that calls it needs no idea of the experts.

- Every row of a call shares one timestep (as in the pipeline's denoising loop): the first entry
  picks the expert. Per-token timesteps (TI2V's expand_timesteps) are refused.
- Erasers cover both experts: `extras` (the hooks' per-layer pytree) has a leading axis of
  2 x num_layers, the high expert's rows first; each branch gets its expert's half. The hooks'
  aux is the active expert's (stacked over num_layers; the same structure from both branches, so
  both experts have the same number of blocks and width).
- `active_layers(t)` says which of the 2L eraser rows a step at t trains.

`experts()` and `with_experts(...)` are how the core (saving, merging, exports) walks the parts:
a dict of diffusers component name ("transformer", "transformer_2") -> `WanTransformer`, in row order.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.wan import EXPERTS
from unlearn_jax.models.layers import jitted_forward
from unlearn_jax.models.wan import WanConfig, WanTransformer

HIGH, LOW = EXPERTS  # the pipeline's component names, in eraser-row order
PIPELINE_CLASS = "WanPipeline"

__all__ = ["HIGH", "LOW", "WanExperts", "WanExpertsConfig", "abstract_experts", "build_experts", "split_rows"]


@dataclasses.dataclass(frozen=True)
class WanExpertsConfig:
    """Both experts' configs and where the pipeline switches between them."""

    high: WanConfig
    low: WanConfig
    boundary_ratio: float
    num_train_timesteps: int = 1000

    expert_names = (HIGH, LOW)

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "two-expert Wan config"):
        r, n = self.boundary_ratio, self.num_train_timesteps
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r < 1:
            raise UnlearnError(f"{where}: boundary_ratio = {r!r} must be a number in (0, 1) (otherwise one expert "
                               "never runs)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise UnlearnError(f"{where}: num_train_timesteps = {n!r} must be an integer >= 2")
        hi, lo = self.high, self.low
        # shared inputs and outputs: the sampler hands either expert the same latents and text;
        # the same blocks and width: one stack of eraser rows, one aux structure from both branches
        for name in ("in_channels", "out_dim", "patch_size", "text_dim", "num_layers", "inner_dim"):
            a, b = getattr(hi, name), getattr(lo, name)
            if a != b:
                raise UnlearnError(f"{where}: the experts differ in {name} ({HIGH}: {a}, {LOW}: {b}); both experts "
                                   "of a two-expert pipeline take the same inputs and have the same blocks")

    # ---- what both experts share -------------------------------------------------------------
    @property
    def boundary(self) -> float:
        """The timestep at and above which the high-noise expert runs (the pipeline's boundary_timestep)."""
        return self.boundary_ratio * self.num_train_timesteps

    def experts(self) -> dict[str, WanConfig]:
        """Component name -> expert config, in eraser-row order."""
        return {HIGH: self.high, LOW: self.low}

    @property
    def expert_layers(self) -> int:
        return self.high.num_layers

    patch_size = property(lambda self: self.high.patch_size)
    in_channels = property(lambda self: self.high.in_channels)
    out_channels = property(lambda self: self.high.out_channels)
    out_dim = property(lambda self: self.high.out_dim)
    text_dim = property(lambda self: self.high.text_dim)
    inner_dim = property(lambda self: self.high.inner_dim)

    def is_high(self, timestep):
        """Whether the high-noise expert serves this step: t >= boundary, compared in float32 as the
        pipeline's `t >= boundary_timestep` (torch promotes the integer or float32 t and the Python
        float to float32)."""
        t = jnp.asarray(timestep)
        t = t.reshape(-1)[0] if t.ndim else t
        return t.astype(jnp.float32) >= jnp.float32(self.boundary)

    def active_layers(self, timestep):
        """(2L,) bool: the eraser rows of the expert that serves `timestep` (high rows first)."""
        high = self.is_high(timestep)
        L = self.expert_layers
        return jnp.concatenate([jnp.full((L,), high), jnp.full((L,), ~high)])

    # ---- (de)serialisation: the shape of a pipeline's model_index.json ---------------------------
    def to_dict(self) -> dict:
        return {"_class_name": PIPELINE_CLASS, "boundary_ratio": self.boundary_ratio,
                "num_train_timesteps": self.num_train_timesteps, HIGH: self.high.to_dict(), LOW: self.low.to_dict()}

    @staticmethod
    def is_experts_dict(d) -> bool:
        return isinstance(d, dict) and isinstance(d.get(LOW), dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config", expert_config=None) -> "WanExpertsConfig":
        """`expert_config(dict, where)` reads one expert's config (default `WanConfig.from_dict`)."""
        read = expert_config or WanConfig.from_dict
        missing = [k for k in (HIGH, LOW, "boundary_ratio") if k not in d]
        if missing:
            raise UnlearnError(f"{where}: a two-expert Wan config needs {', '.join(missing)}")
        return cls(read(dict(d[HIGH]), f"{where} {HIGH}"), read(dict(d[LOW]), f"{where} {LOW}"),
                   d["boundary_ratio"], d.get("num_train_timesteps", 1000))

    def pipeline_index(self, diffusers_version: str) -> dict:
        """The model_index.json of a folder holding just the two transformers."""
        entry = ["diffusers", "WanTransformer3DModel"]
        return {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers_version,
                "boundary_ratio": self.boundary_ratio, HIGH: entry, LOW: entry}


def split_rows(tree, rows: int):
    """(the first `rows` entries, the rest) of every leaf's leading axis."""
    return jax.tree.map(lambda a: a[:rows], tree), jax.tree.map(lambda a: a[rows:], tree)


class WanExperts(nnx.Module):
    """The high- and low-noise experts, called like one `WanTransformer`."""

    def __init__(self, high: WanTransformer, low: WanTransformer, boundary_ratio: float,
                 num_train_timesteps: int = 1000):
        self.config = WanExpertsConfig(high.config, low.config, boundary_ratio, num_train_timesteps)
        if high.runtime != low.runtime:
            raise UnlearnError("the two experts were built with different runtimes (dtype, attention, remat, mesh); "
                               "load both with the same options")
        self.high, self.low = high, low

    @property
    def runtime(self):
        return self.high.runtime

    def experts(self) -> dict[str, WanTransformer]:
        """Component name -> expert, in eraser-row order."""
        return {HIGH: self.high, LOW: self.low}

    def with_experts(self, experts) -> "WanExperts":
        """The same switch over other experts (e.g. with erasers merged into their weights)."""
        return WanExperts(experts[HIGH], experts[LOW], self.config.boundary_ratio, self.config.num_train_timesteps)

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return self.high.token_grid(num_frames, height, width)

    def active_layers(self, timestep):
        return self.config.active_layers(timestep)

    def check_inputs(self, x_shape, cond_shape, timestep_shape=None):
        if timestep_shape is not None and len(tuple(timestep_shape)) == 2:
            raise UnlearnError(f"timestep of shape {tuple(timestep_shape)}: per-token timesteps are not taken by the "
                               "two-expert Wan 2.2 A14B (one timestep per step picks the expert)")
        self.high.check_inputs(x_shape, cond_shape, timestep_shape)

    def forward(self, latents, cond, timestep, hooks=None, extras=None):
        """(velocity, aux) of the expert that serves `timestep` (its first entry): `WanTransformer.forward`'s
        contract, with `extras` over 2 x num_layers rows (high expert first)."""
        self.check_inputs(jnp.shape(latents), jnp.shape(cond), jnp.shape(timestep))
        L = self.config.expert_layers
        ex_high, ex_low = (None, None) if extras is None else split_rows(extras, L)
        (gd_high, st_high), (gd_low, st_low) = nnx.split(self.high), nnx.split(self.low)

        # the experts' weights and extras are operands (not closures), so each branch differentiates
        # into its own half and the other half's gradient is zero
        def run(graphdef, high: bool):
            def branch(operands):
                st_h, st_l, e_h, e_l = operands
                model = nnx.merge(graphdef, st_h if high else st_l)
                return model.forward(latents, cond, timestep, hooks, e_h if high else e_l)
            return branch

        return jax.lax.cond(self.config.is_high(timestep), run(gd_high, True), run(gd_low, False),
                            (st_high, st_low, ex_high, ex_low))

    def forward_inputs(self, hidden_states, timestep, encoder_hidden_states):
        self.check_inputs(jnp.shape(hidden_states), jnp.shape(encoder_hidden_states), jnp.shape(timestep))
        return jnp.asarray(hidden_states), jnp.asarray(encoder_hidden_states), jnp.asarray(timestep)

    def __call__(self, hidden_states, timestep, encoder_hidden_states):
        """diffusers' argument order: (B, C, F, H, W), timestep, (B, L, text_dim) -> the serving expert's velocity."""
        x, cond, t = self.forward_inputs(hidden_states, timestep, encoder_hidden_states)
        graphdef, state = nnx.split(self)
        return jitted_forward(graphdef, state, x, cond, t)


def build_experts(cfg: WanExpertsConfig, seed: int = 0, **runtime) -> WanExperts:
    """Randomly initialised experts (tests); the low expert from another seed than the high one."""
    high = WanTransformer(cfg.high, rngs=nnx.Rngs(seed), **runtime)
    low = WanTransformer(cfg.low, rngs=nnx.Rngs(seed + 1), **runtime)
    return WanExperts(high, low, cfg.boundary_ratio, cfg.num_train_timesteps)


def abstract_experts(cfg: WanExpertsConfig, **runtime) -> WanExperts:
    """The experts with shapes only (no memory)."""
    return nnx.eval_shape(lambda: build_experts(cfg, 0, **runtime))
