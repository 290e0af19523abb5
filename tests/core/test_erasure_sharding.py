"""The erasure step on 8 simulated devices (data x fsdp, and with tensor parallelism) equals the single-device step."""
import jax
import numpy as np
import pytest
from flax import nnx

import unlearn_jax
from helpers_cogvideox import build_torch, tiny_config
from unlearn_jax.erasers import EraserConfig, eraser_axes, init_erasers
from unlearn_jax.parallel import DEFAULT_RULES, make_mesh, named_sharding
from unlearn_jax.schedulers import SchedulerConfig, make_schedule
from unlearn_jax.train import ErasureStep, StepSettings, init_state, make_optimizer

FRAMES, H, W = 3, 8, 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = tiny_config("5b_rope", num_attention_heads=4, attention_head_dim=16)
    d = tmp_path_factory.mktemp("shard_step")
    build_torch(cfg, seed=21).save_pretrained(d)
    return cfg, d


def _batch(cfg, b=4):
    rng = np.random.default_rng(5)
    L, D = cfg["max_text_seq_length"], cfg["text_embed_dim"]
    return dict(
        ctx=rng.standard_normal((b, L, D)).astype(np.float32),
        uncond=rng.standard_normal((1, L, D)).astype(np.float32),
        pre_ctx=rng.standard_normal((b, L, D)).astype(np.float32),
        pre_valid=np.ones((b,), np.float32),
        concept_idx=np.tile(np.array([[2, 3, 0]], np.int32), (b, 1)),
        concept_valid=np.tile(np.array([[True, True, False]]), (b, 1)),
        eta=np.full((b,), 7.0, np.float32), j=np.int32(2),
    )


def _run(folder, mesh_shape, kind):
    cfg, d = folder
    mesh = make_mesh(mesh_shape) if mesh_shape else None
    model = unlearn_jax.load_transformer(d, mesh=mesh)
    ec = EraserConfig(kind, rank=8)
    phi = init_erasers(ec, model, jax.random.key(0))
    phi = jax.tree.map(lambda x: x + 0.01, phi)  # non-zero everywhere
    sched = make_schedule(SchedulerConfig(), 6)
    opt = make_optimizer(1e-3)
    step = ErasureStep(model, ec, sched, StepSettings(num_sampler_steps=6), opt, (FRAMES, cfg["in_channels"], H, W))
    batch = _batch(cfg)
    if mesh is not None:
        axes = eraser_axes(ec, phi, model)
        phi = jax.device_put(phi, jax.tree.map(lambda a, x: named_sharding(a, x.shape, mesh, DEFAULT_RULES), axes,
                                               phi, is_leaf=lambda a: isinstance(a, tuple)))
        bs = named_sharding(("batch",), (4,), mesh, DEFAULT_RULES).spec[0]
        batch = {k: jax.device_put(v, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(bs) if k not in ("uncond", "j") else jax.sharding.PartitionSpec()))
            for k, v in batch.items()}
    state = init_state(phi, opt, 0)
    _, base = nnx.split(model)
    new, m = jax.jit(step)(state, base, batch)
    return jax.device_get(new.phi), {k: float(v) for k, v in m.items()}, new.phi


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_sharded_step_equals_single_device(folder, kind):
    ref_phi, ref_m, _ = _run(folder, None, kind)
    for shape in ({"data": 2, "fsdp": 4, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        phi, m, dev_phi = _run(folder, shape, kind)
        leaf = jax.tree.leaves(dev_phi)[0]
        assert len(leaf.sharding.device_set) == 8
        for k in ("loss", "loss_unlearn", "loss_loc", "loss_pre", "grad_norm"):
            assert m[k] == pytest.approx(ref_m[k], rel=2e-5, abs=1e-9), (shape, k)
        for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(ref_phi)):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
