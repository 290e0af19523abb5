"""One erasure step's loss terms and gradients equal a plain PyTorch reference on the diffusers model."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import unlearn_jax
from helpers_cogvideox import build_torch, inputs, tiny_config
from unlearn_jax.erasers import EraserConfig, eraser_hooks, init_erasers
from unlearn_jax.schedulers import SchedulerConfig, make_schedule
from unlearn_jax.torch.reference import ReferenceIteration
from unlearn_jax.train import ErasureStep, StepSettings, init_state, make_optimizer

ETA, ALPHA, BETA, TAU = 7.0, 1.0, 0.5, 0.1
FRAMES, H, W = 3, 8, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config("5b_rope")
    tmodel = build_torch(cfg, seed=11)
    d = tmp_path_factory.mktemp("erase")
    tmodel.save_pretrained(d)
    model = unlearn_jax.load_transformer(d)
    ec = EraserConfig("adapter", rank=6)
    phi = init_erasers(ec, model, jax.random.key(3))
    # Make the zero-initialised up-projection non-zero so every term carries gradient signal.
    k = jax.random.key(4)
    phi["up"]["kernel"] = 0.05 * jax.random.normal(k, phi["up"]["kernel"].shape)
    phi["up"]["bias"] = 0.05 * jax.random.normal(jax.random.fold_in(k, 1), phi["up"]["bias"].shape)
    return cfg, tmodel, model, ec, phi


def _batch(cfg, b=2, seed=0):
    rng = np.random.default_rng(seed)
    L, D = cfg["max_text_seq_length"], cfg["text_embed_dim"]
    x_t = rng.standard_normal((b, FRAMES, cfg["in_channels"], H, W)).astype(np.float32)
    x_pre = rng.standard_normal(x_t.shape).astype(np.float32)
    return dict(
        ctx=rng.standard_normal((b, L, D)).astype(np.float32),
        uncond=rng.standard_normal((1, L, D)).astype(np.float32),
        pre_ctx=rng.standard_normal((b, L, D)).astype(np.float32),
        pre_valid=np.ones((b,), np.float32),
        concept_idx=np.array([[2, 3, 0], [5, 0, 0]], np.int32)[:b],
        concept_valid=np.array([[True, True, False], [True, False, False]])[:b],
        eta=np.full((b,), ETA, np.float32), j=np.int32(7), x_t=x_t, x_pre=x_pre, t=np.float32(421),
    )


def _step(model, ec, latent_shape, **kw):
    sched = make_schedule(SchedulerConfig(), 50)
    settings = StepSettings(xt_source="frozen_bank", alpha_loc=ALPHA, beta_pre=BETA, mask_threshold=TAU, **kw)
    return ErasureStep(model, ec, sched, settings, make_optimizer(1e-4), latent_shape)


# ---------------------------------------------------------------------------------------------
# The PyTorch reference of one iteration (docs/METHOD.md §2, §4, §5), written on diffusers' model
# ---------------------------------------------------------------------------------------------
def torch_reference(tmodel, cfg, phi, batch):
    """Loss terms, unclipped gradients and masks of the shared PyTorch reference (unlearn_jax.torch.reference)."""
    with ReferenceIteration(tmodel, phi, latent_shape=batch["x_t"].shape[1:], alpha_loc=ALPHA, beta_pre=BETA,
                            mask_threshold=TAU) as ref:
        frozen = ref.frozen_passes(batch["x_t"], batch["t"], batch)
        terms = ref.loss_and_grads(batch["x_t"], batch["t"], batch, frozen)
        return terms, ref.grads(), frozen["masks"].numpy()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_loss_terms_and_gradients_equal_pytorch_reference(setup):
    cfg, tmodel, model, ec, phi = setup
    batch = _batch(cfg)
    step = _step(model, ec, (FRAMES, cfg["in_channels"], H, W))
    _, base = nnx.split(model)
    state = init_state(phi, step.optimizer, 0)
    metrics = jax.jit(step)(state, base, batch)[1]
    grads = jax.grad(lambda p: _loss_only(step, state._replace(phi=p), base, batch))(phi)
    ref_terms, ref_grads, ref_masks = torch_reference(tmodel, cfg, phi, batch)
    assert 0.0 < metrics["mask_fraction"] < 1.0
    np.testing.assert_allclose(float(metrics["mask_fraction"]), ref_masks.mean(), rtol=0, atol=1e-7)
    for k, v in ref_terms.items():
        assert v > 0, k
        assert _rel(metrics[k], v) <= 1e-5, (k, float(metrics[k]), v)
    for (path, g), (_, rg) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree_util.tree_leaves_with_path(ref_grads)):
        assert _rel(g, rg) <= 1e-5, (jax.tree_util.keystr(path), _rel(g, rg))


def _loss_only(step, state, base, batch):
    # Same computation as the step, through its public pieces: the step's loss equals this.
    return step(state, base, batch)[1]["loss"]


def test_adam_update_moves_phi(setup):
    cfg, _, model, ec, phi = setup
    step = _step(model, ec, (FRAMES, cfg["in_channels"], H, W))
    _, base = nnx.split(model)
    state = init_state(phi, step.optimizer, 0)
    new, m = jax.jit(step)(state, base, _batch(cfg, seed=1))
    assert int(new.step) == 1
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new.phi), jax.tree.leaves(phi))]
    assert all(0 < d <= 1.5e-4 for d in moved), moved  # Adam's first step moves each weight by ~lr


def test_erasers_off_or_zero_init_equal_base_exactly(setup):
    cfg, _, model, ec, _ = setup
    x, ctx, t = (jnp.asarray(a) for a in inputs(cfg, batch=2, frames=FRAMES, seed=4))
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="kind")
    def run(state, phi, x, ctx, t, kind="adapter"):
        e = EraserConfig(kind, rank=4)
        return nnx.merge(graphdef, state).forward(x, ctx, t, *eraser_hooks(e, phi, collect_outputs=True))

    base = np.asarray(model(x, ctx, t))
    off, aux = run(state, None, x, ctx, t)
    np.testing.assert_array_equal(np.asarray(off), base)  # erasers off: the base model's computation
    assert aux["attn"] is None
    fresh = init_erasers(ec, model, jax.random.key(0))
    on, aux = run(state, fresh, x, ctx, t)
    # The zero-initialised adapter adds exactly zero to every block's attention output...
    assert aux["attn"].shape[0] == cfg["num_layers"] and not np.any(np.asarray(aux["attn"]))
    np.testing.assert_array_equal(np.asarray(on), base)
    for kind in ("lora", "attn", "full"):
        p = init_erasers(EraserConfig(kind, rank=4), model, jax.random.key(0))
        out, _ = run(state, p, x, ctx, t, kind=kind)
        np.testing.assert_array_equal(np.asarray(out), base, err_msg=kind)
