"""Sharded load and forward on 8 simulated CPU devices equals the unsharded forward."""
import jax
import numpy as np
import pytest

import unlearn_jax
from helpers_cogvideox import build_torch, inputs, tiny_config
from unlearn_jax.parallel import make_mesh


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = tiny_config("5b_rope", num_attention_heads=4, attention_head_dim=16)
    d = tmp_path_factory.mktemp("sharded")
    build_torch(cfg, seed=6).save_pretrained(d)
    return cfg, d


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 4, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2},
                                   {"data": 1, "fsdp": 1, "tensor": 8}])
def test_sharded_forward_equals_unsharded(folder, shape):
    assert len(jax.devices()) == 8
    cfg, d = folder
    x, ctx, t = inputs(cfg, batch=2, frames=3, seed=9)
    ref = np.asarray(unlearn_jax.load_transformer(d)(x, ctx, t))
    mesh = make_mesh(shape)
    model = unlearn_jax.load_transformer(d, mesh=mesh)
    kernel = model.blocks.ff.proj_in.kernel[...]
    assert len(kernel.sharding.device_set) == 8
    spec = kernel.sharding.spec
    assert spec[0] is None  # the layer axis is never split
    if shape["fsdp"] > 1:
        assert spec[1] == "fsdp"
    if shape["tensor"] > 1:
        assert spec[2] == "tensor"
    # Each device holds only its shard of the weights.
    shard = kernel.addressable_shards[0].data
    assert shard.size == kernel.size // (shape["fsdp"] * shape["tensor"])
    out = np.asarray(model(x, ctx, t))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
