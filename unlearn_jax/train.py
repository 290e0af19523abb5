"""The erasure training step (docs/METHOD.md §2) as a pure, jitted, sharded function, for every model family.

state = TrainState(step, phi, opt_state, rng): the trainable eraser parameters (fp32) and Adam
moments (fp32). The frozen base weights are a separate argument, never copied: "frozen model"
means calling the same weights with the erasers off.

A model of several experts that each serve a range of timesteps (Wan 2.2 A14B: `active_layers(t)`
on its config) trains each expert's eraser rows on the steps it serves: the step's t picks the
expert in every pass, and after the update the other expert's rows of phi and of the Adam moments
are put back unchanged. The optimizer's step counter (Adam's bias correction) is shared: it counts
the steps of both experts, so an expert's k-th update is bias-corrected as the run's n-th.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unlearn_jax import objectives as O
from unlearn_jax.erasers import EraserConfig, eraser_hooks
from unlearn_jax.families.base import leading_size
from unlearn_jax.models.hooks import Hooks
from unlearn_jax.sampling import sample
from unlearn_jax.schedulers import Schedule

TIMESTEP_MODES = ("sampler", "esd_legacy")
XT_SOURCES = ("current", "frozen_bank")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static settings of one training step (every [choice] of docs/METHOD.md is here)."""

    num_sampler_steps: int = 50  # J
    guidance_scale: float = 3.0  # g_s for sampling x_t
    guidance_scale_2: float | None = None  # two-stage models: g_s below the boundary (None: guidance_scale)
    timestep_mode: str = "sampler"  # "sampler": t = the timestep x_t sits at; "esd_legacy": drawn in [j/J, (j+1)/J)*1000
    xt_source: str = "current"  # "current": sample x_t with the current erased model; "frozen_bank": given
    alpha_loc: float = 1.0
    beta_pre: float = 1.0
    mask_threshold: float = 0.1
    mask_mode: str = "per_layer"
    mask_key_chunk: int = 1024
    grad_clip: float = 1.0  # global-norm clip; <= 0 disables
    # adversarial erasure (config.robust): every `robust_every` steps (0: never) an inner soft attack of
    # `robust_steps` Adam steps (lr `robust_lr`) finds the conditioning that makes the erased model predict
    # the frozen model's concept velocity at the step's x_t, and the step also trains the negative target on
    # it, weighted `robust_weight`
    robust_every: int = 0
    robust_steps: int = 5
    robust_lr: float = 0.05
    robust_weight: float = 1.0

    def __post_init__(self):
        from unlearn_jax.errors import UnlearnError

        if self.timestep_mode not in TIMESTEP_MODES:
            raise UnlearnError(f"sampler.timestep_mode={self.timestep_mode!r}: choose one of {TIMESTEP_MODES}")
        if self.xt_source not in XT_SOURCES:
            raise UnlearnError(f"sampler.xt_source={self.xt_source!r}: choose one of {XT_SOURCES}")
        if self.mask_mode not in O.MASK_MODES:
            raise UnlearnError(f"erase.mask_mode={self.mask_mode!r}: choose per_layer or average")


class TrainState(NamedTuple):
    step: jax.Array
    phi: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, checkpointable


def make_optimizer(learning_rate: float, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0):
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay) if weight_decay \
        else optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip and grad_clip > 0 else tx


def init_state(phi, optimizer, seed: int) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), phi, optimizer.init(phi), jax.random.key_data(jax.random.key(seed)))


def keep_rows(optimizer, rows, phi, old_phi, opt_state, old_opt_state):
    """(phi, opt_state) with the eraser rows (leading axis) where `rows` is False put back to their old values,
    in phi and in every parameter-shaped part of the optimizer state (Adam's moments); counters stay new."""
    masks = jax.tree.map(lambda p: rows.reshape(-1, *([1] * (p.ndim - 1))), old_phi)
    phi = jax.tree.map(jnp.where, masks, phi, old_phi)
    mask_state = optax.tree_map_params(optimizer, lambda _, m: m, old_opt_state, masks,
                                        transform_non_params=lambda _: None)
    opt_state = jax.tree.map(lambda m, new, old: new if m is None else jnp.where(m, new, old), mask_state,
                             opt_state, old_opt_state, is_leaf=lambda x: x is None)
    return phi, opt_state


def _cat(a, b):
    """Two conditioning pytrees (or arrays) joined along the batch."""
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


class ErasureStep:
    """Builds the pure step `(state, base_params, batch) -> (state, metrics)` for one model and config.

    The batch's conditioning entries (`ctx`, `uncond`, `pre_ctx`) are the family's conditioning
    pytrees, batch first; the latents are in the family's layout (`latent_shape` has no batch axis).
    """

    def __init__(self, model, eraser: EraserConfig, schedule: Schedule, settings: StepSettings,
                 optimizer, latent_shape: tuple[int, ...], family=None):
        from unlearn_jax import families

        self.family = family or families.of_model(model)
        self.graphdef, _ = nnx.split(model)
        self.model_cfg = model.config
        self.eraser, self.schedule, self.s, self.optimizer = eraser, schedule, settings, optimizer
        self.latent_shape = tuple(latent_shape)
        self.grid = self.family.token_grid(model, self.latent_shape)
        # two-stage models: the second guidance scale's boundary, and which eraser rows a timestep trains
        self.boundary = self.family.guidance_boundary(self.model_cfg)
        self.active_layers = getattr(self.model_cfg, "active_layers", None)

    def guidance_2(self):
        """The sampler's scale below the boundary (None for one-stage models)."""
        if self.boundary is None:
            return None
        g2 = self.s.guidance_scale if self.s.guidance_scale_2 is None else self.s.guidance_scale_2
        return self.family.cfg_scale(g2)

    # ---- the model as a pure function --------------------------------------------------------
    def velocity(self, base, phi, x, ctx, t, *, collect=False, concept_fn=None):
        model = nnx.merge(self.graphdef, base)
        hooks, extras = eraser_hooks(self.eraser, phi, collect_outputs=collect)
        if concept_fn is not None:
            hooks = dataclasses.replace(hooks or Hooks(), on_concept_attention=concept_fn)
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        return model.forward(x, ctx, t, hooks, extras)

    def sample_xt(self, base, phi, noise, ctx, uncond, j, key):
        """Run j sampler steps from `noise` with CFG; phi=None samples with the frozen model."""
        def vel(x, t, c):
            return self.velocity(base, phi, x, c, t)[0]

        out = sample(vel, self.schedule, noise, ctx, uncond, num_steps=self.s.num_sampler_steps,
                     guidance_scale=self.family.cfg_scale(self.s.guidance_scale), stop_after=j, key=key,
                     guidance_scale_2=self.guidance_2(), boundary=self.boundary)
        return jax.lax.stop_gradient(out.latents), out.timestep

    # ---- adversarial erasure: the inner attack ------------------------------------------------
    def adversarial_ctx(self, base, phi, x_t, t, ctx, v_concept):
        """(conditioning, loss at the start, loss reached): `robust_steps` Adam steps on the floating leaves of
        `ctx` (the family's guidance input re-applied after each) toward the erased model predicting
        `v_concept` (the frozen model's velocity for the concept's prompt) at (x_t, t): the soft attack of
        `attacks.soft`, inside the step, from the batch's own prompt."""
        s = self.s
        floating = jax.tree.map(lambda a: jnp.issubdtype(a.dtype, jnp.floating), ctx)
        params = jax.tree.map(lambda a, f: a.astype(jnp.float32) if f else None, ctx, floating)

        def merge(p):
            c = jax.tree.map(lambda a, q, f: q.astype(a.dtype) if f else a, ctx, p, floating,
                             is_leaf=lambda x: x is None)
            return self.family.with_guidance(c, s.guidance_scale)

        def gap(p):
            v = self.velocity(base, phi, x_t, merge(p), t)[0]
            return O.mse(v, v_concept)

        tx = optax.adam(s.robust_lr)

        def body(_, carry):
            p, opt, best, best_loss = carry
            loss, g = jax.value_and_grad(gap)(p)
            better = loss < best_loss
            best = jax.tree.map(lambda a, b_: jnp.where(better, a, b_), p, best)
            best_loss = jnp.where(better, loss, best_loss)
            upd, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, upd), opt, best, best_loss

        start = gap(params)
        p, _, best, best_loss = jax.lax.fori_loop(0, s.robust_steps, body,
                                                  (params, tx.init(params), params, jnp.asarray(jnp.inf, jnp.float32)))
        last = gap(p)
        best = jax.tree.map(lambda a, b_: jnp.where(last < best_loss, a, b_), p, best)
        reached = jnp.minimum(last, best_loss)
        return jax.lax.stop_gradient(merge(best)), jax.lax.stop_gradient(start), jax.lax.stop_gradient(reached)

    # ---- one step ----------------------------------------------------------------------------
    def __call__(self, state: TrainState, base, batch: dict):
        s = self.s
        key = jax.random.wrap_key_data(state.rng)
        key, k_noise, k_pre, k_sample, k_t = jax.random.split(key, 5)
        # embedding-guided families: every pass (sampling, frozen, trained) at the sampler's guidance
        ctx, uncond = (self.family.with_guidance(batch[k], s.guidance_scale) for k in ("ctx", "uncond"))
        b = leading_size(ctx)
        phi_now = jax.lax.stop_gradient(state.phi)
        j = batch["j"]
        if s.xt_source == "current":
            noise = jax.random.normal(k_noise, (b, *self.latent_shape), jnp.float32)
            x_t, t = self.sample_xt(base, phi_now, noise, ctx, uncond, j, k_sample)
        else:
            x_t, t = batch["x_t"], batch["t"]
        if s.timestep_mode == "esd_legacy":
            lo = (j * 1000) // s.num_sampler_steps
            hi = ((j + 1) * 1000) // s.num_sampler_steps
            t = jax.random.randint(k_t, (), lo, jnp.maximum(hi, lo + 1))

        # Frozen passes, uncond and cond batched in one call; the cond half yields the masks.
        use_loc = s.alpha_loc != 0 and self.eraser.kind == "adapter"
        concept_fn = None
        if use_loc:
            def concept_fn(view, extra):  # the cond half of the batched pass
                return O.concept_attention_map(view.select(slice(b, None)), batch["concept_idx"],
                                               batch["concept_valid"], s.mask_key_chunk)
        uncond_b = jax.tree.map(lambda u, c: jnp.broadcast_to(u, c.shape), uncond, ctx)
        v_frozen, aux = self.velocity(base, None, jnp.concatenate([x_t, x_t]), _cat(uncond_b, ctx), t,
                                      concept_fn=concept_fn)
        v_frozen = jax.lax.stop_gradient(v_frozen)
        v_neg = O.negative_target(v_frozen[:b], v_frozen[b:], batch["eta"])
        masks = None
        if use_loc:
            masks = jax.lax.stop_gradient(O.localization_masks(aux["concept"], self.grid, s.mask_threshold,
                                                               s.mask_mode))

        use_pre = s.beta_pre != 0
        if use_pre:
            pre_ctx = self.family.with_guidance(batch["pre_ctx"], s.guidance_scale)
            if s.xt_source == "current":
                noise_pre = jax.random.normal(k_pre, (b, *self.latent_shape), jnp.float32)
                x_pre, _ = self.sample_xt(base, None, noise_pre, pre_ctx, uncond, j, jax.random.fold_in(k_sample, 1))
            else:
                x_pre = batch["x_pre"]
            v_pre_frozen = jax.lax.stop_gradient(self.velocity(base, None, x_pre, pre_ctx, t)[0])
            x_in, c_in = jnp.concatenate([x_t, x_pre]), _cat(ctx, pre_ctx)
        else:
            x_in, c_in = x_t, ctx

        def loss_fn(phi, c_adv=None):
            x, c = (x_in, c_in) if c_adv is None else (jnp.concatenate([x_in, x_t]), _cat(c_in, c_adv))
            v, aux_e = self.velocity(base, phi, x, c, t, collect="energy" if use_loc else False)
            l_un = O.mse(v[:b], v_neg)
            l_loc = O.localization_loss(aux_e["attn"][:, :b], masks) if use_loc else jnp.zeros((), jnp.float32)
            if use_pre:
                w = batch["pre_valid"].reshape(b, *([1] * (v.ndim - 1)))
                diff = jnp.square(v[b:2 * b].astype(jnp.float32) - v_pre_frozen.astype(jnp.float32)) * w
                l_pre = diff.sum() / jnp.maximum(w.sum() * diff[0].size, 1.0)
            else:
                l_pre = jnp.zeros((), jnp.float32)
            total = l_un + s.alpha_loc * l_loc + s.beta_pre * l_pre
            terms = {"loss_unlearn": l_un, "loss_loc": l_loc, "loss_pre": l_pre}
            if s.robust_every:
                # the adversarial rows are the last b; on a plain step there are none (the term is zero)
                l_adv = O.mse(v[-b:], v_neg) if c_adv is not None else jnp.zeros((), jnp.float32)
                total = total + s.robust_weight * l_adv
                terms["loss_adv"] = l_adv
            return total, terms

        if not s.robust_every:
            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.phi)
        else:
            def plain(_):
                (l, tm), g = jax.value_and_grad(loss_fn, has_aux=True)(state.phi)
                return l, {**tm, "attack_loss": jnp.zeros((), jnp.float32), "attack_start": jnp.zeros((), jnp.float32)}, g

            def robust(_):
                c_adv, start, reached = self.adversarial_ctx(base, phi_now, x_t, t, ctx, v_frozen[b:])
                (l, tm), g = jax.value_and_grad(loss_fn, has_aux=True)(state.phi, c_adv)
                return l, {**tm, "attack_loss": reached, "attack_start": start}, g

            attack_now = state.step % s.robust_every == 0
            loss, terms, grads = jax.lax.cond(attack_now, robust, plain, None)
            terms["adversarial"] = attack_now.astype(jnp.int32)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.phi)
        phi = optax.apply_updates(state.phi, updates)
        if self.active_layers is not None:  # the expert that did not serve t keeps its rows and moments
            phi, opt_state = keep_rows(self.optimizer, self.active_layers(t), phi, state.phi, opt_state,
                                       state.opt_state)
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads), "t": jnp.asarray(t, jnp.float32),
                   "j": j}
        if masks is not None:
            metrics["mask_fraction"] = masks.mean()
        new = TrainState(state.step + 1, phi, opt_state, jax.random.key_data(key))
        return new, metrics

